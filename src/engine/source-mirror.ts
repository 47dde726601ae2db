/**
 * Source mirror (pre-copy): an NBD client node per disk, pointed at the destination's export, and
 * a blockdev-mirror into it, until every mirror is READY; at switchover, with the guest paused,
 * the mirrors complete without pivot. The mirror's QEMU arguments are built in one place
 * (`mirrorArguments`), where a new copy mode or TLS on the NBD client goes.
 */
import { clientTls } from '../host/data-tls.js';
import { diskNodeName } from '../qemu/spec.js';
import { eventIs, type BlockdevMirrorArgs, type BlockdevOptions } from '../qmp/index.js';
import { QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceState } from './context.js';
import { exportName, mirrorJobId, targetNodeName } from './names.js';
import { cancelJob, deleteNode } from './primitives.js';
import type { ProgressTracker } from './progress.js';
import { errorText } from '../errors.js';
import { convergeActively } from './convergence/index.js';
import { MigrationError, type MigrationOptions, type MigrationPlan, type MirrorConvergence } from './types.js';

type PlanDisk = MigrationPlan['disks'][number];

/** The NBD client node the mirror of `disk` writes into: the destination's export over TCP. */
export function targetNodeArguments(ctx: MigrationContext, dest: DestinationState, disk: PlanDisk, tls: MigrationPlan['dataTls']): BlockdevOptions {
  return {
    driver: 'nbd',
    'node-name': targetNodeName(disk.id),
    server: { type: 'inet', host: ctx.req.destination.migrationHost, port: String(dest.nbdPort) },
    export: exportName(ctx.id, disk.id),
    // Over TLS the source checks that the destination's certificate names its migration address.
    ...(tls.encrypted ? clientTls(tls.destination.hostname) : {}),
  };
}

/** blockdev-mirror's arguments for one disk: every mirror option in one place. */
export function mirrorArguments(opts: { copyMode: 'background' | 'write-blocking' } & Pick<MigrationOptions, 'bandwidthBytesPerSec'>, disk: PlanDisk): BlockdevMirrorArgs {
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

/** Starts every mirror; returns the source's event cursor from before the first, for the waits on their events. */
export async function sourceStartMirrors(ctx: MigrationContext, input: { source: SourceState; dest: DestinationState; plan: MigrationPlan }): Promise<number> {
  const q = input.source.qmp;
  const since = q.eventCursor();
  const copyMode = input.dest.convergence?.mirrorCopyMode ?? 'background';
  for (const disk of input.plan.disks) {
    const node = targetNodeName(disk.id);
    ctx.undo.push(`delete source NBD node ${node}`, 'source', () => deleteNode(q, node, QMP_TIMEOUT_MS));
    await q.execute('blockdev-add', targetNodeArguments(ctx, input.dest, disk, input.plan.dataTls), ctx.call());
    const job = mirrorJobId(disk.id);
    ctx.undo.push(`cancel mirror ${job}`, 'source', () => cancelJob(q, job));
    await q.execute('blockdev-mirror', mirrorArguments({ ...ctx.opts, copyMode }, disk), ctx.call());
  }
  return since;
}

/**
 * How long copy mode auto lets the bulk copy run in background mode before it switches to
 * write-blocking without READY (a guest dirtying faster than the mirror copies), ms.
 */
export function activeSyncReadyBoundMs(plan: MigrationPlan): number {
  return Math.min(30_000, Math.round(plan.deadlineMs / 4));
}

/**
 * Until every mirror is READY, with progress events; then, on the active-sync path (copy mode
 * auto, a source with block-job-change), convergeActively: write-blocking from now on, and
 * every mirror actively-synced. Also switched when READY has not come within the bound.
 */
export async function sourceWaitMirrorsReady(
  ctx: MigrationContext,
  input: { source: SourceState; dest: DestinationState; plan: MigrationPlan; progress: ProgressTracker; mirrorsSince: number },
): Promise<MirrorConvergence> {
  const { source, dest, plan, progress, mirrorsSince } = input;
  const started = performance.now();
  const conv = dest.convergence;
  const bound = activeSyncReadyBoundMs(plan);
  let allReady = false;
  for (;;) {
    ctx.throwIfAborted();
    await ctx.throwIfDestinationDied(dest);
    const jobs = await sourceMirrorStates(ctx, source, plan);
    const snapshot = await progress.sample(source.qmp, { nbdPort: dest.nbdPort ?? 0 }, ctx.phase, ctx.opts.downtimeLimitMs, undefined);
    ctx.emit({ event: 'progress', migrationId: ctx.id, progress: snapshot });
    ctx.checkStalled(progress);
    allReady = jobs.every((j) => j.status === 'ready');
    if (allReady) break;
    if (conv?.activeSync && performance.now() - started > bound) break;
    await ctx.nap(source.qmp, (e) => e.event === 'BLOCK_JOB_READY' || e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_ERROR', mirrorsSince);
  }
  const readyMs = Math.round(performance.now() - started);
  const path = conv?.path ?? 'background';
  const nbdPort = dest.nbdPort ?? 0;
  if (!conv?.activeSync) return { path, relay: conv?.relay ?? false, nbdPort, readyMs };
  const synced = await convergeActively(
    source.qmp,
    plan.disks.map((d) => mirrorJobId(d.id)),
    { since: mirrorsSince, readyBoundMs: 1, timeoutMs: Math.max(10_000, plan.deadlineMs - (performance.now() - ctx.started)), signal: ctx.signal },
  ).catch((err: unknown) => {
    throw new MigrationError('MIRROR_NOT_CONVERGED', `copy mode auto: ${errorText(err)}`, { phase: ctx.phase, cause: err });
  });
  // convergeActively's times count from its own start, which is readyMs after the mirrors'.
  const switchedAtMs = readyMs + Math.max(...synced.map((j) => j.switchedAtMs));
  const syncedAtMs = readyMs + Math.max(...synced.map((j) => j.syncedAtMs));
  // Without READY before the bound, the mirrors were READY when seen actively-synced.
  return { path, relay: conv.relay, nbdPort, readyMs: allReady ? readyMs : syncedAtMs, switchedAtMs, syncedAtMs };
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
 * of the migration and a running job would forbid it. Inside the pause, so: every cancel at once,
 * then each mirror's BLOCK_JOB_COMPLETED (what a soft cancel of a READY mirror emits; its `error`
 * says a failure); the jobs are dismissed after `cont` (sourceDismissMirrors).
 */
export async function sourceCompleteMirrors(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  const q = input.source.qmp;
  const since = q.eventCursor();
  await Promise.all(input.plan.disks.map((disk) => q.execute('block-job-cancel', { device: mirrorJobId(disk.id) }, ctx.call())));
  await Promise.all(
    input.plan.disks.map(async (disk) => {
      const id = mirrorJobId(disk.id);
      const ev = await q.waitForEvent((e) => (eventIs(e, 'BLOCK_JOB_COMPLETED') || eventIs(e, 'BLOCK_JOB_CANCELLED')) && e.data.device === id, {
        since,
        timeoutMs: ctx.opts.commandTimeoutMs,
        signal: ctx.signal,
        what: `mirror ${id} to complete`,
      });
      const error = eventIs(ev, 'BLOCK_JOB_COMPLETED') ? ev.data.error : 'cancelled before it was complete';
      if (error !== undefined) throw new MigrationError('MIRROR_FAILED', `mirror of disk '${disk.id}' failed at switchover: ${error}`, { phase: ctx.phase, context: { job: id } });
    }),
  );
}

/** After `cont`: the completed mirrors are dismissed (auto-dismiss is off so a failure could be read). */
export async function sourceDismissMirrors(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  for (const disk of input.plan.disks) {
    const id = mirrorJobId(disk.id);
    ctx.undo.drop(`cancel mirror ${id}`);
    await input.source.qmp.execute('job-dismiss', { id }, { timeoutMs: ctx.opts.commandTimeoutMs });
  }
}

/** After `cont`: the NBD client nodes go (before the destination's exports can: QEMU refuses to drop an export in use). */
export async function sourceDetachTargets(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  for (const disk of input.plan.disks) await deleteNode(input.source.qmp, targetNodeName(disk.id), ctx.opts.commandTimeoutMs);
}
