/**
 * Settling what a dead `migrate-vm` left between two QEMUs on this machine, from what the QEMUs
 * report, never from hope: the watchdog runs it the moment its parent dies (src/cli/watchdog.ts),
 * `migrate-vm --recover` any time after (both also cover a migrate-vm killed with -9). The
 * destination is found by its run dir (`<to-dir>/run-<vm>-<id>`, qemu.pid in it).
 *
 * The table (the docs' recovery table says the same, docs/migration.md):
 *
 *   source migration            destination          action
 *   --------------------------  -------------------  --------------------------------------------------
 *   device (switching over)     -                    wait (bounded) until it settles, then decide again
 *   none, setup, active,        any                  the destination never got the device state: it never
 *   pre-switchover, failed,                          ran and never can. FENCE it first (SIGKILL, waited
 *   cancelled                                        for), remove its files, then roll the source back
 *   completed                   running              the guest runs there: retire the source (quit),
 *                                                    never resume it
 *   completed                   answers, not running `fresh` (the watchdog: nobody but the dead migrate-vm
 *                                                    sends `cont`) or `inmigrate`: fence (SIGKILL) it, then
 *                                                    roll the source back; else UNCERTAIN
 *   completed                   gone or silent       UNCERTAIN: touch nothing, say so
 *   (source QEMU gone)          running              the guest runs there: nothing to do
 *   (source QEMU gone)          not running          the source died: fence the destination, remove it
 *   (source QEMU gone)          gone                 neither runs; nothing removed (nobody can tell which
 *                                                    disk is newer)
 *   (source QMP busy)           -                    someone holds it (a migrate-vm still at work?): hands off
 *
 * "Roll the source back" is recover.ts's rollBackSource: cancel the migration (QEMU resumes a
 * guest that ran before it), ferry's mirrors and NBD nodes, ferry's TLS objects, the saved
 * settings when known, `cont` when the guest ran before (known from the saved settings).
 */
import { readdir, readFile, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { errorText, FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import { QmpClient } from '../qmp/index.js';
import { removeDataTlsObjects } from '../host/data-tls.js';
import { pathExists, removeEmptyParent, removeImage } from '../host/disk-files.js';
import { rollBackSource } from './recover.js';
import { EXPORT_PREFIX, MIRROR_JOB_PREFIX, TARGET_NODE_PREFIX } from './names.js';
import type { SavedSourceSettings } from './types.js';
import { killAndWait } from '../host/processes.js';

/** Where the guest is after a settle. */
export type SettledWhere = 'source' | 'destination' | 'nowhere' | 'uncertain';

export interface SettleReport {
  where: SettledWhere;
  /** What was done, one line each, in order. */
  did: string[];
  /** The operator's next step when the guest is not simply running somewhere. */
  advice?: string;
}

/** A destination ferry started for one migration: its run dir, and the disks it was given. */
export interface LocalDestinationLeft {
  runDir: string;
  /** The destination's storage folder (the disks' and the run dir's parent). */
  dir: string;
  disks: string[];
}

const QMP_MS = 10_000;
/** How long a switchover caught in `device` may take to settle before the settle gives up. */
const DEVICE_SETTLE_MS = 15_000;

/** The run dirs a migration of `vm` into `dir` may have left: `run-<vm>-<migration id>`. */
export async function destinationRunDirs(dir: string, vm: string): Promise<string[]> {
  const names = await readdir(dir).catch(() => [] as string[]);
  return names.filter((n) => n.startsWith(`run-${vm}-`)).map((n) => join(dir, n));
}

/**
 * The live QEMU of a run dir, by its qemu.pid, only if that process is still the QEMU of that
 * run dir (its command line names the run dir): a reused pid is never taken for it.
 */
export async function destinationPid(runDir: string): Promise<number | undefined> {
  const text = await readFile(join(runDir, 'qemu.pid'), 'utf8').catch(() => '');
  const pid = Number(text.trim());
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  return cmdline.includes(runDir) ? pid : undefined;
}

async function connect(path: string, name: string, log: Logger): Promise<QmpClient | undefined> {
  try {
    return await QmpClient.connect({ path }, { timeoutMs: QMP_MS, logger: log, name });
  } catch {
    return undefined;
  }
}

/** The errno of a failed connect says the socket's QEMU is gone (nobody listens, or no socket). */
function isGone(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) {
    if (e instanceof FerryError && (e.context.errno === 'ECONNREFUSED' || e.context.errno === 'ENOENT')) return true;
    if ('code' in e && (e.code === 'ECONNREFUSED' || e.code === 'ENOENT')) return true;
  }
  return false;
}


interface DestinationSeen {
  left: LocalDestinationLeft;
  pid: number | undefined;
  /** query-status of the live one: undefined when it is gone or did not answer. */
  status: string | undefined;
}

async function lookAtDestination(left: LocalDestinationLeft, log: Logger): Promise<DestinationSeen> {
  const pid = await destinationPid(left.runDir);
  if (pid === undefined) return { left, pid, status: undefined };
  // The dead migrate-vm held the launcher's monitor: free again, and ours now. Holding it, and
  // killing before anyone else could be told anything, is the fence of a local destination.
  const q = await connect(join(left.runDir, 'launcher-qmp.sock'), 'settle-destination', log);
  const status = q ? await q.execute('query-status', undefined, { timeoutMs: QMP_MS }).then((s) => s.status).catch(() => undefined) : undefined;
  await q?.close().catch(() => undefined);
  return { left, pid, status };
}

/** Fences (kills) a destination that never ran, and removes what the migration gave it. */
async function removeDestination(d: DestinationSeen, did: string[]): Promise<void> {
  if (d.pid !== undefined) {
    if (!(await killAndWait(d.pid))) throw new Error(`the destination QEMU (pid ${d.pid}) did not die of SIGKILL`);
    did.push(`killed the destination QEMU (pid ${d.pid}, ${d.status ?? 'silent'}), which never ran the guest`);
  }
  for (const disk of d.left.disks) {
    if (!(await pathExists(disk))) continue;
    await removeImage(disk, d.left.dir);
    did.push(`removed the destination disk ${disk}`);
  }
  await rm(d.left.runDir, { recursive: true, force: true });
  did.push(`removed the destination run dir ${d.left.runDir}`);
  await removeEmptyParent(d.left.runDir, d.left.dir).catch(() => undefined);
}

/** ferry's TLS objects in the source QEMU (and the stream's TLS parameters), once no migration needs them. */
async function removeSourceTlsObjects(q: QmpClient): Promise<void> {
  await q.executeRaw('migrate-set-parameters', { 'tls-creds': '', 'tls-hostname': '', 'tls-authz': '' }, { timeoutMs: QMP_MS }).catch(() => undefined);
  await removeDataTlsObjects(q, { timeoutMs: QMP_MS }).catch(() => undefined);
}

/** A live process, not a zombie: a migrate-vm killed a moment ago may not be reaped yet. */
async function processAlive(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return stat !== '' && !/^\d+ \(.*\) Z/.test(stat);
}

/**
 * ferry's TLS credentials beside the source QMP socket (`ferry-tls-<pid>`) whose migrate-vm is
 * gone. QEMU read them when its objects were made, so they go whatever the outcome: also when
 * the guest moved, or the source died, or nobody can tell where the guest is.
 */
export async function removeDeadSourceTlsDirs(sourceQmp: string): Promise<string[]> {
  const did: string[] = [];
  const dir = dirname(sourceQmp);
  for (const n of await readdir(dir).catch(() => [] as string[])) {
    const m = /^ferry-tls-(\d+)$/.exec(n);
    if (!m) continue;
    if (Number(m[1]) !== process.pid && (await processAlive(Number(m[1])))) continue;
    await rm(join(dir, n), { recursive: true, force: true });
    did.push(`removed the TLS credentials ${basename(n)} a dead migrate-vm left`);
  }
  return did;
}

/**
 * Settles one local migration. `destinations`: the run dirs it may have left (the watchdog knows
 * its one; --recover looks for `run-<vm>-*`). `saved`: the source's settings from before the
 * migration, when known (the watchdog has them from the engine's `source-saved` event).
 * `fresh`: the caller saw its migrate-vm die this instant (the watchdog): nobody but that
 * migrate-vm sends `cont` to a destination it started, so a destination that answers "paused"
 * never ran, and a dead one's files are this migration's. Without it (--recover, any time later),
 * only an incoming QEMU (`inmigrate`) or a source whose migration never completed proves that.
 */
export async function settleLocalMigration(opts: SettleOptions): Promise<SettleReport> {
  const report = await settle(opts);
  // Every outcome: the files are no migration's any more (the objects went with the rollback or the QEMU).
  const removed = await removeDeadSourceTlsDirs(opts.sourceQmp).catch((err: unknown) => [`could not remove the dead migrate-vm's TLS credentials: ${errorText(err)}`]);
  return { ...report, did: [...report.did, ...removed] };
}

interface SettleOptions {
  sourceQmp: string;
  destinations: LocalDestinationLeft[];
  saved?: SavedSourceSettings | undefined;
  fresh: boolean;
  log: Logger;
}

async function settle(opts: SettleOptions): Promise<SettleReport> {
  const { log } = opts;
  const did: string[] = [];
  let q: QmpClient | undefined;
  try {
    q = await QmpClient.connect({ path: opts.sourceQmp }, { timeoutMs: QMP_MS, logger: log, name: 'settle-source' });
  } catch (err) {
    // Refused or absent: the source QEMU is gone. Anything else (no greeting: QEMU serves one
    // client per monitor) means someone holds it, a migrate-vm still at work perhaps: hands off.
    if (!isGone(err)) return { where: 'uncertain', did, advice: `the source's QMP socket ${opts.sourceQmp} does not answer (${errorText(err)}); is a migrate-vm still running? Nothing was done` };
  }
  try {
    const migStatus = async (): Promise<string | undefined> =>
      q ? await q.execute('query-migrate', undefined, { timeoutMs: QMP_MS }).then((m) => m.status ?? 'none').catch(() => undefined) : undefined;
    let mig = await migStatus();
    const deadline = performance.now() + DEVICE_SETTLE_MS;
    while (mig === 'device' && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
      mig = await migStatus();
    }
    if (mig === 'device') return { where: 'uncertain', did, advice: `the source's switchover has not settled in ${DEVICE_SETTLE_MS / 1000} s: look before resuming anything` };
    const seen: DestinationSeen[] = [];
    for (const left of opts.destinations) seen.push(await lookAtDestination(left, log));
    const live = seen.filter((d) => d.pid !== undefined);
    const running = live.find((d) => d.status === 'running');
    const sourceAlive = q !== undefined && mig !== undefined;
    // The destination cannot have the guest's device state: the source never finished sending it.
    const sourceNeverCompleted = sourceAlive && mig !== 'completed';
    const neverRan = (d: DestinationSeen): boolean =>
      d.status === 'inmigrate' || (d.status !== undefined && d.status !== 'running' && (sourceNeverCompleted || opts.fresh));

    if (running) {
      if (sourceAlive && mig !== 'completed') {
        return { where: 'uncertain', did, advice: `a destination QEMU (pid ${running.pid}) runs while the source's migration is '${mig}': look at both before changing anything` };
      }
      if (q && sourceAlive) {
        // The destination runs the guest: the source is never resumed. It is retired.
        await q.execute('quit', undefined, { timeoutMs: QMP_MS }).catch(() => undefined);
        await Promise.race([q.closed, new Promise((r) => setTimeout(r, QMP_MS).unref())]);
        did.push('the destination runs the guest: retired the source QEMU (quit), never resumed it');
      }
      return { where: 'destination', did, advice: `the guest runs on the destination (pid ${running.pid}, run dir ${running.left.runDir})` };
    }
    const unproven = live.filter((d) => !neverRan(d));
    if (unproven.length > 0) {
      const which = unproven.map((d) => `pid ${d.pid} (${d.status ?? 'does not answer'})`).join(', ');
      return { where: 'uncertain', did, advice: `the destination QEMU ${which} may hold a guest that ran: look before resuming or removing anything` };
    }
    // Every live destination never ran. Fenced (killed) before anything else happens, so it never will.
    const dead = seen.filter((d) => d.pid === undefined);
    if (!q || !sourceAlive) {
      for (const d of live) await removeDestination(d, did);
      if (dead.length > 0 && live.length === 0) {
        return { where: 'nowhere', did, advice: `neither the source QEMU nor a destination QEMU runs (${dead.map((d) => d.left.runDir).join(', ')} left as found): find out which disk is newer before starting the guest` };
      }
      for (const d of dead) await removeDestination(d, did);
      return { where: 'nowhere', did, advice: 'the source QEMU is gone and no destination ran the guest: its disks on the source are whole, start it there' };
    }
    if (mig === 'completed' && dead.length > 0) {
      return { where: 'uncertain', did, advice: "the source's migration completed and its destination QEMU is gone: it may have run. The source stays paused; look before resuming anything" };
    }
    for (const d of live) await removeDestination(d, did);
    const hadLeftovers = mig !== 'none' || (await ferryLeftovers(q)).length > 0;
    for (const d of dead) {
      if (opts.fresh || hadLeftovers) await removeDestination(d, did);
      else did.push(`left ${d.left.runDir} (no QEMU, and nothing on the source says it is this migration's): remove it by hand if it is not needed`);
    }
    did.push(...(await rollBackSource(q, log, { saved: opts.saved, timeoutMs: 30_000 })));
    await removeSourceTlsObjects(q);
    const status = await q.execute('query-status', undefined, { timeoutMs: QMP_MS });
    if (status.status !== 'running' && !opts.saved) {
      return { where: 'source', did, advice: `the source is ${status.status}; whether it ran before the migration is not known here: 'cont' it on its QMP if it did` };
    }
    return { where: 'source', did };
  } catch (err) {
    log.error({ err: errorText(err) }, 'settling the dead migration failed');
    return { where: 'uncertain', did, advice: `settling stopped on an error (${errorText(err)}): look at both QEMUs before resuming anything` };
  } finally {
    await q?.close().catch(() => undefined);
  }
}

/** What of ferry's own is in a source QEMU: its mirror jobs, NBD client nodes, exports (names.ts). */
export async function ferryLeftovers(q: QmpClient, timeoutMs = QMP_MS): Promise<string[]> {
  const found: string[] = [];
  for (const j of await q.execute('query-jobs', undefined, { timeoutMs })) if (j.id.startsWith(MIRROR_JOB_PREFIX)) found.push(`block job ${j.id}`);
  for (const n of await q.execute('query-named-block-nodes', { flat: true }, { timeoutMs })) {
    const name = n['node-name'];
    if (name?.startsWith(TARGET_NODE_PREFIX)) found.push(`NBD node ${name}`);
  }
  for (const e of await q.execute('query-block-exports', undefined, { timeoutMs })) if (e.id.startsWith(EXPORT_PREFIX)) found.push(`export ${e.id}`);
  return found;
}
