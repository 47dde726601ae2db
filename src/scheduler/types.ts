/**
 * The scheduler's vocabulary. The scheduler decides what moves when; an Inventory tells it what
 * the hosts have, a MigrationRunner moves one VM (the engine through two agents), and a
 * Reconciler settles a migration that was in flight when the scheduler died.
 */
import type { FailedOutcome, MigrationOutcome } from '../engine/outcome.js';
import type { SavedSourceSettings } from '../engine/types.js';
import { FerryError } from '../errors.js';

export interface HostInfo {
  name: string;
  /** What the host can still give to new VMs. */
  freeMemoryMiB: number;
  freeDiskBytes: number;
}

export interface VmInfo {
  name: string;
  host: string;
  memoryMiB: number;
  /** Bytes its disks occupy (allocated), what a copy needs at the destination. */
  diskBytes: number;
}

export interface Inventory {
  hosts(): Promise<HostInfo[]>;
  vms(): Promise<VmInfo[]>;
  /** One running VM by name, or undefined. */
  vm(name: string): Promise<VmInfo | undefined>;
}

/**
 * needs-source: past the point of no return the guest runs on the destination but still reads from
 * the source (lazy mode's hydration failed): never retried, the source must stay up; an operator
 * (or the next scheduler start) finishes it.
 */
export const MIGRATION_STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled', 'needs-source'] as const;
export type MigrationState = (typeof MIGRATION_STATES)[number];
export const TERMINAL: ReadonlySet<MigrationState> = new Set(['succeeded', 'failed', 'cancelled', 'needs-source']);

export type Reason = 'drain' | 'manual' | 'rebalance';
export type MigrationMode = 'precopy' | 'lazy';
/** A drain empties a host someone worries about: it goes first. */
export const PRIORITY: Record<Reason, number> = { drain: 20, manual: 10, rebalance: 0 };

export interface MigrationJob {
  id: string;
  vm: string;
  from: string;
  to: string;
  reason: Reason;
  priority: number;
  /** precopy or lazy (the engine's mode). */
  mode: MigrationMode;
  state: MigrationState;
  attempts: number;
  phase: string | null;
  error: string | null;
  bandwidthBytesPerSec: number | null;
  /** What the VM needs at the destination, reserved there while the migration is active. */
  memoryMiB: number;
  diskBytes: number;
  /** Not to be started before this time (ms since epoch): retry backoff. */
  notBefore: number;
  createdAt: number;
  updatedAt: number;
  /** Order of arrival, for FIFO among equal priorities. */
  seq: number;
}

export interface MigrationProgress {
  phase: string;
  doneBytes: number;
  totalBytes: number;
  bytesPerSec: number;
  etaMs: number | null;
}

/** The fencing epoch of a claim (shared store), sent with every agent call made under it. */
export interface Fence {
  epoch: number;
}

export interface RunContext {
  signal: AbortSignal;
  bandwidthBytesPerSec: number;
  /** Shared store: the claim's epoch; the agents refuse calls once they have seen a later one. */
  fence?: Fence;
  /** Persisted before the engine takes the phase's first step (the engine awaits it). */
  onPhase(phase: string): Promise<void> | void;
  /** The source's settings before the engine changed them: persisted before the engine goes on. */
  onSourceSaved?(saved: SavedSourceSettings): Promise<void> | void;
  /** Bytes moved so far of those to move (disk copy or hydration, and RAM), for `ferry watch`. */
  onProgress?(p: MigrationProgress): void;
}

export interface MigrationRunner {
  /** Moves the VM and says how that ended; a rejection means nothing was changed (see `retryable`). */
  run(job: MigrationJob, ctx: RunContext): Promise<MigrationOutcome>;
}

export type WhereRuns = 'from' | 'to' | 'unknown';
export interface Reconciler {
  /**
   * For a migration that was running when the scheduler died: finish it or roll it back, and say
   * which host runs the guest now. 'unknown' leaves everything as found, for an operator.
   */
  settle(job: MigrationJob, saved: SavedSourceSettings | undefined, fence?: Fence): Promise<{ runsOn: WhereRuns; detail: string }>;
}

export class SchedulerError extends FerryError {
  override name = 'SchedulerError';
}

/** A failure worth another attempt: rolled back, and not a mistake in the request. */
export function retryable(outcome: FailedOutcome): boolean {
  return outcome.kind === 'rolledBack' && !outcome.userError;
}
