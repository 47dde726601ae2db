/**
 * The QEMU operations a migration is made of, each one idempotent (safe to run again, safe to run
 * on something already gone), shared by the live engine and the crash recovery (recover.ts), so
 * the two can never disagree on how a thing is undone. Each takes the QMP session and a deadline;
 * the live engine adds its AbortSignal until the point of no return.
 */
import { FerryError } from '../errors.js';
import { eventIs, QmpCommandError, type QmpClient } from '../qmp/index.js';

export interface Call {
  timeoutMs: number;
  signal?: AbortSignal;
}

/** An operation on QEMU that did not end as it must; the command and object are in `context`. */
export class PrimitiveError extends FerryError {
  override name = 'PrimitiveError';
}

const SETTLED = new Set(['completed', 'failed', 'cancelled', 'none']);

/**
 * Waits (from the cursor `since`) for this QEMU's migration to end; when it did not complete, its
 * reason is read from query-migrate. Nothing is asked when it completed: inside the pause every
 * round trip counts.
 */
export async function waitMigrationEnd(q: QmpClient, opts: Call & { since: number; what: string; call: Call }): Promise<{ status: string; errorDesc?: string | undefined }> {
  const ev = await q.waitForEvent((e) => eventIs(e, 'MIGRATION') && ['completed', 'failed', 'cancelled'].includes(e.data.status), {
    since: opts.since,
    timeoutMs: opts.timeoutMs,
    ...(opts.signal ? { signal: opts.signal } : {}),
    what: opts.what,
  });
  const status = eventIs(ev, 'MIGRATION') ? ev.data.status : 'unknown';
  if (status === 'completed') return { status };
  const mig = await q.execute('query-migrate', undefined, opts.call).catch(() => undefined);
  return { status, errorDesc: mig?.['error-desc'] };
}

/**
 * migrate_cancel, if a migration is under way, and the wait until QEMU says it has ended.
 * Returns the status it ended in ('completed' if it finished before the cancel took).
 */
export async function cancelMigration(q: QmpClient, timeoutMs = 30_000): Promise<{ status: string | undefined; cancelled: boolean }> {
  const opts = { timeoutMs };
  let mig = await q.execute('query-migrate', undefined, opts);
  if (!mig.status || SETTLED.has(mig.status)) return { status: mig.status, cancelled: false };
  await q.execute('migrate_cancel', undefined, opts);
  const deadline = performance.now() + timeoutMs;
  while (mig.status && !SETTLED.has(mig.status)) {
    if (performance.now() > deadline) throw new PrimitiveError('CANCEL_TIMEOUT', `migration still '${mig.status}' ${timeoutMs} ms after migrate_cancel`, { context: { command: 'migrate_cancel' } });
    await new Promise((r) => setTimeout(r, 20));
    mig = await q.execute('query-migrate', undefined, opts);
  }
  return { status: mig.status, cancelled: true };
}

/** Cancels a block job (force: a READY mirror does not complete) and dismisses it; absent is done. */
export async function cancelJob(q: QmpClient, id: string, timeoutMs = 30_000): Promise<void> {
  const opts = { timeoutMs };
  const job = (await q.execute('query-jobs', undefined, opts)).find((j) => j.id === id);
  if (!job) return;
  if (job.status !== 'concluded' && job.status !== 'null') {
    const since = q.eventCursor();
    try {
      await q.execute('block-job-cancel', { device: id, force: true }, opts);
    } catch (err) {
      // It may have ended by itself since the query (a yanked NBD client fails a mirror): then
      // only the dismiss is left, or the end it is already on its way to.
      if (!(err instanceof QmpCommandError && /cannot accept command verb 'cancel'/.test(err.desc))) throw err;
    }
    const now = (await q.execute('query-jobs', undefined, opts)).find((j) => j.id === id);
    if (!now) return;
    if (now.status !== 'concluded' && now.status !== 'null') {
      await q.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === id && e.data.status === 'concluded', {
        since,
        timeoutMs,
        what: `job ${id} to end after cancel`,
      });
    }
  }
  await q.execute('job-dismiss', { id }, opts);
}

/** blockdev-del of a node, if it is there. */
export async function deleteNode(q: QmpClient, node: string, timeoutMs = 30_000): Promise<void> {
  const nodes = await q.execute('query-named-block-nodes', { flat: true }, { timeoutMs });
  if (!nodes.some((n) => n['node-name'] === node)) return;
  await q.execute('blockdev-del', { 'node-name': node }, { timeoutMs });
}

/** Removes an NBD export, if it is there (hard: open connections are cut). */
export async function unexport(q: QmpClient, id: string, timeoutMs = 30_000): Promise<void> {
  const exports = await q.execute('query-block-exports', undefined, { timeoutMs });
  if (!exports.some((e) => e.id === id)) return;
  await q.execute('block-export-del', { id, mode: 'hard' }, { timeoutMs });
}

/** Stops the NBD server; one that is not running is stopped already. */
export async function stopNbdServer(q: QmpClient, timeoutMs = 30_000): Promise<void> {
  try {
    await q.execute('nbd-server-stop', undefined, { timeoutMs });
  } catch (err) {
    if (!(err instanceof QmpCommandError && /not running/i.test(err.desc))) throw err;
  }
}

/** Every export whose id starts with `prefix`, and then the NBD server: gone. Returns what it did. */
export async function unexportAll(q: QmpClient, prefix: string, timeoutMs = 30_000): Promise<string[]> {
  const did: string[] = [];
  const ours = (await q.execute('query-block-exports', undefined, { timeoutMs })).map((e) => e.id).filter((id) => id.startsWith(prefix));
  for (const id of ours) {
    await unexport(q, id, timeoutMs);
    did.push(`removed export ${id}`);
  }
  if (ours.length > 0) {
    await stopNbdServer(q, timeoutMs);
    did.push("stopped the source's NBD server");
  }
  return did;
}

/**
 * Undo of `migrate`, valid in every state before the destination runs: cancel what is still in
 * flight, then make sure the guest runs on the source as it did before (resumed only if it was
 * running: a guest the operator had paused stays paused). After a completed migration the source
 * sits in postmigrate with its disks inactive and `cont` reactivates them; the NBD client nodes
 * (`targetNodes`) go first, since reactivating them would reconnect to a destination that may be
 * dead or frozen, and the source would hang instead of resuming.
 */
export async function cancelAndResumeSource(q: QmpClient, opts: { wasRunning: boolean; targetNodes: string[]; timeoutMs?: number }): Promise<{ cancelled: boolean; resumed: boolean }> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const { status: migStatus, cancelled } = await cancelMigration(q, timeoutMs);
  if (migStatus === 'completed') for (const node of opts.targetNodes) await deleteNode(q, node, timeoutMs).catch(() => undefined);
  if (!opts.wasRunning) return { cancelled, resumed: false };
  const status = await q.execute('query-status', undefined, { timeoutMs });
  if (status.status === 'running') return { cancelled, resumed: false };
  await q.execute('cont', undefined, { timeoutMs });
  return { cancelled, resumed: true };
}
