/**
 * The migration engine: one running VM and its local disks move from a source QEMU to a
 * destination QEMU, QEMU-native. Read top to bottom, it is the phases of a migration, each a
 * function named by its side (libvirt's qemu_migration.c), its inputs and outputs explicit:
 *
 *   preflight            sourceBegin, sourcePreflight: probe, read the disks, refuse what cannot work
 *   prepare-destination  destinationPrepare: sparse target disks, QEMU -incoming defer -S, NBD exports
 *                        (lazy: sourceExportDisks first, and the targets are overlays backed by them)
 *   mirror               sourceStartMirrors, sourceWaitMirrorsReady (pre-copy only; copy mode
 *                        auto converges them: convergence/); delta: SourceDeltaPasses (source-delta.ts)
 *                        into overlays on the standby replica (destination-delta.ts)
 *   ram                  sourcePerformRam, sourceWaitPreSwitchover (convergence.ts steers)
 *   switchover           sourceCompleteMirrors (pre-copy), sourceContinue
 *   confirm              destinationIncomingComplete, destinationStopNbdServer (pre-copy),
 *                        destinationResume: `cont` on the destination = THE POINT OF NO RETURN
 *   hydrate              destinationHydrate (lazy only: the guest runs, the disks follow)
 *   cleanup              cleanupPrecopy | cleanupLazy, cleanupFinish: tidy steps, warnings only
 *
 * Until the destination's `cont` succeeds the source is authoritative: any failure or cancel
 * unwinds the undo stack (rollback.ts), which leaves the guest running on the source (resumed if
 * ferry paused it) and removes everything the destination got. After it, the source is never
 * resumed. How it ended is a MigrationOutcome (outcome.ts).
 */
import type { ConvergenceState } from './convergence.js';
import { cleanupFinish, cleanupLazy, cleanupPrecopy } from './cleanup.js';
import { sourceBeginDataTls } from './data-path.js';
import { MigrationContext, type DestinationState, type MigrateRequest, type SourceState } from './context.js';
import { destinationIncomingComplete, destinationResume } from './destination-finish.js';
import { isFerryReplicationBitmap, type DeltaReplica } from './delta.js';
import { destinationCloseRelay, destinationPrepare, destinationStopNbdServer } from './destination-prepare.js';
import { SourceDeltaPasses } from './source-delta.js';
import { destinationHydrate, sourceExportDisks, sourceReactivateDisks } from './lazy.js';
import { outcomeOfError, type MigrationOutcome } from './outcome.js';
import { ProgressTracker } from './progress.js';
import { fail } from './rollback.js';
import { sourceCompleteMirrors, sourceMirrorStates, sourceStartMirrors, sourceWaitMirrorsReady } from './source-mirror.js';
import { sourceContinue, sourceMigrationFigures, sourcePausedForMs, sourcePerformRam, sourceWaitPreSwitchover } from './source-perform.js';
import { destinationProbe, sourceBegin, sourcePreflight } from './source-preflight.js';
import { MigrationError, MigrationOptionsSchema, type MigrationPlan, type MigrationResult } from './types.js';

export type { MigrateRequest } from './context.js';

export async function planMigration(req: MigrateRequest): Promise<MigrationPlan> {
  const result = await migrate({ ...req, dryRun: true });
  return result.plan;
}

/** Runs a migration; resolves with its result, rejects with a MigrationError whose `outcome` says where the guest is. */
export async function migrate(req: MigrateRequest): Promise<MigrationResult> {
  const outcome = await migrateOutcome(req);
  if (outcome.kind === 'migrated') return outcome.result;
  throw outcome.error;
}

/** Runs a migration and says how it ended; never rejects. */
export async function migrateOutcome(req: MigrateRequest): Promise<MigrationOutcome> {
  try {
    return { kind: 'migrated', result: await runMigration(req) };
  } catch (err) {
    return outcomeOfError(err, req.signal?.aborted ?? false);
  }
}

async function runMigration(req: MigrateRequest): Promise<MigrationResult> {
  const parsed = MigrationOptionsSchema.safeParse(req.options ?? {});
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new MigrationError('OPTIONS_INVALID', `invalid migration option ${issue?.path.join('.') ?? ''}: ${issue?.message ?? ''}`, { phase: 'preflight', userError: true });
  }
  const ctx = new MigrationContext(req, parsed.data);
  let source: SourceState | undefined;
  try {
    await ctx.enter('preflight');
    const destinationBuild = destinationProbe(ctx);
    source = await sourceBegin(ctx);
    const plan = await sourcePreflight(ctx, source, destinationBuild);
    ctx.plannedDisks = plan.disks.map((d) => d.id);
    if (req.dryRun) {
      await source.qmp.close();
      return resultOf(ctx, plan, { downtimeMs: 0, qemuDowntimeMs: undefined, diskBytes: 0, ramBytes: 0, bitmapsMigrated: [], convergence: undefined });
    }
    if (req.delta) return await runDelta(ctx, source, plan, req.delta);
    return plan.mode === 'lazy' ? await runLazy(ctx, source, plan) : await runPrecopy(ctx, source, plan);
  } catch (err) {
    throw await fail(ctx, err, source);
  }
}

/** Pre-copy: the disks, then RAM, then the guest moves and runs at full speed from its first instant. */
async function runPrecopy(ctx: MigrationContext, source: SourceState, plan: MigrationPlan): Promise<MigrationResult> {
  const progress = new ProgressTracker(plan, ctx.req.source, ctx.opts.progressIntervalMs);
  await ctx.enter('prepare-destination');
  await sourceBeginDataTls(ctx, { source, plan });
  const dest = await destinationPrepare(ctx, { plan, sourceExport: undefined, sourceCaps: source.caps });
  await ctx.enter('mirror');
  const mirrorsSince = await sourceStartMirrors(ctx, { source, dest, plan });
  const { convergence: converged, watch } = await sourceWaitMirrorsReady(ctx, { source, dest, plan, progress, mirrorsSince });
  ctx.emit({ event: 'convergence', migrationId: ctx.id, action: 'mirrors-converged', mirrors: converged });
  let moved: Awaited<ReturnType<typeof moveGuest>>;
  try {
    moved = await moveGuest(ctx, { source, dest, plan, progress }, {
      checkMirrors: () => sourceMirrorStates(ctx, source, plan),
      completeMirrors: () => {
        watch.stop();
        return sourceCompleteMirrors(ctx, { source, plan });
      },
      // The writable exports go before `cont`, so the guest's devices take back their WRITE (issue 15 defect 17).
      beforeResume: () => destinationStopNbdServer(ctx, dest),
    });
  } finally {
    watch.stop();
  }
  const syncedAtMs = await watch.syncedAtMs;
  const mirrorConvergence = syncedAtMs === undefined ? converged : { ...converged, syncedAtMs };
  // The guest runs on the destination: nothing below can fail the migration, only warn.
  await ctx.enter('cleanup');
  const diskBytes = await progress.finalDiskBytes().catch(() => 0);
  await cleanupPrecopy(ctx, { source, dest, plan });
  const bitmapsMigrated = await cleanupFinish(ctx, { source, dest, plan });
  await ctx.enter('done');
  const result = resultOf(ctx, plan, { ...moved, diskBytes, ramBytes: progress.ramTransferred, bitmapsMigrated });
  return { ...result, convergence: { ...result.convergence, mirrors: mirrorConvergence } };
}

/**
 * Delta (delta.ts): the destination's disks are overlays on the VM's standby replica; backup
 * passes copy what changed since its point while the guest runs, the last one in the pause.
 */
async function runDelta(ctx: MigrationContext, source: SourceState, fullPlan: MigrationPlan, delta: DeltaReplica): Promise<MigrationResult> {
  // The replica's and the passes' bitmaps stay behind: migrating them would make them busy.
  const plan = { ...fullPlan, bitmaps: fullPlan.bitmaps.filter((b) => !isFerryReplicationBitmap(b.name)) };
  if (plan.bitmaps.length > 0) {
    throw new MigrationError('DELTA_BITMAPS', `evacuation by delta does not move other dirty bitmaps yet (found ${plan.bitmaps.map((b) => `${b.disk}/${b.name}`).join(', ')})`, { phase: 'preflight', userError: true });
  }
  const progress = new ProgressTracker({ ...plan, disks: [] }, ctx.req.source, ctx.opts.progressIntervalMs);
  ctx.enter('prepare-destination');
  await sourceBeginDataTls(ctx, { source, plan });
  const dest = await destinationPrepare(ctx, { plan, sourceExport: undefined, sourceCaps: source.caps });
  ctx.enter('mirror');
  const passes = new SourceDeltaPasses(ctx, { source, plan, delta });
  await passes.attach(dest);
  await passes.converge();
  passes.startBackground();
  const moved = await moveGuest(ctx, { source, dest, plan, progress }, {
    checkMirrors: async () => passes.check(),
    completeMirrors: () => passes.finish(),
    beforeResume: () => destinationStopNbdServer(ctx, dest),
  });
  ctx.enter('cleanup');
  await ctx.tidy('detach the delta passes', () => passes.detach());
  await ctx.tidy('close the NBD relay', () => destinationCloseRelay(ctx, dest));
  await cleanupFinish(ctx, { source, dest, plan });
  ctx.enter('done');
  const figures = passes.figures();
  const result = resultOf(ctx, plan, { ...moved, diskBytes: figures.bytes, ramBytes: progress.ramTransferred, bitmapsMigrated: [] });
  return { ...result, delta: figures };
}

/** Lazy: RAM only, the guest moves, and the disks hydrate behind it from the source's export. */
async function runLazy(ctx: MigrationContext, source: SourceState, plan: MigrationPlan): Promise<MigrationResult> {
  // No disk is copied before the guest moves, so progress until then is RAM only.
  const progress = new ProgressTracker({ ...plan, disks: [] }, ctx.req.source, ctx.opts.progressIntervalMs);
  await ctx.enter('prepare-destination');
  await sourceBeginDataTls(ctx, { source, plan });
  const sourceExport = await sourceExportDisks(ctx, { source, plan });
  const dest = await destinationPrepare(ctx, { plan, sourceExport, sourceCaps: source.caps });
  const moved = await moveGuest(ctx, { source, dest, plan, progress }, { checkMirrors: async () => undefined, completeMirrors: async () => undefined, beforeResume: async () => undefined });
  const destinationRunningMs = Math.round(performance.now() - ctx.started);
  // The guest runs on the destination and reads what it lacks from the source, which must
  // therefore stay up (paused, serving its export) until every overlay holds everything.
  await ctx.enter('hydrate');
  await ctx.tidy('activate the source disks again for its export', () => sourceReactivateDisks(ctx, { source, plan }));
  let hydration: Awaited<ReturnType<typeof destinationHydrate>>;
  try {
    hydration = await destinationHydrate(ctx, { dest, plan, sourceExport });
  } catch (err) {
    // The guest runs there whatever became of its hydration: its QEMU must outlive this process
    // (exit 4 says so), not go with it (issue 17's fault matrix, cell hydrate/kill-source-qemu).
    await ctx.tidy('release the destination QEMU to its host', () => dest.vm.release());
    throw err;
  }
  await ctx.enter('cleanup');
  await cleanupLazy(ctx, { source, plan });
  const bitmapsMigrated = await cleanupFinish(ctx, { source, dest, plan });
  await ctx.enter('done');
  const result = resultOf(ctx, plan, { ...moved, diskBytes: hydration.hydratedWireBytes ?? 0, ramBytes: progress.ramTransferred, bitmapsMigrated });
  return { ...result, lazy: { destinationRunningMs, ...hydration } };
}

/**
 * ram → switchover → confirm, the same in both modes but for the mirrors. Ends past the point of
 * no return. Between pre-switchover and `cont` only what must be there is: the mirrors' cancels,
 * migrate-continue and the source's completed event, the destination's, (pre-copy)
 * nbd-server-stop, `cont`; no query, and every figure is read after.
 */
async function moveGuest(
  ctx: MigrationContext,
  io: { source: SourceState; dest: DestinationState; plan: MigrationPlan; progress: ProgressTracker },
  mirrors: { checkMirrors: () => Promise<unknown>; completeMirrors: () => Promise<void>; beforeResume: () => Promise<void> },
): Promise<{ downtimeMs: number; qemuDowntimeMs: number | undefined; convergence: ConvergenceState }> {
  await ctx.enter('ram');
  const ram = await sourcePerformRam(ctx, io);
  const { convergence, seenAt } = await sourceWaitPreSwitchover(ctx, { ...io, ram, checkMirrors: mirrors.checkMirrors });
  await ctx.enter('switchover');
  await mirrors.completeMirrors();
  await sourceContinue(ctx, { source: io.source, ram });
  await ctx.enter('confirm');
  await destinationIncomingComplete(ctx, { dest: io.dest, ram });
  await mirrors.beforeResume();
  await destinationResume(ctx, io.dest);
  const resumedAt = performance.now();
  const pausedBeforeSeenMs = await sourcePausedForMs(io.source.qmp, ram.sourceSince);
  const qemuDowntimeMs = await sourceMigrationFigures(ctx, { source: io.source, progress: io.progress });
  return { downtimeMs: resumedAt - seenAt + pausedBeforeSeenMs, qemuDowntimeMs, convergence };
}

function resultOf(
  ctx: MigrationContext,
  plan: MigrationPlan,
  r: { downtimeMs: number; qemuDowntimeMs: number | undefined; diskBytes: number; ramBytes: number; bitmapsMigrated: { disk: string; name: string }[]; convergence: ConvergenceState | undefined },
): MigrationResult {
  return {
    ok: true,
    migrationId: ctx.id,
    plan,
    totalMs: Math.round(performance.now() - ctx.started),
    downtimeMs: Math.round(r.downtimeMs),
    qemuDowntimeMs: r.qemuDowntimeMs,
    diskBytes: r.diskBytes,
    ramBytes: r.ramBytes,
    phaseMs: ctx.phases.durations(),
    convergence: {
      downtimeLimitMs: r.convergence?.downtimeLimitMs ?? ctx.opts.downtimeLimitMs,
      autoConverge: ctx.opts.autoConverge,
      forced: r.convergence?.forced ?? false,
      steps: r.convergence?.steps ?? 0,
    },
    bitmapsMigrated: r.bitmapsMigrated,
  };
}
