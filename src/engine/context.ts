/**
 * What every phase of one migration shares: who it is (id, request, options, logger), where it is
 * (the phase clock, the point of no return), how it undoes (the undo stack), and the services all
 * phases use (one call deadline, events, warnings, naps, stall and abort checks). Phase results do
 * not live here: each phase function takes its inputs and returns its outputs (the "cookie").
 */
import { FerryError, errorText } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { QmpCommandError, QmpTimeoutError, type QmpCapabilities, type QmpClient, type QmpEvent } from '../qmp/index.js';
import type { VmSpec } from '../qemu/spec.js';
import type { ConvergencePlan } from './convergence/index.js';
import type { DeltaReplica } from './delta.js';
import type { DestinationEndpoint, IncomingVm, NbdRelayHandle, SourceEndpoint } from './endpoint.js';
import { newMigrationId } from './names.js';
import { PhaseClock } from './phase.js';
import type { ProgressTracker } from './progress.js';
import { MigrationError, type MigrationEvent, type MigrationOptions, type MigrationOptionsInput, type Phase, type SavedSourceSettings } from './types.js';
import { UndoStack } from './undo.js';

export interface MigrateRequest {
  spec: VmSpec;
  source: SourceEndpoint;
  destination: DestinationEndpoint;
  options?: MigrationOptionsInput;
  /** Cancels the migration (rolls back) until the point of no return. */
  signal?: AbortSignal;
  logger?: Logger;
  onEvent?: (e: MigrationEvent) => void;
  /**
   * Persists a phase or the source's saved settings before the engine takes its next step (a
   * scheduler's store): awaited. A failure before the point of no return fails the migration,
   * which rolls back; during a rollback or past the point of no return it is only a warning.
   */
  durable?: (e: Extract<MigrationEvent, { event: 'phase' | 'source-saved' }>) => Promise<void>;
  /** Preflight only: return the plan, change nothing. */
  dryRun?: boolean;
  migrationId?: string;
  /**
   * Evacuation by delta (delta.ts): the destination holds this VM's standby replica; its disks
   * become overlays on it and only the blocks changed since its consistent point are copied.
   */
  delta?: DeltaReplica;
}

/** Deadline of the QMP commands the undo steps and tidy steps send, ms. */
export const QMP_TIMEOUT_MS = 30_000;
/** The undo step that stops the destination QEMU: run first on rollback. */
export const STOP_DESTINATION = 'stop destination QEMU';

/** The source after begin: its QMP session, what its QEMU can do, and whether the guest ran. */
export interface SourceState {
  qmp: QmpClient;
  caps: QmpCapabilities;
  wasRunning: boolean;
  /** Its run state at begin (query-status): a rollback that ends in another one says so. Absent: 'running' or 'paused' as wasRunning says. */
  statusAtBegin?: string;
}

/** lazy mode: the source's read-only NBD server, on its exportHost. */
export interface SourceExport {
  port: number;
}

/** The destination after prepare: an incoming QEMU, paused, with its NBD exports (pre-copy). */
export interface DestinationState {
  spec: VmSpec;
  vm: IncomingVm;
  caps: QmpCapabilities;
  /** pre-copy: the port the mirrors write to: the destination's NBD server, or the relay before it. */
  nbdPort: number | undefined;
  /** pre-copy: how the mirrors are made to converge (copy mode, relay, active-sync). */
  convergence: ConvergencePlan | undefined;
  /** pre-copy behind a relay: closed after the NBD server stops (and by the rollback). */
  relay: NbdRelayHandle | undefined;
}

export class MigrationContext {
  readonly id: string;
  readonly req: MigrateRequest;
  readonly opts: MigrationOptions;
  readonly log: Logger;
  readonly undo = new UndoStack();
  /** The caller's cancel and the total timeout: they stop the migration until the point of no return. */
  readonly signal: AbortSignal;
  readonly started = performance.now();
  readonly phases: PhaseClock;
  #pastNoReturn = false;
  readonly #napCursor = new WeakMap<QmpClient, number>();
  readonly #total: AbortSignal;

  constructor(req: MigrateRequest, opts: MigrationOptions) {
    this.req = req;
    this.opts = opts;
    this.id = req.migrationId ?? newMigrationId();
    this.log = (req.logger ?? silentLogger).child({ migration: this.id, vm: req.spec.name });
    // Held by the context: a timeout signal that only AbortSignal.any() refers to is collected
    // with its timer on Node 20, and the total timeout then never fires (issue 17's matrix,
    // mirror/slow-link: a mirror crawling on a 1 Mbit/s link ran past --timeout 20 for minutes).
    this.#total = AbortSignal.timeout(opts.totalTimeoutMs);
    this.signal = req.signal ? AbortSignal.any([req.signal, this.#total]) : this.#total;
    this.phases = new PhaseClock((phase) => {
      this.log.info({ phase }, 'phase');
      this.emit({ event: 'phase', migrationId: this.id, phase, at: performance.now() - this.started });
    });
  }

  get phase(): Phase {
    return this.phases.phase;
  }

  /** Enters `phase` and, with a durable hook, returns once it is persisted. */
  async enter(phase: Phase): Promise<void> {
    this.phases.enter(phase);
    await this.persist({ event: 'phase', migrationId: this.id, phase, at: performance.now() - this.started });
  }

  /** The durable hook (see MigrateRequest.durable); throws only for a forward step before the point of no return. */
  async persist(e: Extract<MigrationEvent, { event: 'phase' | 'source-saved' }>): Promise<void> {
    if (!this.req.durable) return;
    try {
      await this.req.durable(e);
    } catch (err) {
      const phase = this.phase;
      if (this.#pastNoReturn || phase === 'rollback' || phase === 'failed') {
        this.warn(`could not persist ${e.event === 'phase' ? `phase ${e.phase}` : 'the source settings'}: ${errorText(err)}`);
        return;
      }
      throw new MigrationError('STATE_NOT_PERSISTED', `could not persist ${e.event === 'phase' ? `phase ${e.phase}` : 'the source settings'} before going on: ${errorText(err)}`, { phase, cause: err });
    }
  }

  get pastNoReturn(): boolean {
    return this.#pastNoReturn;
  }

  /**
   * The destination has run (or may have): nothing may resume the source, or remove what runs.
   * The undo stack is emptied; from now on a call carries no signal and nothing cancels.
   */
  passNoReturn(): void {
    this.#pastNoReturn = true;
    this.undo.dropSide('source');
    this.undo.dropSide('destination');
  }

  emit(e: MigrationEvent): void {
    try {
      this.req.onEvent?.(e);
    } catch (err) {
      this.log.error({ err: errorText(err) }, 'event listener threw');
    }
  }

  warn(message: string): void {
    this.log.warn(message);
    this.emit({ event: 'warning', migrationId: this.id, message });
  }

  /** One QMP command's deadline, and the signal until the point of no return. */
  call(): { timeoutMs: number; signal?: AbortSignal } {
    return this.#pastNoReturn ? { timeoutMs: this.opts.commandTimeoutMs } : { timeoutMs: this.opts.commandTimeoutMs, signal: this.signal };
  }

  /** Runs a step past the point of no return: a failure is reported, never thrown. */
  async tidy(what: string, step: () => Promise<unknown>): Promise<void> {
    try {
      await step();
    } catch (err) {
      this.warn(`could not ${what}: ${errorText(err)}`);
    }
  }

  throwIfAborted(): void {
    if (this.signal.aborted) throw new FerryError('MIGRATION_CANCELLED', 'cancelled', { cause: this.signal.reason });
  }

  /** The destination QEMU died on its own (not killed by the rollback): its log is kept. */
  destinationDied = false;
  /** Where the rollback kept the dead destination's log, when it did. */
  keptDestinationLog: string | undefined;
  /** How the destination QEMU died and its last lines, when it died on its own. */
  destinationExit: string | undefined;

  /** The source's settings from before the migration changed them (source-perform.ts), once read. */
  sourceSaved: SavedSourceSettings | undefined;

  /** The plan's disk ids, once preflight made it: the rollback's out-of-band yank names their NBD client nodes. */
  plannedDisks: readonly string[] = [];

  /** The destination's host cannot be reached (its tunnel broke); its QEMU may be alive. */
  destinationUnreachable = false;

  async throwIfDestinationDied(dest: DestinationState): Promise<void> {
    if (dest.vm.running()) return;
    if (dest.vm.unreachable?.()) {
      this.destinationUnreachable = true;
      throw new MigrationError('DESTINATION_UNREACHABLE', `the destination host ${this.req.destination.name} cannot be reached during ${this.phase} (the tunnel to its QEMU, pid ${dest.vm.pid}, broke: its agent or the link went); its QEMU may still be alive`, {
        phase: this.phase,
      });
    }
    this.destinationDied = true;
    const reason = await dest.vm.exitReason?.().catch(() => undefined);
    this.destinationExit = reason;
    throw new MigrationError('DESTINATION_DIED', `the destination QEMU (pid ${dest.vm.pid}) exited during ${this.phase}${reason ? ` (${reason})` : ''}`, {
      phase: this.phase,
      context: reason ? { destinationExit: reason } : {},
    });
  }

  checkStalled(progress: ProgressTracker): void {
    const idle = progress.idleMs();
    if (idle > this.opts.progressTimeoutMs) {
      throw new MigrationError('STALLED', `no progress for ${Math.round(idle)} ms during ${this.phase} (progress timeout ${this.opts.progressTimeoutMs} ms)`, {
        phase: this.phase,
      });
    }
  }

  /** Sleeps one progress interval, waking early on a matching event newer than the last nap's. */
  async nap(q: QmpClient, pred: (e: QmpEvent) => boolean, since?: number): Promise<void> {
    const { signal } = this.call();
    try {
      await q.waitForEvent(pred, {
        timeoutMs: this.opts.progressIntervalMs,
        ...(signal ? { signal } : {}),
        ...(since === undefined ? {} : { since: Math.max(since, this.#napCursor.get(q) ?? since) }),
      });
    } catch (err) {
      if (!(err instanceof QmpTimeoutError)) throw err;
    }
    this.#napCursor.set(q, q.eventCursor());
  }
}

/** Tries candidate ports until QEMU binds one; another process may hold any of them. */
export async function onFreePort(ctx: MigrationContext, bind: (port: number) => Promise<unknown>, where: { host: string; ports: Iterable<number> }): Promise<number> {
  let tried = 0;
  let last: unknown;
  for (const port of where.ports) {
    if (tried++ >= 50) break;
    try {
      await bind(port);
      return port;
    } catch (err) {
      if (!(err instanceof QmpCommandError) || !/in use|bind/i.test(err.desc)) throw err;
      last = err;
    }
  }
  throw new MigrationError('NO_FREE_PORT', `no free port on ${where.host} after ${tried} tries: ${errorText(last)}`, { phase: ctx.phase, cause: last });
}
