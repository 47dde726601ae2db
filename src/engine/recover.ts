/**
 * Settling a migration whose engine is gone (the scheduler died mid-flight). The engine's own
 * rollback works from its undo stack; this one works from what QEMU reports and what the
 * scheduler persisted (the last phase, the source's saved settings), so it can run in a new
 * process that knows only the VM. Which action applies is a table keyed by phase (`recoveryFor`);
 * the QEMU operations are the engine's own (primitives.ts, hydrate.ts).
 */
import { errorText } from '../errors.js';
import type { Logger } from '../log.js';
import type { QmpClient } from '../qmp/index.js';
import { DISK_NODE_PREFIX } from '../qemu/spec.js';
import { cancelJob, cancelMigration, deleteNode, unexportAll } from './primitives.js';
import { restoreSourceSettings } from './source-perform.js';
import type { SavedSourceSettings } from './types.js';
import { hydrate } from './hydrate.js';
import { EXPORT_PREFIX, MIRROR_JOB_PREFIX, TARGET_NODE_PREFIX } from './names.js';

/**
 * What to do with a migration the engine left in flight, by the last phase the scheduler
 * persisted (libvirt's qemuProcessRecoverMigrationOut). The phase is persisted before the step
 * it names, so `confirm` is the only phase in which `cont` may or may not have reached the
 * destination: there the destination's own word decides.
 *   roll-back        the destination cannot have run: remove it, roll the source back
 *   ask-destination  it may have run: running → hand over; not running → roll back; no answer → operator
 *   hand-over        it ran: finish the hydration, retire the source; never resume the source
 */
export type RecoveryAction = 'roll-back' | 'ask-destination' | 'hand-over';

const RECOVERY: Readonly<Record<string, RecoveryAction>> = {
  preflight: 'roll-back',
  'prepare-destination': 'roll-back',
  mirror: 'roll-back',
  ram: 'roll-back',
  switchover: 'roll-back',
  rollback: 'roll-back',
  confirm: 'ask-destination',
  failed: 'ask-destination',
  hydrate: 'hand-over',
  cleanup: 'hand-over',
  done: 'hand-over',
};

/** The recovery for a persisted phase; one it does not know (or none) is asked about. */
export function recoveryFor(phase: string | null): RecoveryAction {
  if (phase === null) return 'roll-back';
  return RECOVERY[phase] ?? 'ask-destination';
}

/**
 * Cancels the migration and mirrors, drops the NBD targets and exports, puts back the migration
 * capabilities and parameters the engine saved, and resumes the guest only if it ran before
 * (`saved` absent: the engine never got to change the source's state, so it is not resumed
 * either). Returns what it did.
 */
export async function rollBackSource(q: QmpClient, log: Logger, opts: { saved?: SavedSourceSettings | undefined; timeoutMs?: number } = {}): Promise<string[]> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const did: string[] = [];
  const call = { timeoutMs };
  if ((await cancelMigration(q, timeoutMs)).cancelled) did.push('cancelled the migration');
  for (const job of await q.execute('query-jobs', undefined, call)) {
    if (!job.id.startsWith(MIRROR_JOB_PREFIX)) continue;
    await cancelJob(q, job.id, timeoutMs);
    did.push(`cancelled ${job.id}`);
  }
  for (const node of await q.execute('query-named-block-nodes', undefined, call)) {
    const name = node['node-name'];
    if (!name?.startsWith(TARGET_NODE_PREFIX)) continue;
    await deleteNode(q, name, timeoutMs).catch((err: unknown) => log.warn({ node: name, err: errorText(err) }, 'could not delete an NBD target node'));
    did.push(`deleted ${name}`);
  }
  did.push(...(await unexportSource(q, timeoutMs)));
  if (opts.saved) {
    await restoreSourceSettings(q, opts.saved, timeoutMs);
    did.push('restored the migration capabilities and parameters');
  }
  const status = await q.execute('query-status', undefined, call);
  if (opts.saved?.wasRunning && status.status !== 'running') {
    await q.execute('cont', undefined, call);
    did.push(`resumed the guest (was ${status.status})`);
  } else if (status.status !== 'running') {
    did.push(`left the guest ${status.status}, as it was before the migration`);
  }
  return did;
}

/** Lazy mode's read-only exports on the source, and its NBD server: gone. */
export function unexportSource(q: QmpClient, timeoutMs = 30_000): Promise<string[]> {
  return unexportAll(q, EXPORT_PREFIX, timeoutMs);
}

/**
 * A lazy destination whose engine died during hydration: every disk node that still has a
 * backing (the source's export) is streamed again, at the same rate cap, until it stands alone
 * (hydrate.ts, the loop the live engine uses). Only then may the source go. Waits as long as the
 * copy takes, bounded by `stallMs` without progress. Throws HydrationError.
 */
export async function finishHydration(
  q: QmpClient,
  log: Logger,
  opts: { stallMs?: number; timeoutMs?: number; bytesPerSec?: number | undefined; attempts?: number } = {},
): Promise<string[]> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const nodes = await q.execute('query-named-block-nodes', { flat: true }, { timeoutMs });
  // ferry's disks on a destination have a backing only in lazy mode (pre-copy flattens chains).
  const disks = nodes.flatMap((n) => {
    const name = n['node-name'];
    return name?.startsWith(DISK_NODE_PREFIX) && n.backing_file ? [{ id: name.slice(DISK_NODE_PREFIX.length), virtualSize: n.image['virtual-size'] }] : [];
  });
  if (disks.length === 0) return [];
  await hydrate(q, disks, {
    bytesPerSec: opts.bytesPerSec,
    stallMs: opts.stallMs ?? 120_000,
    attempts: opts.attempts ?? 3,
    timeoutMs,
    pollMs: 200,
    onRetry: (attempt, why) => log.warn({ attempt, why }, 'hydration attempt failed; resuming'),
  });
  for (const d of disks) log.info({ node: `${DISK_NODE_PREFIX}${d.id}` }, 'finished the hydration a dead engine left');
  return disks.map((d) => `hydrated ${DISK_NODE_PREFIX}${d.id}`);
}
