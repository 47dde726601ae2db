/**
 * The sync loop of one protected VM: every `intervalMs`, one sync (source-sync.ts on the source,
 * standby-daemon.ts, or an agent speaking for it, on the standby), never two at once. The order
 * is what keeps every point consistent:
 *
 *   standby.prepareSync(k+1) → sourceSync (all jobs complete, client nodes gone)
 *     → standby.completeSync(k+1) (k+1 is now the consistent point) → sourceCommitBitmaps(k+1)
 *
 * A failure anywhere aborts on both sides: the standby discards k+1, the source drops bitmap k+1
 * and keeps k, so the next sync resends everything since k. The loop never throws: a failed sync
 * is counted and logged, and the next one is tried at the next tick.
 *
 *   state: starting ─► idle ⇄ syncing ─► stopped
 *                        └──► failing (last sync failed) ⇄ syncing
 */
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import type { QmpClient } from '../qmp/index.js';
import type { SyncFigures } from './manifest.js';
import { sourceAbortSync, sourceCommitBitmaps, sourceReconcileBitmaps, sourceSync, type SyncOutcome, type SyncTls } from './source-sync.js';
import type { ReplicaTarget } from './standby-daemon.js';

/** What the loop needs of the standby: StandbyReplica itself, or an agent's replica RPC. */
export interface StandbySide {
  consistent(): Promise<{ seq: number; pointAt: number } | null>;
  prepareSync(seq: number): Promise<ReplicaTarget>;
  completeSync(seq: number, figures: Omit<SyncFigures, 'seq'>): Promise<void>;
  abortSync(seq: number): Promise<void>;
}

/** What the loop needs of the source: source-sync.ts over a QMP session (localSource), or an agent's RPC. */
export interface SourceSide {
  reconcile(consistentSeq: number | null): Promise<number | null>;
  sync(input: { seq: number; previous: number | null; target: ReplicaTarget }): Promise<SyncOutcome>;
  commit(seq: number): Promise<void>;
  abort(seq: number): Promise<void>;
}

/** source-sync.ts on a fresh QMP session per call (the loop holds none between syncs). */
export function localSource(connect: () => Promise<QmpClient>, disks: readonly { id: string }[], opts: { tls?: SyncTls } = {}): SourceSide {
  const withQmp = async <T>(fn: (q: QmpClient) => Promise<T>): Promise<T> => {
    const q = await connect();
    try {
      return await fn(q);
    } finally {
      await q.close();
    }
  };
  return {
    reconcile: (consistentSeq) => withQmp((q) => sourceReconcileBitmaps(q, { disks, consistentSeq })),
    sync: (i) => withQmp((q) => sourceSync(q, { disks, ...i, timeoutMs: 600_000, tls: opts.tls })),
    commit: (seq) => withQmp((q) => sourceCommitBitmaps(q, { disks, seq })),
    abort: (seq) => withQmp((q) => sourceAbortSync(q, { disks, seq })),
  };
}

export type ProtectionState = 'starting' | 'idle' | 'syncing' | 'failing' | 'stopped';

export interface ProtectionStatus {
  vm: string;
  state: ProtectionState;
  intervalMs: number;
  /** Wall clock of the consistent point the standby holds; null before the first sync completes. */
  consistentAt: number | null;
  /** now - consistentAt: the data a failover now would lose (the RPO right now). */
  rpoMs: number | null;
  lastBytes: number | null;
  lastDurationMs: number | null;
  syncs: number;
  failedSyncs: number;
  lastError: string | null;
}

export class Protection {
  readonly vm: string;
  readonly #source: SourceSide;
  readonly #standby: StandbySide;
  readonly #intervalMs: number;
  readonly #log: Logger;
  #state: ProtectionState = 'starting';
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<void> | undefined;
  /** The seq whose bitmap the source holds (null: the next sync is full). */
  #previous: number | null = null;
  #consistentAt: number | null = null;
  #last: SyncOutcome | undefined;
  #syncs = 0;
  #failed = 0;
  #lastError: string | null = null;
  readonly #outcomes: ((o: SyncOutcome | Error) => void)[] = [];

  constructor(opts: { vm: string; source: SourceSide; standby: StandbySide; intervalMs: number; log?: Logger }) {
    this.vm = opts.vm;
    this.#source = opts.source;
    this.#standby = opts.standby;
    this.#intervalMs = opts.intervalMs;
    this.#log = (opts.log ?? silentLogger).child({ protect: opts.vm });
  }

  #enter(to: ProtectionState): void {
    if (this.#state === to) return;
    if (this.#state === 'stopped') return;
    this.#log.info({ from: this.#state, to }, 'protection state');
    this.#state = to;
  }

  /** Reconciles the source's bitmaps with the standby's point, runs the first sync now, then one per interval. */
  start(): void {
    if (this.#timer || this.#state === 'stopped') return;
    const tick = (): void => {
      this.#running = this.syncOnce().then(
        () => undefined,
        () => undefined,
      );
      void this.#running.then(() => {
        if (this.#state !== 'stopped') this.#timer = setTimeout(tick, this.#intervalMs);
      });
    };
    tick();
  }

  /** Stops the loop and waits for a sync in flight to end (it completes or is aborted). */
  async stop(): Promise<void> {
    this.#enter('stopped');
    this.#state = 'stopped';
    clearTimeout(this.#timer);
    await this.#running;
  }

  /** Resolves with the next sync's outcome (for tests and benchmarks). */
  nextOutcome(): Promise<SyncOutcome | Error> {
    return new Promise((resolve) => this.#outcomes.push(resolve));
  }

  status(now = Date.now()): ProtectionStatus {
    return {
      vm: this.vm,
      state: this.#state,
      intervalMs: this.#intervalMs,
      consistentAt: this.#consistentAt,
      rpoMs: this.#consistentAt === null ? null : now - this.#consistentAt,
      lastBytes: this.#last?.bytes ?? null,
      lastDurationMs: this.#last?.durationMs ?? null,
      syncs: this.#syncs,
      failedSyncs: this.#failed,
      lastError: this.#lastError,
    };
  }

  /** One sync; rejects with its error (the loop swallows it, counted in status()). */
  async syncOnce(): Promise<SyncOutcome> {
    if (this.#state === 'stopped') throw new Error('protection stopped');
    const wasStarting = this.#state === 'starting';
    this.#enter('syncing');
    let seq = 0;
    let prepared = false;
    let started = false;
    try {
      const point = await this.#standby.consistent();
      if (wasStarting || this.#consistentAt === null) {
        this.#previous = await this.#source.reconcile(point?.seq ?? null);
        this.#consistentAt = point?.pointAt ?? null;
      }
      seq = (point?.seq ?? 0) + 1;
      const target = await this.#standby.prepareSync(seq);
      prepared = true;
      started = true;
      const outcome = await this.#source.sync({ seq, previous: this.#previous, target });
      await this.#standby.completeSync(seq, { pointAt: outcome.pointAt, bytes: outcome.bytes, durationMs: outcome.durationMs });
      prepared = false;
      started = false;
      // From here the standby's point is seq: the older bitmap may go (if this fails, the older
      // one, a superset, serves the next sync: more bytes, never fewer).
      await this.#source.commit(seq).catch((err: unknown) => this.#log.warn({ seq, err: errorText(err) }, 'dropping the older bitmap failed'));
      this.#previous = seq;
      this.#consistentAt = outcome.pointAt;
      this.#last = outcome;
      this.#syncs++;
      this.#lastError = null;
      this.#enter('idle');
      this.#log.info({ seq, bytes: outcome.bytes, durationMs: outcome.durationMs }, 'sync consistent');
      for (const f of this.#outcomes.splice(0)) f(outcome);
      return outcome;
    } catch (err) {
      this.#failed++;
      this.#lastError = errorText(err);
      this.#log.warn({ seq, err: this.#lastError }, 'sync failed; the previous point stands');
      if (started) await this.#source.abort(seq).catch(() => undefined);
      if (prepared) await this.#standby.abortSync(seq).catch(() => undefined);
      this.#enter('failing');
      const e = err instanceof Error ? err : new Error(String(err));
      for (const f of this.#outcomes.splice(0)) f(e);
      throw e;
    }
  }
}

/** A StandbyReplica in this process as the loop's standby side. */
export function localStandby(r: { manifest: { consistent: { seq: number; pointAt: number } | null } } & Pick<StandbySide, 'prepareSync' | 'completeSync' | 'abortSync'>): StandbySide {
  return {
    consistent: async () => r.manifest.consistent,
    prepareSync: (seq) => r.prepareSync(seq),
    completeSync: (seq, f) => r.completeSync(seq, f),
    abortSync: (seq) => r.abortSync(seq),
  };
}
