/**
 * What a failure becomes. Before the point of no return the undo stack unwinds (the destination
 * QEMU first), and the source is asked where the guest is: proof, not hope. After it, nothing is
 * undone. The first error survives its cleanup; the outcome is decided here (outcome.ts).
 */
import { FerryError, errorText } from '../errors.js';
import { QmpDisconnectedError, type QmpClient } from '../qmp/index.js';
import { rollBackSource } from './recover.js';
import { STOP_DESTINATION, type MigrationContext, type SourceState } from './context.js';
import { classifyFailure } from './outcome.js';
import { sourceYankDestination } from './source-yank.js';
import { MigrationError, type Phase } from './types.js';

const YANK_STEP = "yank the source's connections to the destination";

type SourceAfter = Parameters<typeof classifyFailure>[1]['source'];

export async function fail(ctx: MigrationContext, err: unknown, source: SourceState | undefined): Promise<MigrationError> {
  const failedPhase = ctx.phase;
  const first = asMigrationError(ctx, err, failedPhase);
  const verdict = (where: SourceAfter, cleanupErrors: unknown[]): MigrationError => {
    // The source's death ended its session: that, not the session's end, is what happened.
    const died = where === 'gone' && causedBy(first.cause ?? err, (e) => e instanceof QmpDisconnectedError);
    // A destination that died on its own said why in its log: the reason goes into the error,
    // and where its log was kept (the rollback removes the rest of its run dir).
    const destExit = ctx.destinationExit;
    // Its death is what happened; what the source saw of it (a mirror's I/O error) came after.
    const destDied = !died && destExit !== undefined && first.code !== 'DESTINATION_DIED';
    const message = died
      ? `the source QEMU died during ${failedPhase} (${first.message})`
      : destDied
        ? `the destination QEMU exited during ${failedPhase} (${destExit}); ${first.message}`
        : first.message;
    return new MigrationError(died ? 'SOURCE_DIED' : destDied ? 'DESTINATION_DIED' : first.code, message, {
      phase: failedPhase,
      cause: first.cause ?? err,
      userError: first.userError,
      context: { ...first.context, ...(destExit ? { destinationExit: destExit } : {}), ...(ctx.keptDestinationLog ? { destinationLog: ctx.keptDestinationLog } : {}) },
      outcome: classifyFailure(first, { pastNoReturn: ctx.pastNoReturn, mode: ctx.opts.mode, source: where }),
      cleanupErrors: [...first.cleanupErrors, ...cleanupErrors],
    });
  };
  if (ctx.pastNoReturn) {
    // Nothing to roll back: the undo stack was emptied at the point of no return.
    await ctx.enter('failed');
    await source?.qmp.close().catch(() => undefined);
    return verdict('other', []);
  }
  ctx.log.warn({ err: errorText(first), phase: failedPhase }, 'migration failed, rolling back');
  if (ctx.undo.size > 0) await ctx.enter('rollback');
  const report = (step: string, stepErr: unknown, skipped?: string): void => {
    ctx.emit({ event: 'rollback', migrationId: ctx.id, step, ok: !stepErr, ...(stepErr ? { error: errorText(stepErr) } : {}), ...(skipped ? { skipped } : {}) });
    if (stepErr) ctx.log.error({ step, err: errorText(stepErr) }, 'rollback step failed');
  };
  // A source QEMU that died took its migration, mirrors and NBD nodes with it: the steps that
  // would undo them there have nothing left to undo, and saying they failed would be false.
  const sourceDied = source !== undefined && (await sourceQemuGone(ctx, source));
  const moot = (side: 'source' | 'destination', stepErr: unknown): string | undefined => {
    if (sourceDied && side === 'source' && causedBy(stepErr, (e) => e instanceof QmpDisconnectedError)) return 'the source QEMU is gone';
    // Its agent abandons an incoming VM that never ran once the tunnel to it is gone (src/agent).
    if (ctx.destinationUnreachable && side === 'destination') return 'the destination cannot be reached; its agent abandons what it holds of this migration';
    return undefined;
  };
  // The destination QEMU goes first. It never ran the guest, so killing it is always safe
  // here, and a destination that is alive but silent (frozen, partitioned) would otherwise
  // block the source's QEMU: its NBD client waits forever for replies on an open connection,
  // and every block operation on the source (blockdev-del, the reactivation inside `cont`)
  // waits with it. A dead peer makes them fail at once.
  const cleanupErrors = await ctx.undo.runNow(STOP_DESTINATION, report);
  // A destination dead or out of reach may leave the source's NBD client waiting on a silent
  // connection: cut it (and the migration's) before the source's steps wait on it too.
  if (source && !sourceDied && (ctx.destinationUnreachable || ctx.destinationDied || cleanupErrors.length > 0)) {
    const yanked = await sourceYankDestination(source.qmp, source.caps, { timeoutMs: 5_000, diskIds: ctx.plannedDisks }).then(
      (y) => (y.length ? y.map((i) => (i.type === 'migration' ? 'migration' : i['node-name'])).join(', ') : undefined),
      (yankErr: unknown) => {
        report(YANK_STEP, yankErr);
        return undefined;
      },
    );
    if (yanked) report(`${YANK_STEP} (${yanked})`, undefined);
  }
  cleanupErrors.push(...(await ctx.undo.runAll(report, { moot })));
  let where: SourceAfter = 'not-connected';
  if (source && !sourceDied) {
    const settled = await sourceSettleAgain(ctx, source, report);
    if (settled) {
      await source.qmp.close().catch(() => undefined);
      source = { ...source, qmp: settled };
      // What the broken session could not undo, the new one did.
      const undone = cleanupErrors.filter((e) => !causedBy(e, (x) => x instanceof QmpDisconnectedError));
      cleanupErrors.splice(0, cleanupErrors.length, ...undone);
    }
  }
  if (source) {
    const status = await source.qmp.execute('query-status', undefined, { timeoutMs: 5_000 }).catch(() => undefined);
    // The state it was found in: a refusal of a source paused by someone else's migration leaves it so.
    const expected = source.statusAtBegin ?? (source.wasRunning ? 'running' : 'paused');
    if (status?.status === expected) where = 'as-before';
    else if (status) where = 'other';
    else where = sourceDied || (await ctx.req.source.sourceGone().catch(() => false)) ? 'gone' : 'unreachable';
    // 'gone' is the verdict itself (outcome sourceDied), not a problem of the cleanup.
    if (where !== 'as-before' && where !== 'gone') {
      const seen = status?.status ?? 'unreachable';
      cleanupErrors.push(new MigrationError('SOURCE_STATE', `after rollback the source is '${seen}', expected ${expected}`, { phase: failedPhase }));
    }
    await source.qmp.close().catch(() => undefined);
  } else if (!first.userError && (await sourceGoneAskedAgain(ctx))) {
    // The source died while preflight was still connecting to or probing it (a socket that was
    // never there is a userError, a refusal): "runs as before" would be false (issue 17's matrix,
    // cell preflight/kill-source-qemu).
    where = 'gone';
  }
  await ctx.enter('failed');
  return verdict(where, cleanupErrors);
}

/** Bound on finding a restarted source agent again (systemd's Restart= takes a few seconds). */
const SOURCE_RECONNECT_MS = 15_000;

/**
 * The source's QMP session broke under the rollback, its QEMU not known to be gone (its agent was
 * restarted): the undo steps could not run. A new session, if its host offers one within a bound,
 * settles the source from what QEMU reports (recover.ts's rollBackSource: the migration, ferry's
 * mirrors and NBD nodes, the saved settings, `cont` if the guest ran before). Returns the session.
 */
async function sourceSettleAgain(ctx: MigrationContext, source: SourceState, report: (step: string, err: unknown) => void): Promise<QmpClient | undefined> {
  if (!ctx.req.source.reconnect) return undefined;
  const broken = await source.qmp.execute('query-status', undefined, { timeoutMs: 5_000 }).then(
    () => false,
    (err: unknown) => causedBy(err, (e) => e instanceof QmpDisconnectedError),
  );
  if (!broken) return undefined;
  const step = 'settle the source over a new QMP session';
  let q: QmpClient | undefined;
  try {
    q = await ctx.req.source.reconnect({ timeoutMs: SOURCE_RECONNECT_MS });
    const did = await rollBackSource(q, ctx.log, { saved: ctx.sourceSaved, timeoutMs: 30_000 });
    ctx.log.info({ did }, 'settled the source over a new QMP session');
    report(`${step}${did.length ? ` (${did.join('; ')})` : ''}`, undefined);
    return q;
  } catch (err) {
    report(step, err);
    await q?.close().catch(() => undefined);
    return undefined;
  }
}

/**
 * The source's QMP session ended and its host says its QEMU exited: proof it is gone. A QEMU
 * killed a moment ago may still be on its way out, so a "not sure" is asked again, briefly.
 */
async function sourceQemuGone(ctx: MigrationContext, source: SourceState): Promise<boolean> {
  const answered = await source.qmp.execute('query-status', undefined, { timeoutMs: 5_000 }).then(
    () => true,
    (err: unknown) => !(err instanceof QmpDisconnectedError),
  );
  if (answered) return false;
  return sourceGoneAskedAgain(ctx);
}

/** The host's word that the source QEMU exited, asked up to three times 300 ms apart. */
async function sourceGoneAskedAgain(ctx: MigrationContext): Promise<boolean> {
  for (let attempt = 0; attempt < 3; attempt++) {
    if (await ctx.req.source.sourceGone().catch(() => false)) return true;
    await new Promise((r) => setTimeout(r, 300));
  }
  return false;
}

function causedBy(err: unknown, is: (e: Error) => boolean): boolean {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) if (is(e)) return true;
  return false;
}

function asMigrationError(ctx: MigrationContext, err: unknown, phase: Phase): MigrationError {
  if (err instanceof MigrationError) return err;
  if (ctx.signal.aborted && (!(err instanceof FerryError) || err.code === 'QMP_ABORTED' || err.code === 'MIGRATION_CANCELLED')) {
    const cancelled = ctx.req.signal?.aborted ?? false;
    const reason = cancelled ? 'cancelled' : `total timeout of ${ctx.opts.totalTimeoutMs} ms reached`;
    return new MigrationError(cancelled ? 'CANCELLED' : 'TOTAL_TIMEOUT', `migration ${reason} during ${phase}`, { phase, cause: err });
  }
  if (err instanceof FerryError) return new MigrationError(err.code, `${phase}: ${err.message}`, { phase, cause: err, userError: err.userError, context: { ...err.context } });
  return new MigrationError('INTERNAL', `${phase}: ${errorText(err)}`, { phase, cause: err });
}
