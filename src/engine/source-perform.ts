/**
 * Source perform (libvirt's qemuMigrationSrcPerform): the RAM phase and the switchover up to the
 * source's side of it. Migration capabilities and parameters are saved before they are changed,
 * so a rollback (or a recovery after a crash: the `source-saved` event) leaves the source as it
 * was; the destination listens (migrate-incoming); `migrate` runs until pre-switchover, steered by
 * the convergence policy; at switchover `migrate-continue` lets QEMU send the last pages.
 */
import { errorText } from '../errors.js';
import { eventIs, isEvent, type QmpClient } from '../qmp/index.js';
import { decideConvergence, startConvergence, type ConvergenceState } from './convergence.js';
import { onFreePort, QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceState } from './context.js';
import { migrationUri } from './data-path.js';
import { cancelAndResumeSource, waitMigrationEnd } from './primitives.js';
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
  // Both sides' multifd capability was checked before anything was copied (preflight, prepare).
  const multifd = ctx.opts.multifdChannels;
  if (multifd > 0) want['multifd'] = true;

  // Saved before they are changed, so a rollback leaves the source as it found it.
  const savedCaps = await sq.execute('query-migrate-capabilities', undefined, ctx.call());
  const savedParams = await sq.execute('query-migrate-parameters', undefined, ctx.call());
  const saved: SavedSource = {
    wasRunning: source.wasRunning,
    capabilities: savedCaps.filter((c) => c.capability in want).map((c) => ({ capability: c.capability, state: c.state })),
    parameters: { 'max-bandwidth': savedParams['max-bandwidth'], 'downtime-limit': savedParams['downtime-limit'], ...(multifd > 0 ? { 'multifd-channels': savedParams['multifd-channels'] } : {}) },
  };
  // Announced before the change: a scheduler persists it, so its recovery can put them back.
  const savedEvent = { event: 'source-saved', migrationId: ctx.id, saved } as const;
  ctx.emit(savedEvent);
  ctx.sourceSaved = saved;
  await ctx.persist(savedEvent);
  ctx.undo.push('restore source migration settings', 'source', () => restoreSourceSettings(sq, saved));
  await sq.execute('migrate-set-capabilities', { capabilities: Object.entries(want).map(([capability, state]) => ({ capability, state })) }, ctx.call());
  await sq.execute('migrate-set-parameters', { 'max-bandwidth': ctx.opts.bandwidthBytesPerSec ?? UNLIMITED_BANDWIDTH, 'downtime-limit': ctx.opts.downtimeLimitMs, ...(multifd > 0 ? { 'multifd-channels': multifd } : {}) }, ctx.call());

  const destCaps: { capability: string; state: boolean }[] = [{ capability: 'events', state: true }];
  // Like libvirt: the destination's disks are activated by `cont`, not when RAM arrives.
  if (dest.caps.migrationCapabilities.has('late-block-activate')) destCaps.push({ capability: 'late-block-activate', state: true });
  if (moveBitmaps) destCaps.push({ capability: 'dirty-bitmaps', state: true });
  if (multifd > 0) destCaps.push({ capability: 'multifd', state: true });
  await dq.execute('migrate-set-capabilities', { capabilities: destCaps }, ctx.call());
  // Both ends must agree on the channel count before the destination listens.
  if (multifd > 0) await dq.execute('migrate-set-parameters', { 'multifd-channels': multifd }, ctx.call());
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
 * Until the source reaches pre-switchover (the guest paused). One waiter for the MIGRATION event
 * (pre-switchover, failed, cancelled), registered with the cursor from before `migrate`, races
 * the poll loop that applies the convergence policy and reports progress: the switchover starts
 * the instant the event arrives, not after a loop body (query-jobs, a progress sample, an `ss`
 * spawn, query-migrate). Returns the final convergence state, for the result, and when the
 * event was seen (performance.now()).
 */
export async function sourceWaitPreSwitchover(
  ctx: MigrationContext,
  input: { source: SourceState; dest: DestinationState; plan: MigrationPlan; progress: ProgressTracker; ram: RamStarted; checkMirrors: () => Promise<unknown> },
): Promise<{ convergence: ConvergenceState; seenAt: number }> {
  const q = input.source.qmp;
  const stop = new AbortController();
  const state = { convergence: startConvergence(ctx.opts.downtimeLimitMs) };
  const reached = q.waitForEvent((e) => eventIs(e, 'MIGRATION') && ['pre-switchover', 'failed', 'cancelled'].includes(e.data.status), {
    since: input.ram.sourceSince,
    timeoutMs: ctx.opts.totalTimeoutMs,
    signal: AbortSignal.any([ctx.signal, stop.signal]),
    what: 'the source migration to reach pre-switchover',
  });
  const polling = sourcePollRam(ctx, input, state, stop.signal);
  // Whichever loses is stopped and its end ignored; the poll loop looks at `stop` after each step.
  reached.catch(() => undefined);
  polling.catch(() => undefined);
  try {
    const ev = await Promise.race([reached, polling.then(() => reached)]);
    const seenAt = performance.now();
    if (eventIs(ev, 'MIGRATION') && ev.data.status !== 'pre-switchover') {
      const mig = await q.execute('query-migrate', undefined, ctx.call()).catch(() => undefined);
      throw new MigrationError('RAM_MIGRATION_FAILED', `migration ${ev.data.status}: ${mig?.['error-desc'] ?? 'no reason given'}`, { phase: ctx.phase });
    }
    return { convergence: state.convergence, seenAt };
  } finally {
    stop.abort();
  }
}

/** The RAM phase's poll loop: progress, stall and mirror checks, the convergence policy. Ends only by throwing, or when `stop` fires. */
async function sourcePollRam(
  ctx: MigrationContext,
  input: { source: SourceState; dest: DestinationState; plan: MigrationPlan; progress: ProgressTracker; ram: RamStarted; checkMirrors: () => Promise<unknown> },
  state: { convergence: ConvergenceState },
  stop: AbortSignal,
): Promise<void> {
  const { source, dest, plan, progress, ram } = input;
  const deadline = ctx.started + plan.deadlineMs;
  const policy = { maxDowntimeLimitMs: ctx.opts.maxDowntimeLimitMs, onDeadline: ctx.opts.onDeadline, deadlineMs: plan.deadlineMs };
  for (;;) {
    if (stop.aborted) return;
    ctx.throwIfAborted();
    await ctx.throwIfDestinationDied(dest);
    const mig = await source.qmp.execute('query-migrate', undefined, ctx.call());
    if (stop.aborted || ['pre-switchover', 'failed', 'cancelled'].includes(mig.status ?? '')) return;
    await input.checkMirrors();
    if (stop.aborted) return;
    const snapshot = await progress.sample(source.qmp, { nbdPort: dest.nbdPort ?? 0 }, ctx.phase, state.convergence.downtimeLimitMs, mig);
    if (stop.aborted) return;
    ctx.emit({ event: 'progress', migrationId: ctx.id, progress: snapshot });
    ctx.checkStalled(progress);

    const sample = { dirtySyncCount: mig.ram?.['dirty-sync-count'] ?? 0, remainingBytes: mig.ram?.remaining ?? 0, mbps: mig.ram?.mbps, pastDeadline: performance.now() > deadline };
    const decided = decideConvergence(state.convergence, sample, policy);
    state.convergence = decided.state;
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
    if (stop.aborted) return;
    await ctx.nap(source.qmp, (e) => e.event === 'MIGRATION', ram.sourceSince);
  }
}

/**
 * How long the guest had been paused when pre-switchover was seen: QEMU stops the vCPUs first.
 * Both timestamps come from the source's clock, so the figure has no cross-host skew. Asked
 * after `cont` (its short wait for a STOP that never came must not lengthen the pause).
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

/**
 * migrate-continue: QEMU sends the last pages and the device state; until the source's completed
 * event (registered with the cursor from before `migrate`). Nothing is asked on the happy path:
 * QEMU's downtime figure is read after `cont` (sourceMigrationFigures).
 */
export async function sourceContinue(ctx: MigrationContext, input: { source: SourceState; ram: RamStarted }): Promise<void> {
  const q = input.source.qmp;
  await q.execute('migrate-continue', { state: 'pre-switchover' }, ctx.call());
  const end = await waitMigrationEnd(q, { since: input.ram.sourceSince, timeoutMs: ctx.opts.progressTimeoutMs, signal: ctx.signal, what: 'the source migration to complete', call: ctx.call() });
  if (end.status === 'completed') return;
  throw new MigrationError('SWITCHOVER_FAILED', `switchover failed: ${end.errorDesc ?? end.status}`, { phase: ctx.phase });
}

/**
 * After `cont`: the source's own view of the migration that ended, its QEMU downtime figure and
 * the RAM totals. Past the point of no return, so a source that says otherwise is only a warning.
 */
export async function sourceMigrationFigures(ctx: MigrationContext, input: { source: SourceState; progress: ProgressTracker }): Promise<number | undefined> {
  try {
    const mig = await input.source.qmp.execute('query-migrate', undefined, { timeoutMs: ctx.opts.commandTimeoutMs });
    if (mig.status !== 'completed') ctx.warn(`the source reports its migration ${mig.status ?? 'unknown'} after the destination completed and runs`);
    input.progress.recordFinalRam(mig);
    return mig.downtime;
  } catch (err) {
    ctx.warn(`could not read the source's migration figures: ${errorText(err)}`);
    return undefined;
  }
}
