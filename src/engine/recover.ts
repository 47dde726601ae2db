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
  const status = await q.execute('query-status', undefined, opts);
  if (status.status !== 'running') {
    await q.execute('cont', undefined, opts);
    did.push(`resumed the guest (was ${status.status})`);
  }
  return did;
}
