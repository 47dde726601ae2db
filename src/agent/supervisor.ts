/**
 * Watching one QEMU the agent owns: when it exits, and what it reports. The agent may be a new
 * process that did not start this QEMU (a restart), so exit is told from the PID and its kernel
 * start time, not from a child handle alone. Events come from the launcher monitor, which QEMU
 * lets one client hold: the agent holds it for as long as the VM runs.
 */
import { FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import { QmpClient, type QmpEvent } from '../qmp/index.js';
import { processStartTime } from './registry.js';

const POLL_MS = 250;

/** QMP events an agent passes on to subscribers: migration, job and run-state changes. */
export const RELAYED_EVENTS: ReadonlySet<string> = new Set([
  'MIGRATION',
  'MIGRATION_PASS',
  'JOB_STATUS_CHANGE',
  'BLOCK_JOB_READY',
  'BLOCK_JOB_COMPLETED',
  'BLOCK_JOB_CANCELLED',
  'BLOCK_JOB_ERROR',
  'BLOCK_IO_ERROR',
  'STOP',
  'RESUME',
  'SHUTDOWN',
]);

export interface Supervised {
  readonly pid: number;
  readonly pidStart: string | undefined;
  /** Settles once the QEMU process is gone, whoever started it. */
  readonly exited: Promise<void>;
  running(): boolean;
  /** QMP quit on the monitor (QEMU flushes its disks), SIGKILL if it is still there at the deadline. */
  quit(timeoutMs: number): Promise<void>;
  /** SIGKILL by PID, then wait for the exit. */
  kill(): Promise<void>;
  /** QEMU's run state from the monitor; undefined without a monitor or an answer. */
  status(): Promise<string | undefined>;
  /** Stop watching without touching the VM (the agent shuts down; the VM lives on). */
  detach(): Promise<void>;
  /** The agent's own monitor of this QEMU (never a caller's): for what the agent sets itself. */
  readonly monitor: QmpClient | undefined;
}

export function supervise(opts: {
  pid: number;
  pidStart: string | undefined;
  monitor: QmpClient | undefined;
  /** The child's own exit, when this agent started it: quicker than polling. */
  childExited?: Promise<unknown>;
  onEvent: (e: QmpEvent) => void;
  log: Logger;
}): Supervised {
  const { pid, pidStart, monitor, log } = opts;
  let alive = pidStart !== undefined && processStartTime(pid) === pidStart;
  let poll: NodeJS.Timeout | undefined;
  const exited = new Promise<void>((resolve) => {
    if (!alive) return resolve();
    const gone = (): void => {
      alive = false;
      clearInterval(poll);
      resolve();
    };
    poll = setInterval(() => {
      if (processStartTime(pid) !== pidStart) gone();
    }, POLL_MS);
    poll.unref();
    opts.childExited?.then(gone, gone);
  });
  if (monitor) {
    void (async () => {
      for await (const e of monitor.events()) if (RELAYED_EVENTS.has(e.event)) opts.onEvent(e);
    })();
    void exited.then(() => monitor.close());
  }
  const kill = async (): Promise<void> => {
    if (!alive) return;
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
    await exited;
  };
  return {
    pid,
    pidStart,
    monitor,
    exited,
    running: () => alive,
    kill,
    quit: async (timeoutMs) => {
      if (!alive) return;
      if (monitor) await monitor.execute('quit', undefined, { timeoutMs }).catch((err: unknown) => log.warn({ pid, err: String(err) }, 'quit on the monitor failed'));
      let timer: NodeJS.Timeout | undefined;
      const inTime = await Promise.race([exited.then(() => true), new Promise<false>((r) => (timer = setTimeout(r, timeoutMs, false)))]);
      clearTimeout(timer);
      if (!inTime) {
        log.warn({ pid, timeoutMs }, 'QEMU did not exit after quit: SIGKILL');
        await kill();
      }
    },
    status: async () => (monitor ? monitor.execute('query-status', undefined, { timeoutMs: 5_000 }).then((r) => r.status, () => undefined) : undefined),
    detach: async () => {
      clearInterval(poll);
      await monitor?.close();
    },
  };
}

/** The launcher monitor of a QEMU this agent finds running after a restart; undefined if busy. */
export async function attachMonitor(path: string, log: Logger): Promise<QmpClient | undefined> {
  try {
    return await QmpClient.connect({ path }, { timeoutMs: 5_000, name: 'agent-monitor' });
  } catch (err) {
    log.warn({ path, err: err instanceof FerryError ? err.message : String(err) }, 'cannot re-attach to the VM monitor: no events for this VM');
    return undefined;
  }
}
