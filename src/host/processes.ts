/** Processes on this host, by PID (the agent's and the local watchdog's shared steps). */
import { readFile } from 'node:fs/promises';

/** Gone, or a zombie: nothing of it runs any more (a zombie's parent, or init, reaps it). */
async function ended(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  // comm (field 2) may hold spaces and parentheses: the state is the field after the last ')'.
  const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  return stat === '' || state === 'Z' || state === 'X';
}

/** SIGKILL by pid, and the wait until /proc says it is gone or a zombie (bounded). */
export async function killAndWait(pid: number, timeoutMs = 10_000): Promise<boolean> {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return true;
  }
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    if (await ended(pid)) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}
