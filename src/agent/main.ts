/**
 * ferry-agent [--config FILE] [flags]: see config.ts for the sources of configuration and
 * docs/agent.md for the API. SIGTERM/SIGINT stop serving; the VMs keep running, and the next
 * start re-attaches to them.
 */
import { errorText, FerryError } from '../errors.js';
import { createLogger } from '../log.js';
import { loadAgentConfig, type AgentConfig } from './config.js';
import { startAgent } from './server.js';

export async function main(argv: string[]): Promise<number> {
  let config: AgentConfig;
  try {
    config = await loadAgentConfig(argv, process.env);
  } catch (err) {
    process.stderr.write(`ferry-agent: ${errorText(err)}\n`);
    return 2;
  }
  const log = createLogger({ tool: 'ferry-agent' });
  try {
    const agent = await startAgent(config, log);
    // One line on stdout that a supervisor (or a test) can wait for.
    process.stdout.write(`ferry-agent listening on ${agent.url}\n`);
    await new Promise<void>((resolve) => {
      const stop = (sig: string): void => {
        log.info({ sig }, 'shutting down (VMs keep running)');
        void agent.close().then(resolve);
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
    });
    return 0;
  } catch (err) {
    if (!(err instanceof FerryError && err.userError)) log.error({ err: errorText(err) }, 'agent failed');
    process.stderr.write(`ferry-agent: ${errorText(err)}\n`);
    return err instanceof FerryError && err.userError ? 2 : 1;
  }
}
