import type { ChildProcess } from 'node:child_process';

/**
 * Every QEMU this process launched, so none outlives it: tests call reapAll() after each case,
 * and the process exit hook kills by PID whatever is left, even when a test failed halfway.
 */
const live = new Map<number, { child: ChildProcess; exited: Promise<unknown> }>();
let hooked = false;

export function register(child: ChildProcess, exited: Promise<unknown>): void {
  if (child.pid === undefined) return;
  live.set(child.pid, { child, exited });
  void exited.finally(() => live.delete(child.pid!));
  if (!hooked) {
    hooked = true;
    process.once('exit', () => {
      for (const { child: c } of live.values()) c.kill('SIGKILL');
    });
  }
}

/** The VM outlives this process from now on (a migrated guest after migrate-vm exits). */
export function unregister(pid: number): void {
  live.delete(pid);
}

export function livePids(): number[] {
  return [...live.keys()];
}

/** SIGKILL every QEMU still running and wait until each has exited. */
export async function reapAll(): Promise<number> {
  const all = [...live.values()];
  for (const { child } of all) child.kill('SIGKILL');
  await Promise.all(all.map((e) => e.exited));
  return all.length;
}
