/**
 * migrate-vm as a process, its --json events read line by line as they come, so a test can act
 * at the instant a phase begins (kill -9 it, kill a QEMU): the engine's own event stream is the
 * test hook, nothing else.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';

export const MIGRATE_VM = join(import.meta.dirname, '..', '..', 'bin', 'migrate-vm.mjs');

export interface MigrateVmRun {
  child: ChildProcess;
  pid: number;
  events: Record<string, unknown>[];
  stderr(): string;
  /** Resolves with the first event matching, or rejects after timeoutMs (or when the process exits first). */
  waitForEvent(pred: (e: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** The exit code (null: killed by a signal). */
  exited: Promise<number | null>;
}

export function startMigrateVm(args: string[], env: NodeJS.ProcessEnv = process.env): MigrateVmRun {
  const child = spawn(process.execPath, [MIGRATE_VM, ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'], env });
  const events: Record<string, unknown>[] = [];
  const waiters = new Set<{ pred: (e: Record<string, unknown>) => boolean; resolve: (e: Record<string, unknown>) => void }>();
  let out = '';
  let err = '';
  child.stdout!.on('data', (b: Buffer) => {
    out += b.toString();
    for (let nl = out.indexOf('\n'); nl >= 0; nl = out.indexOf('\n')) {
      const line = out.slice(0, nl);
      out = out.slice(nl + 1);
      let e: Record<string, unknown>;
      try {
        e = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      events.push(e);
      for (const w of [...waiters]) if (w.pred(e)) (waiters.delete(w), w.resolve(e));
    }
  });
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child,
    pid: child.pid!,
    events,
    stderr: () => err,
    exited,
    waitForEvent: (pred, timeoutMs = 60_000) => {
      const seen = events.find(pred);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve: (e: Record<string, unknown>) => (clearTimeout(t), resolve(e)) };
        const t = setTimeout(() => (waiters.delete(w), reject(new Error(`no matching migrate-vm event in ${timeoutMs} ms; stderr: ${err}`))), timeoutMs);
        waiters.add(w);
        void exited.then(() => {
          if (!waiters.has(w)) return;
          waiters.delete(w);
          clearTimeout(t);
          reject(new Error(`migrate-vm exited before the event; stderr: ${err}`));
        });
      });
    },
  };
}

/** Kills by pid, if it is still there. */
export function killPid(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

/** Waits until a pid is gone (or a zombie), bounded. */
export async function waitPidGone(pid: number, timeoutMs = 30_000): Promise<boolean> {
  const { readFile } = await import('node:fs/promises');
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    if (!stat || /^\d+ \(.*\) Z/.test(stat)) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}
