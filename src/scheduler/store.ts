/**
 * The scheduler's durable state, behind one interface with two stores:
 *   SqliteStore    one file (WAL) beside one scheduler: the embedded default (sqlite-store.ts)
 *   PostgresStore  one database shared by any number of scheduler replicas (pg-store.ts)
 * chosen by the config's database: a `postgres://` / `postgresql://` URL, else a file path.
 * Both keep the same tables at the same schema version (migrations and their journal); every
 * change is a transaction that updates the row and appends to the journal, committed before the
 * scheduler acts on it, so a crash leaves a state a restart (or another replica) can reconcile.
 *
 *   queued ──start──► running ──► succeeded | failed | cancelled | needs-source
 *     │                  └──retry / recovery──► queued
 *     └──cancel──► cancelled
 *
 * One active (queued or running) migration per VM is a UNIQUE partial index, not a check in
 * code: two schedulers racing, or a bug, cannot make a VM move twice at once.
 *
 * A shared store adds leases: a replica claims a migration (an owner, a lease expiry it renews
 * by heartbeats, and an epoch from a sequence that only grows); every write about a claimed
 * migration carries the claim and is refused once the claim is no longer the current one.
 */
import { z } from 'zod';
import type { SavedSourceSettings } from '../engine/types.js';
import { MIGRATION_STATES, type MigrationJob, type MigrationMode, type MigrationState, type Reason } from './types.js';

export const SCHEMA_VERSION = 5;

export const ALLOWED: Record<MigrationState, readonly MigrationState[]> = {
  queued: ['running', 'cancelled', 'failed'],
  running: ['succeeded', 'failed', 'cancelled', 'queued', 'needs-source'],
  succeeded: [],
  failed: [],
  cancelled: [],
  // A restart that finishes the hydration hands the migration over.
  'needs-source': ['succeeded'],
};

/** PostgreSQL returns BIGINT as text (it may not fit a double); ours are ms and counters, which do. */
const int = z.union([z.number().int(), z.string().regex(/^-?\d+$/).transform(Number)]);
const num = z.union([z.number(), z.string().regex(/^-?\d+(\.\d+)?(e[+-]?\d+)?$/i).transform(Number)]);

export const rowSchema = z.object({
  id: z.string(),
  vm: z.string(),
  src: z.string(),
  dst: z.string(),
  reason: z.enum(['drain', 'manual', 'rebalance']),
  priority: int,
  mode: z.enum(['precopy', 'lazy']),
  state: z.enum(MIGRATION_STATES),
  attempts: int,
  phase: z.string().nullable(),
  error: z.string().nullable(),
  bandwidth: num.nullable(),
  memory_mib: num,
  disk_bytes: num,
  not_before: num,
  created_at: num,
  updated_at: num,
  seq: int,
});

export const journalSchema = z.object({ migration_id: z.string(), at: num, state: z.enum(MIGRATION_STATES), phase: z.string().nullable(), detail: z.string().nullable() });
export type JournalEntry = z.infer<typeof journalSchema>;

/** A VM protected by a standby replica (issue 12); the spec is kept, as a failover happens when its source is gone. */
export interface ProtectionRow {
  vm: string;
  source: string;
  standby: string;
  intervalMs: number;
  spec: unknown;
  createdAt: number;
}

/** A failover from a replica; `rpoMs` is the data-loss window it stated. */
export interface RecoveryRow {
  id: string;
  vm: string;
  source: string;
  standby: string;
  state: 'succeeded' | 'failed';
  seq: number | null;
  pointAt: number | null;
  rpoMs: number | null;
  detail: string | null;
  createdAt: number;
}

const protectionRowSchema = z.object({ vm: z.string(), src: z.string(), standby: z.string(), interval_ms: int, spec: z.string(), created_at: num });
export function toProtection(raw: unknown): ProtectionRow {
  const r = protectionRowSchema.parse(raw);
  return { vm: r.vm, source: r.src, standby: r.standby, intervalMs: r.interval_ms, spec: z.unknown().parse(JSON.parse(r.spec)), createdAt: r.created_at };
}

const recoveryRowSchema = z.object({
  id: z.string(),
  vm: z.string(),
  src: z.string(),
  dst: z.string(),
  state: z.enum(['succeeded', 'failed']),
  seq: int.nullable(),
  point_at: num.nullable(),
  rpo_ms: num.nullable(),
  detail: z.string().nullable(),
  created_at: num,
});
export function toRecovery(raw: unknown): RecoveryRow {
  const r = recoveryRowSchema.parse(raw);
  return { id: r.id, vm: r.vm, source: r.src, standby: r.dst, state: r.state, seq: r.seq, pointAt: r.point_at, rpoMs: r.rpo_ms, detail: r.detail, createdAt: r.created_at };
}

export function toJob(raw: unknown): MigrationJob {
  const r = rowSchema.parse(raw);
  return {
    id: r.id,
    vm: r.vm,
    from: r.src,
    to: r.dst,
    reason: r.reason,
    priority: r.priority,
    mode: r.mode,
    state: r.state,
    attempts: r.attempts,
    phase: r.phase,
    error: r.error,
    bandwidthBytesPerSec: r.bandwidth,
    memoryMiB: r.memory_mib,
    diskBytes: r.disk_bytes,
    notBefore: r.not_before,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    seq: r.seq,
  };
}

export interface EnqueueRequest {
  vm: string;
  from: string;
  to: string;
  reason: Reason;
  priority: number;
  mode?: MigrationMode;
  memoryMiB: number;
  diskBytes: number;
}

export interface TransitionChange {
  detail?: string;
  error?: string | null;
  attempts?: number;
  bandwidthBytesPerSec?: number | null;
  notBefore?: number;
}

/** A replica's hold on one migration: written with every change it makes, refused once stale. */
export interface Claim {
  owner: string;
  /** From a sequence: a later claim of the same migration always has a larger one. */
  epoch: number;
}

export interface ClaimedJob {
  job: MigrationJob;
  claim: Claim;
}

/** Admission limits the claim enforces across every replica (running migrations in the database). */
export interface ClaimLimits {
  outgoingPerHost: number;
  incomingPerHost: number;
  cluster: number;
  /** Bandwidth for the claimed migration from the counts its hosts have with it; null: no cap. */
  bandwidth(outgoing: number, incoming: number): number | null;
}

/** An event one replica hands to the others (shared stores): who sent it, and the event. */
export interface FleetMessage {
  origin: string;
  event: unknown;
}

export interface SchedulerStore {
  /** Several schedulers may share it: work is claimed with leases (the methods below). */
  readonly shared: boolean;
  /** New queued migrations, all or none. A VM that already has an active one keeps it. */
  enqueue(requests: EnqueueRequest[]): Promise<{ job: MigrationJob; existing: boolean }[]>;
  get(id: string): Promise<MigrationJob | undefined>;
  activeFor(vm: string): Promise<MigrationJob | undefined>;
  inState(state: MigrationState): Promise<MigrationJob[]>;
  recent(limit?: number): Promise<MigrationJob[]>;
  journal(id: string): Promise<JournalEntry[]>;
  /**
   * The one way a migration changes state: checked, written and journalled in one transaction.
   * With a claim: refused (LEASE_LOST) unless it is still the migration's current claim.
   */
  transition(id: string, to: MigrationState, change?: TransitionChange, claim?: Claim): Promise<MigrationJob>;
  /** A phase reported by the engine: journalled, so a post-mortem reads the whole story. */
  phase(id: string, phase: string, claim?: Claim): Promise<void>;
  /** The source's settings before the engine changed them, committed before the engine goes on. */
  saveSource(id: string, saved: SavedSourceSettings, claim?: Claim): Promise<void>;
  /** What saveSource stored, parsed; undefined if the engine never got that far. */
  savedSource(id: string): Promise<SavedSourceSettings | undefined>;
  close(): Promise<void>;

  // Standby replicas (issue 12): who is protected where, and every failover with its RPO.
  addProtection(p: ProtectionRow): Promise<void>;
  protections(): Promise<ProtectionRow[]>;
  protection(vm: string): Promise<ProtectionRow | undefined>;
  removeProtection(vm: string): Promise<void>;
  /** The VM moved to another host (not its standby): the protection follows it there, with its spec there. */
  retargetProtection(vm: string, source: string, spec: unknown): Promise<void>;
  addRecovery(r: RecoveryRow): Promise<void>;
  recoveries(limit?: number): Promise<RecoveryRow[]>;

  // Shared stores only (shared: true).
  /** The next queued migration (priority, then arrival) that the limits admit, now running under a new claim. */
  claimQueued?(owner: string, leaseMs: number, limits: ClaimLimits): Promise<ClaimedJob | undefined>;
  /** In-flight migrations (running, needs-source) whose lease expired, each under a new claim. */
  claimExpired?(owner: string, leaseMs: number, max: number): Promise<ClaimedJob[]>;
  /** Extends the leases still held; answers which, and which of them an operator asked to cancel. */
  renew?(claims: { id: string; claim: Claim }[], leaseMs: number): Promise<{ id: string; cancelRequested: boolean }[]>;
  /** Lets a claim go at once, or at `untilMs` from now (a needs-source migration asked again later). */
  release?(id: string, claim: Claim, afterMs?: number): Promise<void>;
  /** Marks a running migration for cancelling by whichever replica runs it. */
  requestCancel?(id: string): Promise<void>;
  /** Memory and disk that active (queued, running) migrations promise each destination, summed. */
  reservations?(): Promise<Map<string, { memoryMiB: number; diskBytes: number }>>;
  /**
   * Standby sync loops (issue 12) are leased like migrations: one replica runs each protection's
   * loop. In one transaction: leases of protections that are gone are dropped, protections without
   * a live lease are taken, this owner's are renewed. Answers what this owner holds, and which of
   * those another replica asked it to hand over (`handOver`: stop the loop, then release).
   */
  claimProtections?(owner: string, leaseMs: number): Promise<{ held: string[]; handOver: string[] }>;
  /**
   * Takes a protection's lease for an operation on it (unprotect, recover, a delta evacuation):
   * at once if it is free, expired or this owner's; else asks its holder to hand it over and
   * answers false (ask again). Taken for an operation, no loop runs under it.
   */
  takeProtection?(vm: string, owner: string, leaseMs: number): Promise<boolean>;
  /** Gives a protection's lease up (its loop stopped, or the operation done): any replica may take it. */
  releaseProtection?(vm: string, owner: string): Promise<void>;
  /** Hands an event to every replica listening, this one included (best effort, not durable). */
  publish?(m: FleetMessage): Promise<void>;
  /** Calls `listener` with every published event until the returned stop is called; keeps listening across database restarts. */
  listen?(listener: (m: FleetMessage) => void): Promise<() => Promise<void>>;
}

/** The store a config's database names: a PostgreSQL URL, or a SQLite file. */
export async function openStore(database: string, opts: { log?: import('../log.js').Logger } = {}): Promise<SchedulerStore> {
  if (/^postgres(ql)?:\/\//.test(database)) {
    const { PostgresStore } = await import('./pg-store.js');
    return PostgresStore.open(database, opts);
  }
  const { SqliteStore } = await import('./sqlite-store.js');
  return new SqliteStore(database);
}

/** A database name for logs and messages: a URL loses its password. */
export function redactDatabase(database: string): string {
  if (!/^postgres(ql)?:\/\//.test(database)) return database;
  try {
    const u = new URL(database);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return 'postgres://(unparsable URL)';
  }
}
