/**
 * Rolling back a migration whose engine is gone (the scheduler died mid-flight). The engine's own
 * rollback works from its undo stack; this one works from what QEMU reports, so it can run in a
 * new process that knows only the VM. It is only ever called once the destination is known not
 * to run the guest (see scheduler/agents.ts): resuming the source is then safe.
 */
import { errorText, FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import { eventIs, type QmpClient } from '../qmp/index.js';
import { DISK_NODE_PREFIX } from '../qemu/spec.js';
import { EXPORT_PREFIX, MIRROR_JOB_PREFIX, streamJobId, TARGET_NODE_PREFIX } from './names.js';

const SETTLED = new Set(['completed', 'failed', 'cancelled', 'none']);

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
    if (performance.now() > deadline) throw new FerryError('CANCEL_TIMEOUT', `migration still '${mig.status}' after migrate_cancel`);
    await new Promise((r) => setTimeout(r, 20));
    mig = await q.execute('query-migrate', undefined, opts);
  }
  return { status: mig.status, cancelled: true };
}

/** Cancels a block job (force: a READY mirror does not complete) and dismisses it. */
export async function cancelJob(q: QmpClient, id: string, timeoutMs = 30_000): Promise<void> {
  const opts = { timeoutMs };
  const jobs = await q.execute('query-jobs', undefined, opts);
  const job = jobs.find((j) => j.id === id);
  if (!job) return;
  if (job.status !== 'concluded' && job.status !== 'null') {
    const since = q.eventCursor();
    await q.execute('block-job-cancel', { device: id, force: true }, opts);
    await q.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === id && e.data.status === 'concluded', {
      since,
      timeoutMs,
      what: `mirror ${id} to end after cancel`,
    });
  }
  await q.execute('job-dismiss', { id }, opts);
}

/** Cancels the migration and mirrors, drops the NBD targets, resumes the guest. Returns what it did. */
export async function rollBackSource(q: QmpClient, log: Logger, timeoutMs = 30_000): Promise<string[]> {
  const did: string[] = [];
  const opts = { timeoutMs };
  if ((await cancelMigration(q, timeoutMs)).cancelled) did.push('cancelled the migration');
  for (const job of await q.execute('query-jobs', undefined, opts)) {
    if (!job.id.startsWith(MIRROR_JOB_PREFIX)) continue;
    await cancelJob(q, job.id, timeoutMs);
    did.push(`cancelled ${job.id}`);
  }
  for (const node of await q.execute('query-named-block-nodes', undefined, opts)) {
    const name = node['node-name'];
    if (!name?.startsWith(TARGET_NODE_PREFIX)) continue;
    await q.execute('blockdev-del', { 'node-name': name }, opts).catch((err: unknown) => log.warn({ node: name, err: errorText(err) }, 'could not delete an NBD target node'));
    did.push(`deleted ${name}`);
  }
  did.push(...(await unexportSource(q, timeoutMs)));
  const status = await q.execute('query-status', undefined, opts);
  if (status.status !== 'running') {
    await q.execute('cont', undefined, opts);
    did.push(`resumed the guest (was ${status.status})`);
  }
  return did;
}

/** Lazy mode's read-only exports on the source, and its NBD server: gone. */
export async function unexportSource(q: QmpClient, timeoutMs = 30_000): Promise<string[]> {
  const did: string[] = [];
  const exports = (await q.executeRaw('query-block-exports', undefined, { timeoutMs })) as { id?: unknown }[];
  const ours = exports.map((e) => e.id).filter((id): id is string => typeof id === 'string' && id.startsWith(EXPORT_PREFIX));
  for (const id of ours) {
    await q.execute('block-export-del', { id, mode: 'hard' }, { timeoutMs });
    did.push(`removed export ${id}`);
  }
  if (ours.length > 0) {
    await q.execute('nbd-server-stop', undefined, { timeoutMs }).catch(() => undefined);
    did.push("stopped the source's NBD server");
  }
  return did;
}

/**
 * A lazy destination whose engine died during hydration: every disk node that still has a
 * backing (the source's export) is streamed again until it stands alone. Only then may the
 * source go. Waits as long as the copy takes, bounded by `stallMs` without progress.
 */
export async function finishHydration(q: QmpClient, log: Logger, opts: { stallMs?: number; timeoutMs?: number } = {}): Promise<string[]> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const stallMs = opts.stallMs ?? 120_000;
  const did: string[] = [];
  const nodes = (await q.executeRaw('query-named-block-nodes', { flat: true }, { timeoutMs })) as { 'node-name'?: string; backing_file?: string }[];
  const jobs = await q.execute('query-jobs', undefined, { timeoutMs });
  for (const node of nodes) {
    const name = node['node-name'];
    // ferry's disks on a destination have a backing only in lazy mode (pre-copy flattens chains).
    if (!name?.startsWith(DISK_NODE_PREFIX) || !node.backing_file) continue;
    const id = streamJobId(name.slice(DISK_NODE_PREFIX.length));
    const old = jobs.find((j) => j.id === id);
    if (old && old.status !== 'concluded') {
      // The dead engine's stream may still run (or wait in 'pending'): let it finish.
      if (old.status === 'pending') await q.executeRaw('job-finalize', { id }, { timeoutMs });
    } else {
      if (old) await q.execute('job-dismiss', { id }, { timeoutMs });
      await q.execute('block-stream', { 'job-id': id, device: name, 'auto-dismiss': false }, { timeoutMs });
    }
    let last = -1;
    let lastMoved = performance.now();
    for (;;) {
      const job = (await q.execute('query-jobs', undefined, { timeoutMs })).find((j) => j.id === id);
      if (!job || job.status === 'concluded') {
        if (job?.error) throw new Error(`hydration of ${name} failed again: ${job.error}`);
        if (job) await q.execute('job-dismiss', { id }, { timeoutMs });
        break;
      }
      if (job.status === 'pending') await q.executeRaw('job-finalize', { id }, { timeoutMs });
      if (job['current-progress'] !== last) {
        last = job['current-progress'];
        lastMoved = performance.now();
      } else if (performance.now() - lastMoved > stallMs) {
        throw new Error(`hydration of ${name} made no progress for ${stallMs} ms`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
    log.info({ node: name }, 'finished the hydration a dead engine left');
    did.push(`hydrated ${name}`);
  }
  return did;
}
