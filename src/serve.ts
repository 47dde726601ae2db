/**
 * The life of a ferry daemon (agent, scheduler): start, say where it listens on stdout (one line a
 * supervisor or a test can wait for), serve until SIGTERM/SIGINT, stop cleanly. Exit codes: 0
 * after a clean stop, 2 for a bad configuration, 1 for anything else.
 */
import { errorText, FerryError } from './errors.js';
import type { Logger } from './log.js';

export async function serveUntilSignal(tool: string, log: Logger, start: () => Promise<{ url: string; close(): Promise<void> }>, stopping: string): Promise<number> {
  try {
    const svc = await start();
    process.stdout.write(`${tool} listening on ${svc.url}\n`);
    await new Promise<void>((resolve) => {
      const stop = (sig: string): void => {
        log.info({ sig }, stopping);
        void svc.close().then(resolve);
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
    });
    return 0;
  } catch (err) {
    const user = err instanceof FerryError && err.userError;
    if (!user) log.error({ err: errorText(err) }, `${tool} failed`);
    process.stderr.write(`${tool}: ${errorText(err)}\n`);
    return user ? 2 : 1;
  }
}
