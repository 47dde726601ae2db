/**
 * What a migration ended in, as one discriminated union: every caller (migrate-vm, the scheduler's
 * runner) switches on `kind` and handles each case, checked by `assertNever`, instead of reading
 * strings off an error.
 */
import { FerryError, errorText } from '../errors.js';
import { MigrationError, type FailureKind, type MigrationResult } from './types.js';

export type MigrationOutcome =
  /** The guest runs on the destination; the source QEMU has exited. Warnings: tidy steps that failed. */
  | { kind: 'migrated'; result: MigrationResult }
  /** The source runs the guest as before. `cancelled`: by the caller's signal. */
  | { kind: 'rolledBack'; error: MigrationError; cancelled: boolean; userError: boolean }
  /** The destination runs the guest and reads what it lacks from the source: keep the source up. */
  | { kind: 'onDestinationNeedsSource'; error: MigrationError }
  /** No QEMU runs the guest: the source died before the switchover, the destination was removed. */
  | { kind: 'sourceDied'; error: MigrationError }
  /** The destination may have run: nothing was resumed. */
  | { kind: 'uncertain'; error: MigrationError };

export type FailedOutcome = Exclude<MigrationOutcome, { kind: 'migrated' }>;

export function assertNever(x: never): never {
  throw new FerryError('INTERNAL', `unhandled case ${JSON.stringify(x)}`);
}

/**
 * The outcome a thrown error stands for. A MigrationError carries the engine's verdict; anything
 * else was thrown before the engine touched a QEMU (an agent unreachable): nothing changed.
 */
export function outcomeOfError(err: unknown, cancelled = false): FailedOutcome {
  const error =
    err instanceof MigrationError
      ? err
      : new MigrationError(err instanceof FerryError ? err.code : 'INTERNAL', errorText(err), {
          phase: 'preflight',
          cause: err,
          userError: err instanceof FerryError && err.userError,
        });
  const kind: FailureKind = error.outcome;
  switch (kind) {
    case 'rolledBack':
      return { kind, error, cancelled: cancelled || error.code === 'CANCELLED', userError: error.userError };
    case 'onDestinationNeedsSource':
    case 'sourceDied':
    case 'uncertain':
      return { kind, error };
    default:
      return assertNever(kind);
  }
}

/**
 * Which outcome a failure stands for, given how far the migration got. Before the point of no
 * return the rollback decides (the source answers as expected, is gone, or cannot be asked).
 * After it, lazy mode's guest still needs the source; pre-copy's steps after `cont` never throw,
 * so an error there is a bug whose effect nobody can vouch for.
 */
export function classifyFailure(
  err: MigrationError,
  at: { pastNoReturn: boolean; mode: 'precopy' | 'lazy'; source: 'as-before' | 'gone' | 'unreachable' | 'other' | 'not-connected' },
): FailureKind {
  if (err.outcome === 'uncertain') return 'uncertain';
  if (at.pastNoReturn) return at.mode === 'lazy' ? 'onDestinationNeedsSource' : 'uncertain';
  switch (at.source) {
    case 'as-before':
    case 'not-connected':
    case 'other':
      return 'rolledBack';
    case 'gone':
      return 'sourceDied';
    case 'unreachable':
      return 'uncertain';
    default:
      return assertNever(at.source);
  }
}
