/**
 * Source mirror (pre-copy): an NBD client node per disk, pointed at the destination's export, and
 * a blockdev-mirror into it, until every mirror is READY; at switchover, with the guest paused,
 * the mirrors complete without pivot. The mirror's QEMU arguments are built in one place
 * (`mirrorArguments`), where a new copy mode or TLS on the NBD client goes.
 */
import { DATA_TLS_IDS } from '../host/data-tls.js';
import { diskNodeName } from '../qemu/spec.js';
import { eventIs, type BlockdevMirrorArgs, type BlockdevOptions } from '../qmp/index.js';
import { QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceState } from './context.js';
import { exportName, mirrorJobId, targetNodeName } from './names.js';
import { cancelJob, deleteNode } from './primitives.js';
import type { ProgressTracker } from './progress.js';
import { MigrationError, type MigrationOptions, type MigrationPlan } from './types.js';

type PlanDisk = MigrationPlan['disks'][number];

/** The NBD client node the mirror of `disk` writes into: the destination's export over TCP. */
export function targetNodeArguments(ctx: MigrationContext, dest: DestinationState, disk: PlanDisk, tls: MigrationPlan['dataTls']): BlockdevOptions {
  return {
    driver: 'nbd',
    'node-name': targetNodeName(disk.id),
    server: { type: 'inet', host: ctx.req.destination.migrationHost, port: String(dest.nbdPort) },
    export: exportName(ctx.id, disk.id),
    // Over TLS the source checks that the destination's certificate names its migration address.
    ...(tls.encrypted ? { 'tls-creds': DATA_TLS_IDS.client, 'tls-hostname': tls.destination.hostname } : {}),
  };
}

/** blockdev-mirror's arguments for one disk: every mirror option in one place. */
export function mirrorArguments(opts: Pick<MigrationOptions, 'copyMode' | 'bandwidthBytesPerSec'>, disk: PlanDisk): BlockdevMirrorArgs {
  return {
    'job-id': mirrorJobId(disk.id),
    device: diskNodeName(disk.id),
    target: targetNodeName(disk.id),
    sync: disk.sync,
    'copy-mode': opts.copyMode,
    // Kept after they end so a failure's reason can be read; dismissed by ferry.
    'auto-dismiss': false,
    ...(opts.bandwidthBytesPerSec ? { speed: opts.bandwidthBytesPerSec } : {}),
  };
}

export async function sourceStartMirrors(ctx: MigrationContext, input: { source: SourceState; dest: DestinationState; plan: MigrationPlan }): Promise<void> {
  const q = input.source.qmp;
  for (const disk of input.plan.disks) {
    const node = targetNodeName(disk.id);
    ctx.undo.push(`delete source NBD node ${node}`, 'source', () => deleteNode(q, node, QMP_TIMEOUT_MS));
    await q.execute('blockdev-add', targetNodeArguments(ctx, input.dest, disk, input.plan.dataTls), ctx.call());
    const job = mirrorJobId(disk.id);
    ctx.undo.push(`cancel mirror ${job}`, 'source', () => cancelJob(q, job));
    await q.execute('blockdev-mirror', mirrorArguments(ctx.opts, disk), ctx.call());
  }
}

export async function sourceWaitMirrorsReady(ctx: MigrationContext, input: { source: SourceState; dest: DestinationState; plan: MigrationPlan; progress: ProgressTracker }): Promise<void> {
  const { source, dest, plan, progress } = input;
  for (;;) {
    ctx.throwIfAborted();
    ctx.throwIfDestinationDied(dest);
    const jobs = await sourceMirrorStates(ctx, source, plan);
    const snapshot = await progress.sample(source.qmp, { nbdPort: dest.nbdPort ?? 0 }, ctx.phase, ctx.opts.downtimeLimitMs, undefined);
    ctx.emit({ event: 'progress', migrationId: ctx.id, progress: snapshot });
    ctx.checkStalled(progress);
    if (jobs.every((j) => j.status === 'ready')) return;
    await ctx.nap(source.qmp, (e) => e.event === 'BLOCK_JOB_READY' || e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_ERROR');
  }
}

/** The mirrors' states; a mirror that ended or failed before switchover is a failure. */
export async function sourceMirrorStates(ctx: MigrationContext, source: SourceState, plan: MigrationPlan): Promise<{ id: string; status: string }[]> {
  const jobs = await source.qmp.execute('query-jobs', undefined, ctx.call());
  return plan.disks.map((disk) => {
    const id = mirrorJobId(disk.id);
    const job = jobs.find((j) => j.id === id);
    if (!job) throw new MigrationError('MIRROR_VANISHED', `mirror ${id} is gone`, { phase: ctx.phase });
    if (job.error || ['concluded', 'aborting', 'null'].includes(job.status)) {
      throw new MigrationError('MIRROR_FAILED', `mirror of disk '${disk.id}' failed: ${job.error ?? job.status}`, { phase: ctx.phase, context: { job: id } });
    }
    return { id, status: job.status };
  });
}

/**
 * The guest is paused at pre-switchover. Cancelling a READY mirror completes it without
 * pivoting: the destination's disk is a point-in-time copy as of now, and the source keeps its
 * own disk (libvirt does the same, so the source can still be resumed if anything fails later).
 * It must happen before the migration continues: QEMU inactivates the source's disks at the end
 * of the migration and a running job would forbid it.
 */
export async function sourceCompleteMirrors(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  const q = input.source.qmp;
  const since = q.eventCursor();
  for (const disk of input.plan.disks) await q.execute('block-job-cancel', { device: mirrorJobId(disk.id) }, ctx.call());
  for (const disk of input.plan.disks) {
    const id = mirrorJobId(disk.id);
    await q.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === id && e.data.status === 'concluded', {
      since,
      timeoutMs: ctx.opts.commandTimeoutMs,
      signal: ctx.signal,
      what: `mirror ${id} to conclude`,
    });
  }
  const jobs = await q.execute('query-jobs', undefined, ctx.call());
  for (const disk of input.plan.disks) {
    const id = mirrorJobId(disk.id);
    const job = jobs.find((j) => j.id === id);
    if (job?.error) throw new MigrationError('MIRROR_FAILED', `mirror of disk '${disk.id}' failed at switchover: ${job.error}`, { phase: ctx.phase });
    await q.execute('job-dismiss', { id }, ctx.call());
    ctx.undo.drop(`cancel mirror ${id}`);
  }
}

/** After `cont`: the NBD client nodes go (before the destination's exports can: QEMU refuses to drop an export in use). */
export async function sourceDetachTargets(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  for (const disk of input.plan.disks) await deleteNode(input.source.qmp, targetNodeName(disk.id), ctx.opts.commandTimeoutMs);
}
