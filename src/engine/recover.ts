/**
 * Rolling back a migration whose engine is gone (the scheduler died mid-flight). The engine's own
 * rollback works from its undo stack; this one works from what QEMU reports, so it can run in a
 * new process that knows only the VM. It is only ever called once the destination is known not
 * to run the guest (see scheduler/agents.ts): resuming the source is then safe.
 */
import { errorText } from '../errors.js';
import type { Logger } from '../log.js';
import type { QmpClient } from '../qmp/index.js';
import { DISK_NODE_PREFIX } from '../qemu/spec.js';
import { cancelJob, cancelMigration, unexportAll } from './primitives.js';
import { hydrate } from './hydrate.js';
import { EXPORT_PREFIX, MIRROR_JOB_PREFIX, TARGET_NODE_PREFIX } from './names.js';

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
