/**
 * Source perform (libvirt's qemuMigrationSrcPerform): the RAM phase and the switchover up to the
 * source's side of it. Migration capabilities and parameters are saved before they are changed,
 * so a rollback (or a recovery after a crash: the `source-saved` event) leaves the source as it
 * was; the destination listens (migrate-incoming); `migrate` runs until pre-switchover, steered by
 * the convergence policy; at switchover `migrate-continue` lets QEMU send the last pages.
 */
import { eventIs, isEvent, type QmpClient } from '../qmp/index.js';
import { decideConvergence, startConvergence, type ConvergenceState } from './convergence.js';
import { onFreePort, QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceState } from './context.js';
import { migrationUri } from './data-path.js';
import { cancelAndResumeSource } from './primitives.js';
import type { ProgressTracker } from './progress.js';
import { targetNodeName } from './names.js';
import { MigrationError, type MigrationPlan, type SavedSourceSettings } from './types.js';

/** A safe "unlimited" for max-bandwidth: QEMU's default is 128 MiB/s, far below a local link. */
const UNLIMITED_BANDWIDTH = 2 ** 40;

/** Where the RAM migration stands once `migrate` was sent: the event cursors to wait from. */
export interface RamStarted {
  /** Source event cursor taken before `migrate`. */
  sourceSince: number;
  /** Destination event cursor taken before migrate-incoming. */
  destinationSince: number;
}

export type SavedSource = SavedSourceSettings;

/** Restores what sourcePerformRam changed: the capabilities it set, back to their saved state; the parameters. */
export async function restoreSourceSettings(q: QmpClient, saved: Omit<SavedSource, 'wasRunning'>, timeoutMs = QMP_TIMEOUT_MS): Promise<void> {
  if (saved.capabilities.length > 0) await q.execute('migrate-set-capabilities', { capabilities: saved.capabilities }, { timeoutMs });
  const params = Object.fromEntries(Object.entries(saved.parameters).filter(([, v]) => v !== undefined));
  if (Object.keys(params).length > 0) await q.execute('migrate-set-parameters', params, { timeoutMs });
}

export async function sourcePerformRam(ctx: MigrationContext, input: { source: SourceState; dest: DestinationState; plan: MigrationPlan }): Promise<RamStarted> {
  const { source, dest, plan } = input;
  const sq = source.qmp;
  const dq = dest.vm.qmp;
  const want: Record<string, boolean> = { events: true, 'pause-before-switchover': true };
  // Both sides' dirty-bitmaps capability was checked before anything was copied (preflight, prepare).
  const moveBitmaps = plan.bitmaps.length > 0;
  if (moveBitmaps) want['dirty-bitmaps'] = true;
  if (source.caps.migrationCapabilities.has('auto-converge')) want['auto-converge'] = ctx.opts.autoConverge;

  // Saved before they are changed, so a rollback leaves the source as it found it.
  const savedCaps = await sq.execute('query-migrate-capabilities', undefined, ctx.call());
  const savedParams = await sq.execute('query-migrate-parameters', undefined, ctx.call());
  const saved: SavedSource = {
    wasRunning: source.wasRunning,
    capabilities: savedCaps.filter((c) => c.capability in want).map((c) => ({ capability: c.capability, state: c.state })),
    parameters: { 'max-bandwidth': savedParams['max-bandwidth'], 'downtime-limit': savedParams['downtime-limit'] },
  };
  // Announced before the change: a scheduler persists it, so its recovery can put them back.
  ctx.emit({ event: 'source-saved', migrationId: ctx.id, saved });
  ctx.undo.push('restore source migration settings', 'source', () => restoreSourceSettings(sq, saved));
  await sq.execute('migrate-set-capabilities', { capabilities: Object.entries(want).map(([capability, state]) => ({ capability, state })) }, ctx.call());
  await sq.execute('migrate-set-parameters', { 'max-bandwidth': ctx.opts.bandwidthBytesPerSec ?? UNLIMITED_BANDWIDTH, 'downtime-limit': ctx.opts.downtimeLimitMs }, ctx.call());

  const destCaps: { capability: string; state: boolean }[] = [{ capability: 'events', state: true }];
  // Like libvirt: the destination's disks are activated by `cont`, not when RAM arrives.
  if (dest.caps.migrationCapabilities.has('late-block-activate')) destCaps.push({ capability: 'late-block-activate', state: true });
  if (moveBitmaps) destCaps.push({ capability: 'dirty-bitmaps', state: true });
  await dq.execute('migrate-set-capabilities', { capabilities: destCaps }, ctx.call());
  const destinationSince = dq.eventCursor();
  const host = ctx.req.destination.migrationHost;
  const port = await onFreePort(ctx, (p) => dq.execute('migrate-incoming', { uri: migrationUri(host, p) }, ctx.call()), { host, ports: ctx.req.destination.candidatePorts() });

  const sourceSince = sq.eventCursor();
  // From here until the destination runs, cancelling means: cancel the migration, resume the
  // source if ferry paused it. The undo does exactly that, in every later state; it is registered
  // before `migrate`, so a lost reply cannot leave a migration running.
  const targetNodes = plan.mode === 'lazy' ? [] : plan.disks.map((d) => targetNodeName(d.id));
  ctx.undo.push('cancel migration and resume source', 'source', async () => {
    await cancelAndResumeSource(sq, { wasRunning: source.wasRunning, targetNodes, timeoutMs: QMP_TIMEOUT_MS });
  });
  await sq.execute('migrate', { uri: migrationUri(host, port) }, ctx.call());
  return { sourceSince, destinationSince };
}

/**
 * Polls until the source reaches pre-switchover (the guest paused), applying the convergence
 * policy at each poll. Returns the final convergence state, for the result.
 */
export async function sourceWaitPreSwitchover(
  ctx: MigrationContext,
  input: { source: SourceState; dest: DestinationState; plan: MigrationPlan; progress: ProgressTracker; ram: RamStarted; checkMirrors: () => Promise<unknown> },
): Promise<ConvergenceState> {
  const { source, dest, plan, progress, ram } = input;
  const deadline = ctx.started + plan.deadlineMs;
  const policy = { maxDowntimeLimitMs: ctx.opts.maxDowntimeLimitMs, onDeadline: ctx.opts.onDeadline, deadlineMs: plan.deadlineMs };
  let convergence = startConvergence(ctx.opts.downtimeLimitMs);
  for (;;) {
    ctx.throwIfAborted();
    ctx.throwIfDestinationDied(dest);
    const mig = await source.qmp.execute('query-migrate', undefined, ctx.call());
    if (mig.status === 'pre-switchover') return convergence;
    if (mig.status === 'failed' || mig.status === 'cancelled') {
      throw new MigrationError('RAM_MIGRATION_FAILED', `migration ${mig.status}: ${mig['error-desc'] ?? 'no reason given'}`, { phase: ctx.phase });
    }
    await input.checkMirrors();
    const snapshot = await progress.sample(source.qmp, { nbdPort: dest.nbdPort ?? 0 }, ctx.phase, convergence.downtimeLimitMs, mig);
    ctx.emit({ event: 'progress', migrationId: ctx.id, progress: snapshot });
    ctx.checkStalled(progress);

    const sample = { dirtySyncCount: mig.ram?.['dirty-sync-count'] ?? 0, remainingBytes: mig.ram?.remaining ?? 0, mbps: mig.ram?.mbps, pastDeadline: performance.now() > deadline };
    const decided = decideConvergence(convergence, sample, policy);
    convergence = decided.state;
    for (const a of decided.actions) {
      if (a.action === 'deadline-abort') {
        ctx.emit({ event: 'convergence', migrationId: ctx.id, ...a });
        throw new MigrationError('DEADLINE', `migration did not converge within its deadline of ${plan.deadlineMs} ms (policy: abort)`, { phase: ctx.phase });
      }
      if (a.action === 'deadline-force') ctx.emit({ event: 'convergence', migrationId: ctx.id, ...a });
      await source.qmp.execute('migrate-set-parameters', { 'downtime-limit': a.downtimeLimitMs }, ctx.call());
      ctx.log.info({ downtimeLimitMs: a.downtimeLimitMs, why: a.detail }, 'downtime limit raised');
      // Every change of the limit is announced as a step; a forced one was announced above too.
      ctx.emit({ event: 'convergence', migrationId: ctx.id, action: 'downtime-step', downtimeLimitMs: a.downtimeLimitMs, detail: a.action === 'deadline-force' ? 'deadline passed, forcing switchover' : a.detail });
    }
    await ctx.nap(source.qmp, (e) => e.event === 'MIGRATION', ram.sourceSince);
  }
}

/**
 * How long the guest has been paused when pre-switchover is seen: QEMU stops the vCPUs first.
 * Both timestamps come from the source's clock, so the downtime figure has no cross-host skew.
 */
export async function sourcePausedForMs(q: QmpClient, since: number): Promise<number> {
  try {
    const opts = { since, timeoutMs: 50 };
    const stop = await q.waitForEvent(isEvent('STOP'), opts);
    const pre = await q.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'pre-switchover', opts);
    const ms = (t: { seconds: number; microseconds: number }): number => t.seconds * 1000 + t.microseconds / 1000;
    return Math.max(0, ms(pre.timestamp) - ms(stop.timestamp));
  } catch {
    return 0;
  }
}

/** migrate-continue: QEMU sends the last pages and the device state; returns QEMU's downtime figure. */
export async function sourceContinue(ctx: MigrationContext, input: { source: SourceState; ram: RamStarted; progress: ProgressTracker }): Promise<number | undefined> {
  const q = input.source.qmp;
  await q.execute('migrate-continue', { state: 'pre-switchover' }, ctx.call());
  const ev = await q.waitForEvent((e) => eventIs(e, 'MIGRATION') && ['completed', 'failed', 'cancelled'].includes(e.data.status), {
    since: input.ram.sourceSince,
    timeoutMs: ctx.opts.progressTimeoutMs,
    signal: ctx.signal,
    what: 'the source migration to complete',
  });
  const mig = await q.execute('query-migrate', undefined, ctx.call());
  if (!eventIs(ev, 'MIGRATION') || mig.status !== 'completed') {
    throw new MigrationError('SWITCHOVER_FAILED', `switchover failed: ${mig['error-desc'] ?? mig.status ?? 'unknown'}`, { phase: ctx.phase });
  }
  input.progress.recordFinalRam(mig);
  return mig.downtime;
}
