/**
 * migrate-vm's side of the watchdog (./watchdog.ts): starts it detached, in its own session, with
 * a pipe on its stdin, and feeds it what it needs to settle the migration should this process
 * die. `done()` tells it to go away: the run ended on its own (migrated, rolled back, refused).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { WatchdogMessage } from './watchdog.js';

export interface Watchdog {
  readonly pid: number | undefined;
  send(m: WatchdogMessage): void;
  /** The run ended: the watchdog exits without touching anything. Resolves once it was told. */
  done(): Promise<void>;
}

const BIN = fileURLToPath(new URL('../../bin/migrate-vm-watchdog.mjs', import.meta.url));

export function startWatchdog(begin: Extract<WatchdogMessage, { type: 'begin' }>): Watchdog {
  const child: ChildProcess = spawn(process.execPath, [BIN], { detached: true, stdio: ['pipe', 'ignore', 'inherit'] });
  child.unref();
  const stdin = child.stdin!;
  // A watchdog that died early is no reason for migrate-vm to fail: the write just goes nowhere.
  stdin.on('error', () => undefined);
  const send = (m: WatchdogMessage): void => {
    if (!stdin.destroyed && stdin.writable) stdin.write(`${JSON.stringify(m)}\n`);
  };
  send(begin);
  return {
    pid: child.pid,
    send,
    done: () =>
      new Promise<void>((resolve) => {
        if (stdin.destroyed || !stdin.writable) return resolve();
        stdin.end(`${JSON.stringify({ type: 'done' } satisfies WatchdogMessage)}\n`, () => resolve());
      }),
  };
}
