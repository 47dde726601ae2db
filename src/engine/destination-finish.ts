/**
 * Destination finish (libvirt's qemuMigrationDstFinish): the incoming migration completes with
 * the guest paused and everything in place, then `cont` on the destination: THE POINT OF NO
 * RETURN. Before `cont` reaches the destination, the source can be resumed. After the destination
 * has run, even for an instant, it must never be: the two would diverge.
 */
import { errorText } from '../errors.js';
import { QmpCommandError } from '../qmp/index.js';
import type { DestinationState, MigrationContext } from './context.js';
import type { RamStarted } from './source-perform.js';
import { waitMigrationEnd } from './primitives.js';
import { MigrationError } from './types.js';

/**
 * The incoming migration completed: its own MIGRATION event says it (registered with the cursor
 * from before migrate-incoming). Nothing else is asked inside the pause: a destination QEMU
 * started with -S stays paused after it.
 */
export async function destinationIncomingComplete(ctx: MigrationContext, input: { dest: DestinationState; ram: RamStarted }): Promise<void> {
  const end = await waitMigrationEnd(input.dest.vm.qmp, { since: input.ram.destinationSince, timeoutMs: ctx.opts.commandTimeoutMs, signal: ctx.signal, what: "the destination's incoming migration to end", call: ctx.call() });
  if (end.status === 'completed') return;
  throw new MigrationError('DESTINATION_INCOMING_FAILED', `destination's incoming migration ${end.status}: ${end.errorDesc ?? ''}`, { phase: ctx.phase });
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
