/**
 * Rolling back a migration whose engine is gone (the scheduler died mid-flight). The engine's own
 * rollback works from its undo stack; this one works from what QEMU reports, so it can run in a
 * new process that knows only the VM. It is only ever called once the destination is known not
 * to run the guest (see scheduler/agents.ts): resuming the source is then safe.
 */
import { errorText } from '../errors.js';
import type { Logger } from '../log.js';
import type { QmpClient } from '../qmp/index.js';
import { cancelJob } from './migrate.js';

const MIRROR_PREFIX = 'ferry-mirror-';
const TARGET_PREFIX = 'ferry-nbd-';
const SETTLED = new Set(['completed', 'failed', 'cancelled', 'none']);

/** Cancels the migration and mirrors, drops the NBD targets, resumes the guest. Returns what it did. */
export async function rollBackSource(q: QmpClient, log: Logger, timeoutMs = 30_000): Promise<string[]> {
  const did: string[] = [];
  const opts = { timeoutMs };
  let mig = await q.execute('query-migrate', undefined, opts);
  if (mig.status && !SETTLED.has(mig.status)) {
    await q.execute('migrate_cancel', undefined, opts);
    const deadline = performance.now() + timeoutMs;
    while (mig.status && !SETTLED.has(mig.status)) {
      if (performance.now() > deadline) throw new Error(`the source's migration is still '${mig.status}' after migrate_cancel`);
      await new Promise((r) => setTimeout(r, 50));
      mig = await q.execute('query-migrate', undefined, opts);
    }
    did.push('cancelled the migration');
  }
  for (const job of await q.execute('query-jobs', undefined, opts)) {
    if (!job.id.startsWith(MIRROR_PREFIX)) continue;
    await cancelJob(q, job.id);
    did.push(`cancelled ${job.id}`);
  }
  for (const node of await q.execute('query-named-block-nodes', undefined, opts)) {
    const name = node['node-name'];
    if (!name?.startsWith(TARGET_PREFIX)) continue;
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
  const ours = exports.map((e) => e.id).filter((id): id is string => typeof id === 'string' && id.startsWith('ferry-'));
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
    if (!name?.startsWith('disk-') || !node.backing_file) continue;
    const id = `ferry-stream-${name.slice('disk-'.length)}`;
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
