import { z } from 'zod';
import type { DataTlsPlan } from './data-tls-plan.js';
import { FerryError } from '../errors.js';

/**
 * The phases of one migration, in the order they happen. A migration never goes back to an
 * earlier phase; `rollback` is entered from any phase before the point of no return (the
 * destination's `cont`), `done` only after it.
 */
export const PHASES = [
  'preflight',
  'prepare-destination',
  'mirror',
  'ram',
  'switchover',
  'confirm',
  'hydrate',
  'cleanup',
  'done',
] as const;
export type Phase = (typeof PHASES)[number] | 'rollback' | 'failed';

/** auto (the default): background, made to converge per QEMU (src/engine/convergence/); the others as QEMU does them. */
export type CopyMode = 'auto' | 'background' | 'write-blocking';
export type DeadlinePolicy = 'abort' | 'force';

export const MigrationOptionsSchema = z
  .object({
    /**
     * precopy: disks and RAM are copied before the guest moves (the default: the destination
     * runs at full speed from its first instant). lazy: RAM moves, the destination runs at once
     * and pulls disk blocks from the source on demand while the rest hydrates in the background.
     */
    mode: z.enum(['precopy', 'lazy']).default('precopy'),
    /** lazy: cap on background hydration, bytes/s per disk; absent = as fast as it goes. */
    hydrationBytesPerSec: z.number().int().positive().optional(),
    /** lazy: how long the destination's NBD client waits for a lost source to come back, s. */
    nbdReconnectDelayS: z.number().int().min(0).max(300).default(10),
    /** lazy: attempts to resume a hydration that failed (each restart skips what is already there). */
    hydrationAttempts: z.number().int().min(1).max(20).default(3),
    /** How the mirrors treat guest writes: see docs/migration.md. auto: background, then converged per QEMU. */
    copyMode: z.enum(['auto', 'background', 'write-blocking']).default('auto'),
    /** TLS on the data path: required refuses without it; preferred uses it where both sides can. */
    dataTls: z.enum(['required', 'preferred', 'off']).default('preferred'),
    /** RAM over this many multifd channels (QEMU's `multifd`); 0: one migration stream. */
    multifdChannels: z.number().int().min(0).max(8).default(0),
    /** Cap on the migration link, bytes/s, shared by RAM and disks; absent = unlimited. */
    bandwidthBytesPerSec: z.number().int().positive().optional(),
    /** The pause QEMU aims for at switchover, ms. */
    downtimeLimitMs: z.number().int().min(1).max(60_000).default(300),
    /** When RAM does not converge, the downtime limit steps up to at most this, ms. */
    maxDowntimeLimitMs: z.number().int().min(1).max(600_000).default(2_000),
    /** Let QEMU throttle the vCPUs of a guest that dirties RAM faster than the link moves it. */
    autoConverge: z.boolean().default(true),
    /** What to do when the completion deadline passes: give up (the guest stays on the source) or switch over anyway. */
    onDeadline: z.enum(['abort', 'force']).default('abort'),
    /** Completion deadline = base + perGiB x (allocated disk + RAM in GiB). */
    deadlineBaseMs: z.number().int().positive().default(120_000),
    deadlinePerGiBMs: z.number().int().nonnegative().default(120_000),
    /** Abort when neither disk nor RAM bytes move for this long, ms. */
    progressTimeoutMs: z.number().int().positive().default(60_000),
    /** Hard bound on the whole migration, ms. */
    totalTimeoutMs: z.number().int().positive().default(3_600_000),
    /** Deadline for each QMP command the engine sends, ms. */
    commandTimeoutMs: z.number().int().min(100).default(30_000),
    /** Interval between progress events, ms. */
    progressIntervalMs: z.number().int().min(50).default(500),
  })
  .strict();
export type MigrationOptions = z.infer<typeof MigrationOptionsSchema>;
export type MigrationOptionsInput = z.input<typeof MigrationOptionsSchema>;

export interface DiskProgress {
  id: string;
  /** Bytes the source holds (allocated), the honest size of the copy. */
  allocatedBytes: number;
  /** Bytes that crossed the wire to the destination's export, when the endpoint can measure it. */
  sentBytes: number | undefined;
  /** The mirror job's own counters (they include zero ranges, which cost nothing on the wire). */
  jobOffset: number;
  jobLength: number;
  ready: boolean;
}

export interface RamProgress {
  status: string;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  mbps: number;
  dirtyPagesRate: number;
  dirtySyncCount: number;
  expectedDowntimeMs: number | undefined;
}

export interface ProgressSnapshot {
  phase: Phase;
  elapsedMs: number;
  disks: DiskProgress[];
  /** Sum over disks: bytes sent (or job offset when not measurable) and bytes to send. */
  diskCopiedBytes: number;
  diskTotalBytes: number;
  ram: RamProgress | undefined;
  /** Bytes per second over the last interval, disk + RAM. */
  rateBytesPerSec: number;
  etaMs: number | undefined;
  downtimeLimitMs: number;
}

export type MigrationEvent =
  | { event: 'phase'; migrationId: string; phase: Phase; at: number }
  | { event: 'progress'; migrationId: string; progress: ProgressSnapshot }
  | { event: 'convergence'; migrationId: string; action: 'downtime-step' | 'deadline-abort' | 'deadline-force'; downtimeLimitMs: number; detail: string }
  /** pre-copy: how the mirrors were made to converge (issue 11), once every mirror is READY (and actively-synced). */
  | { event: 'convergence'; migrationId: string; action: 'mirrors-converged'; mirrors: MirrorConvergence }
  | { event: 'warning'; migrationId: string; message: string }
  /**
   * Before the source's migration capabilities and parameters change: what they were, and whether
   * the guest ran. Whoever may have to recover this migration after a crash persists it.
   */
  | { event: 'source-saved'; migrationId: string; saved: SavedSourceSettings }
  /** Sent just before the destination's `cont`: from here on the source is never resumed. */
  | { event: 'point-of-no-return'; migrationId: string; destinationPid: number }
  /** skipped: the step had nothing left to undo (its side's QEMU is gone), and says why. */
  | { event: 'rollback'; migrationId: string; step: string; ok: boolean; error?: string; skipped?: string }
  /** lazy: background hydration after the destination runs. */
  | { event: 'hydration'; migrationId: string; disks: { id: string; doneBytes: number; totalBytes: number }[]; wireBytes: number | undefined; elapsedMs: number };

/** The source's state before ferry changed it, so a rollback or a recovery can put it back. */
export interface SavedSourceSettings {
  wasRunning: boolean;
  capabilities: { capability: string; state: boolean }[];
  parameters: { 'max-bandwidth'?: number | undefined; 'downtime-limit'?: number | undefined; 'multifd-channels'?: number | undefined };
}

export const SavedSourceSettingsSchema = z
  .object({
    wasRunning: z.boolean(),
    capabilities: z.array(z.object({ capability: z.string(), state: z.boolean() }).strict()),
    parameters: z.object({ 'max-bandwidth': z.number().optional(), 'downtime-limit': z.number().optional(), 'multifd-channels': z.number().optional() }).strict(),
  })
  .strict();

export interface MigrationPlan {
  migrationId: string;
  vm: string;
  source: string;
  destination: string;
  /** Address the source's QEMU connects to on the destination, for NBD and the migration stream. */
  destinationHost: string;
  disks: {
    id: string;
    format: 'qcow2' | 'raw';
    virtualSize: number;
    allocatedBytes: number;
    sourcePath: string;
    destinationPath: string;
    /** 'top' copies only what the image allocates; 'full' flattens a backing chain. */
    sync: 'top' | 'full';
  }[];
  ramBytes: number;
  mode: 'precopy' | 'lazy';
  copyMode: CopyMode;
  /** Dirty bitmaps on the source's disks (backup tools' incremental state): they move with the VM. */
  bitmaps: { disk: string; name: string; persistent: boolean; count: number }[];
  capabilities: { source: string[]; destination: string[] };
  /** The source's exact machine type, which the destination is started with. */
  destinationMachine?: string;
  /** Whether NBD and the migration stream run over TLS, and which peer names each side admits. */
  dataTls: DataTlsPlan;
  deadlineMs: number;
}

/**
 * How the mirrors converged: the path taken (relay: the destination's NBD server behind the
 * TCP_NODELAY relay; active-sync: background, then block-job-change to write-blocking), and when,
 * in ms after the mirrors started.
 */
export interface MirrorConvergence {
  path: 'background' | 'write-blocking' | 'auto:active-sync' | 'auto:active-sync+relay' | 'auto:background+relay' | 'auto:background';
  relay: boolean;
  /** The port on the destination's migration host the mirrors wrote to (the relay's, behind one). */
  nbdPort: number;
  /** Every mirror READY. */
  readyMs: number;
  /** active-sync: the last mirror switched to write-blocking, and seen actively-synced. */
  switchedAtMs?: number;
  syncedAtMs?: number;
}

export interface MigrationResult {
  ok: true;
  migrationId: string;
  plan: MigrationPlan;
  totalMs: number;
  /** Pause as seen from outside: source stopped (pre-switchover) until the destination resumed. */
  downtimeMs: number;
  /** QEMU's own figure for the RAM/device switchover part of that pause. */
  qemuDowntimeMs: number | undefined;
  diskBytes: number;
  ramBytes: number;
  phaseMs: Partial<Record<Phase, number>>;
  convergence: { downtimeLimitMs: number; autoConverge: boolean; forced: boolean; steps: number; mirrors?: MirrorConvergence };
  /** Names of the bitmaps found on the destination after the switchover, per disk. */
  bitmapsMigrated: { disk: string; name: string }[];
  /** lazy mode: when the destination ran (ms after the start), how long hydration took, and its bytes on the wire. */
  lazy?: { destinationRunningMs: number; hydrationMs: number; hydratedWireBytes: number | undefined };
  /** delta evacuation (delta.ts): the backup passes, the pause's last one apart (it is in the downtime). */
  delta?: { passes: number; bytes: number; finalBytes: number; finalMs: number };
}

/**
 * How a failed migration left the guest, decided by the engine (never guessed from a message):
 *   rolledBack                the source runs the guest as before; the destination got nothing
 *   onDestinationNeedsSource  past the point of no return (lazy): the destination runs the guest
 *                             and still reads unhydrated blocks from the source, which must stay up
 *   sourceDied                the source QEMU died before the point of no return; the destination
 *                             was removed: no QEMU runs the guest, its disks on the source are whole
 *   uncertain                 the destination may have run: nothing was resumed, an operator looks
 */
export type FailureKind = 'rolledBack' | 'onDestinationNeedsSource' | 'sourceDied' | 'uncertain';
export type GuestOn = 'source' | 'destination' | 'nowhere' | 'unknown';
const GUEST_ON: Record<FailureKind, GuestOn> = { rolledBack: 'source', onDestinationNeedsSource: 'destination', sourceDied: 'nowhere', uncertain: 'unknown' };

/** A migration that did not complete; `outcome` says where that left the guest. */
export class MigrationError extends FerryError {
  override name = 'MigrationError';
  readonly phase: Phase;
  readonly outcome: FailureKind;
  /** Where the guest is, for logs and JSON summaries: derived from `outcome`. */
  readonly guestOn: GuestOn;
  readonly cleanupErrors: unknown[];

  constructor(
    code: string,
    message: string,
    opts: {
      phase: Phase;
      cause?: unknown;
      userError?: boolean;
      context?: Record<string, unknown>;
      outcome?: FailureKind;
      cleanupErrors?: unknown[];
    },
  ) {
    super(code, message, { cause: opts.cause, userError: opts.userError, context: { ...opts.context, phase: opts.phase } });
    this.phase = opts.phase;
    this.outcome = opts.outcome ?? 'rolledBack';
    this.guestOn = GUEST_ON[this.outcome];
    this.cleanupErrors = opts.cleanupErrors ?? [];
  }
}
