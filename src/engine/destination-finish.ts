/**
 * Destination finish (libvirt's qemuMigrationDstFinish): the incoming migration completes with
 * the guest paused and everything in place, then `cont` on the destination: THE POINT OF NO
 * RETURN. Before `cont` reaches the destination, the source can be resumed. After the destination
 * has run, even for an instant, it must never be: the two would diverge.
 */
import { errorText } from '../errors.js';
import { eventIs, QmpCommandError, type QmpEvent } from '../qmp/index.js';
import type { DestinationState, MigrationContext, SourceState } from './context.js';
import type { RamStarted } from './source-perform.js';
import { MigrationError } from './types.js';

/**
 * The incoming migration completed: its own MIGRATION event says it (registered with the cursor
 * from before migrate-incoming), raced against the source's failed/cancelled. Nothing else is
 * asked inside the pause: a destination QEMU started with -S stays paused after it.
 */
export async function destinationIncomingComplete(ctx: MigrationContext, input: { dest: DestinationState; source: SourceState; ram: RamStarted }): Promise<void> {
  const stop = new AbortController();
  const signal = AbortSignal.any([ctx.signal, stop.signal]);
  const timeoutMs = ctx.opts.progressTimeoutMs;
  const ended = (e: QmpEvent, statuses: string[]): boolean => eventIs(e, 'MIGRATION') && statuses.includes(e.data.status);
  const destination = input.dest.vm.qmp
    .waitForEvent((e) => ended(e, ['completed', 'failed', 'cancelled']), { since: input.ram.destinationSince, timeoutMs, signal, what: "the destination's incoming migration to end" })
    .then((e) => ({ side: 'destination' as const, status: eventIs(e, 'MIGRATION') ? e.data.status : 'unknown' }));
  const source = input.source.qmp
    .waitForEvent((e) => ended(e, ['failed', 'cancelled']), { since: input.ram.sourceSince, timeoutMs, signal, what: 'the source migration to fail' })
    .then((e) => ({ side: 'source' as const, status: eventIs(e, 'MIGRATION') ? e.data.status : 'unknown' }));
  destination.catch(() => undefined);
  source.catch(() => undefined);
  try {
    const first = await Promise.race([destination, source]);
    if (first.side === 'destination' && first.status === 'completed') return;
    const q = first.side === 'destination' ? input.dest.vm.qmp : input.source.qmp;
    const mig = await q.execute('query-migrate', undefined, ctx.call()).catch(() => undefined);
    throw first.side === 'destination'
      ? new MigrationError('DESTINATION_INCOMING_FAILED', `destination's incoming migration ${first.status}: ${mig?.['error-desc'] ?? ''}`, { phase: ctx.phase })
      : new MigrationError('SWITCHOVER_FAILED', `switchover failed: ${mig?.['error-desc'] ?? first.status}`, { phase: ctx.phase });
  } finally {
    stop.abort();
  }
}

/**
 * `cont` on the destination. A clear refusal from QEMU means it did not run: the rollback resumes
 * the source. A lost reply means nobody can know: the source stays paused (outcome uncertain).
 * Once it runs, the context passes the point of no return and nothing after this can fail the
 * migration.
 */
export async function destinationResume(ctx: MigrationContext, dest: DestinationState): Promise<void> {
  ctx.throwIfAborted();
  ctx.emit({ event: 'point-of-no-return', migrationId: ctx.id, destinationPid: dest.vm.pid });
  const timeoutMs = ctx.opts.commandTimeoutMs;
  try {
    await dest.vm.qmp.execute('cont', undefined, { timeoutMs });
  } catch (err) {
    if (err instanceof QmpCommandError) throw err;
    // No answer: ask again on the same session if it still stands.
    const status = await dest.vm.qmp.execute('query-status', undefined, { timeoutMs }).catch(() => undefined);
    ctx.passNoReturn();
    if (status?.status === 'running') {
      ctx.log.info('destination running: point of no return passed');
      return;
    }
    throw new MigrationError(
      'SWITCHOVER_UNCERTAIN',
      `the destination's 'cont' got no answer (${errorText(err)}); the destination may have run, so the source stays paused. Check the destination QEMU (pid ${dest.vm.pid}) before resuming anything.`,
      { phase: ctx.phase, cause: err, outcome: 'uncertain' },
    );
  }
  ctx.passNoReturn();
  ctx.log.info('destination running: point of no return passed');
  await ctx.tidy('confirm the destination runs', async () => {
    const status = await dest.vm.qmp.execute('query-status', undefined, { timeoutMs });
    if (status.status !== 'running') ctx.log.warn({ status: status.status }, 'destination not running right after cont');
  });
}
