/**
 * Turns requests (migrate a VM, drain a host) into migrations that run no more at a time than
 * each host and the cluster can take, in priority order, and that survive the scheduler's own
 * death (store.ts persists before anything acts; `start` settles what was in flight).
 *
 * Admission: every queued migration waits at one gate that grants a migration only when its
 * source has an outgoing slot, its destination an incoming slot, and the cluster a slot, all at
 * once; waiters are served by priority (drain before manual before rebalance), then arrival. A
 * migration blocked by one full host never holds a slot another could use. The granted migration
 * then runs in its source host's p-queue, whose concurrency is the outgoing limit: the gate
 * decides, p-queue enforces. A pick walks the waiters only until the cluster is full, skipping
 * hosts already found full, so it does not scale with the queue in the common case.
 *
 * On a shared store (PostgreSQL, several replicas) the gate is the database instead: a replica
 * claims queued work in one short transaction that checks the same limits against every running
 * migration of every replica (store.ts `claimQueued`), runs it under that claim, renews its
 * leases by a heartbeat, and takes over in-flight migrations whose lease expired (a replica that
 * died or stalled), settling them with the agents exactly as a restart settles its own. Each
 * claim's epoch goes with every agent call (fencing): a replica that wakes up after its lease
 * ran out finds its calls refused by the agents and its writes refused by the store.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { hostname } from 'node:os';
import PQueue from 'p-queue';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { assertNever, outcomeOfError, type FailedOutcome } from '../engine/outcome.js';
import { Gate } from './gate.js';
import type { Claim, ClaimedJob, ClaimLimits, EnqueueRequest, SchedulerStore, TransitionChange } from './store.js';
import { PRIORITY, retryable, SchedulerError, TERMINAL, type Inventory, type MigrationJob, type MigrationMode, type MigrationState, type MigrationProgress, type MigrationRunner, type Reason, type Reconciler, type VmInfo } from './types.js';

export interface SchedulerLimits {
  outgoingPerHost: number;
  incomingPerHost: number;
  cluster: number;
  /** Shared by the migrations of a host (in and out); undefined: no cap. */
  bandwidthPerHostBytesPerSec?: number | undefined;
}

export const DEFAULT_LIMITS: SchedulerLimits = { outgoingPerHost: 2, incomingPerHost: 2, cluster: 5 };

export interface SchedulerOptions {
  store: SchedulerStore;
  inventory: Inventory;
  runner: MigrationRunner;
  reconciler: Reconciler;
  limits?: Partial<SchedulerLimits>;
  retry?: { maxAttempts?: number; baseDelayMs?: number };
  /** The engine's mode for requests that do not name one. */
  mode?: MigrationMode;
  /**
   * Deadline for settling one in-flight migration at start (lazy mode may finish a hydration
   * then); past it the migration is failed "needs operator". Default 30 min.
   */
  settleTimeoutMs?: number;
  logger?: Logger;
  /** Shared stores: this replica's name in the leases, lease length, and how often it looks for work. */
  replica?: { owner?: string; leaseMs?: number; pollMs?: number };
  /** Where a VM had better go when a request names no host (its standby replica). */
  placement?: PlacementHint;
}

/**
 * A destination preferred over `pick`'s choice (src/scheduler/protections.ts: the VM's standby,
 * where it goes by delta). Taken only if that host is in the fleet and has room; undefined, or
 * a hint that fails, leaves the usual placement.
 */
export interface PlacementHint {
  preferredFor(vm: string, mode: MigrationMode): Promise<string | undefined>;
}

/** A migration this replica holds on a shared store, and what stops its engine. */
interface Held {
  claim: Claim;
  controller: AbortController;
  lost: boolean;
}

export interface SchedulerEvents {
  job: [MigrationJob];
  phase: [{ id: string; vm: string; phase: string }];
  /** At most one per second per migration. */
  progress: [{ id: string; vm: string } & MigrationProgress];
  /**
   * A run of the engine ended (the job's new state is in `job`); `result` when the guest moved:
   * its downtime and the bytes that crossed. For metrics and the web view.
   */
  /** This replica took over a migration whose lease expired (PostgreSQL store). */
  takeover: [{ id: string; vm: string }];
  finished: [{ job: MigrationJob; durationMs: number; result?: { downtimeMs: number; diskBytes: number; ramBytes: number }; failure?: { code: string; phase: string } }];
}

export class Scheduler extends EventEmitter<SchedulerEvents> {
  readonly #store: SchedulerStore;
  readonly #inventory: Inventory;
  readonly #runner: MigrationRunner;
  readonly #reconciler: Reconciler;
  readonly #limits: SchedulerLimits;
  readonly #maxAttempts: number;
  readonly #baseDelayMs: number;
  readonly #log: Logger;
  readonly #gate: Gate;
  readonly #out = new Map<string, PQueue>();
  /**
   * One signal per migration: it takes a waiting migration off the gate, and cancels a running
   * one's engine, which rolls back and only then frees its slots. (p-queue's own signal is not
   * used: it frees a running task's slot the moment it aborts, before the rollback ends.)
   */
  readonly #controllers = new Map<string, AbortController>();
  /** Memory and disk promised to each destination by active migrations. */
  readonly #reserved = new Map<string, { memoryMiB: number; diskBytes: number }>();
  readonly #reservations = new Set<string>();
  readonly #cancelRequested = new Set<string>();
  readonly #timers = new Map<string, NodeJS.Timeout>();
  /** Migrations past the gate (running, or about to). */
  readonly #runs = new Set<Promise<void>>();
  readonly #settleTimeoutMs: number;
  readonly #mode: MigrationMode;
  readonly #placement: PlacementHint | undefined;
  #stopping = false;
  #started = false;
  /** Reservations read back from the store (the constructor's only store read). */
  readonly #ready: Promise<void>;
  // Shared store only.
  readonly #owner: string;
  readonly #leaseMs: number;
  readonly #pollMs: number;
  readonly #held = new Map<string, Held>();
  #pollTimer: NodeJS.Timeout | undefined;
  #heartbeatTimer: NodeJS.Timeout | undefined;
  #dispatching = false;
  #dispatchAgain = false;
  /** When the last heartbeat that reached the database was sent: leases are good until this + leaseMs. */
  #renewedAt = 0;

  constructor(opts: SchedulerOptions) {
    super();
    this.#store = opts.store;
    this.#inventory = opts.inventory;
    this.#runner = opts.runner;
    this.#reconciler = opts.reconciler;
    this.#limits = { ...DEFAULT_LIMITS, ...opts.limits };
    for (const [k, v] of Object.entries(this.#limits)) {
      if (v !== undefined && !(Number.isFinite(v) && v > 0)) throw new SchedulerError('BAD_LIMIT', `limit ${k} must be a positive number, got ${String(v)}`, { userError: true });
    }
    this.#mode = opts.mode ?? 'precopy';
    this.#placement = opts.placement;
    this.#maxAttempts = opts.retry?.maxAttempts ?? 3;
    this.#baseDelayMs = opts.retry?.baseDelayMs ?? 5_000;
    this.#settleTimeoutMs = opts.settleTimeoutMs ?? 30 * 60_000;
    this.#log = (opts.logger ?? silentLogger).child({ component: 'scheduler' });
    this.#gate = new Gate(this.#limits);
    this.#owner = opts.replica?.owner ?? `${hostname()}:${process.pid}:${randomBytes(3).toString('hex')}`;
    this.#leaseMs = opts.replica?.leaseMs ?? 15_000;
    this.#pollMs = opts.replica?.pollMs ?? 1_000;
    const store = opts.store;
    this.#ready = store.shared
      ? Promise.resolve()
      : (async () => {
          for (const state of ['queued', 'running'] as const) for (const j of await store.inState(state)) this.#changed(j);
        })();
    // Awaited by every request; a failure surfaces there, not as an unhandled rejection.
    this.#ready.catch(() => undefined);
  }

  /** Shared stores: lease takeovers this replica made and leases it lost, since it started (for metrics). */
  readonly counters = { takeovers: 0, leasesLost: 0 };

  /** This replica's name in the leases (shared stores). */
  get owner(): string {
    return this.#owner;
  }

  get limits(): Readonly<SchedulerLimits> {
    return this.#limits;
  }

  /**
   * Settles what the previous run left in flight, then queues what was queued. Recovery table:
   *   guest on the destination -> succeeded (the reconciler finished the hand-over)
   *   guest on the source      -> queued again (the reconciler rolled the half-migration back)
   *   cannot tell              -> failed, "needs operator"; nothing touched
   * A needs-source migration (the guest runs on the destination, hydration unfinished) is
   * settled too: finished -> succeeded; otherwise it stays needs-source.
   */
  async start(): Promise<void> {
    if (this.#started) return;
    this.#started = true;
    await this.#ready;
    if (this.#store.shared) return this.#startShared();
    // needs-source: the guest runs on the destination and still reads from the source; a start
    // tries again to finish its hydration, and leaves it as it is if it cannot.
    await Promise.all([...(await this.#store.inState('running')), ...(await this.#store.inState('needs-source'))].map((job) => this.#settle(job)));
    for (const job of await this.#store.inState('queued')) this.#schedule(job);
  }

  async #settle(job: MigrationJob, claim?: Claim): Promise<void> {
    let settled: { runsOn: string; detail: string } | undefined;
    let lastError = 'agents unreachable';
    for (let attempt = 1; attempt <= 3 && !settled; attempt++) {
      let timer: NodeJS.Timeout | undefined;
      try {
        settled = await Promise.race([
          this.#store.savedSource(job.id).then((saved) => this.#reconciler.settle(job, saved, claim ? { epoch: claim.epoch } : undefined)),
          new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new SchedulerError('SETTLE_TIMEOUT', `settling ${job.id} took more than ${this.#settleTimeoutMs} ms`)), this.#settleTimeoutMs);
          }),
        ]);
      } catch (err) {
        lastError = errorText(err);
        this.#log.warn({ id: job.id, vm: job.vm, attempt, err: lastError }, 'cannot settle an in-flight migration yet');
        // A settle that timed out may still be acting: never start a second one beside it.
        if (err instanceof SchedulerError && err.code === 'SETTLE_TIMEOUT') break;
        if (attempt < 3) await new Promise((r) => setTimeout(r, 2_000));
      } finally {
        clearTimeout(timer);
      }
    }
    const detail = `${claim ? 'taken over after its lease expired' : 'recovered after a scheduler restart'}: ${settled?.detail ?? lastError}`;
    if (job.state === 'needs-source' && settled?.runsOn !== 'to') {
      this.#log.warn({ id: job.id, vm: job.vm, detail }, 'a migration still needs its source');
      // Asked again later, by whichever replica then holds no lease on it.
      if (claim) await this.#store.release?.(job.id, claim, 10 * this.#leaseMs);
      return;
    }
    const t = (to: MigrationState, change: TransitionChange): Promise<MigrationJob> => this.#store.transition(job.id, to, change, claim);
    if (settled?.runsOn === 'to') this.#changed(await t('succeeded', { detail }));
    else if (settled?.runsOn === 'from' && job.attempts < this.#maxAttempts) this.#changed(await t('queued', { detail }));
    else if (settled?.runsOn === 'from') this.#changed(await t('failed', { detail, error: `rolled back at restart after ${job.attempts} of ${this.#maxAttempts} attempts; not run again` }));
    else this.#changed(await t('failed', { detail, error: `needs operator: ${settled?.detail ?? lastError}` }));
    this.#log.info({ id: job.id, vm: job.vm, runsOn: settled?.runsOn ?? 'unknown' }, 'settled an in-flight migration');
  }

  // ------------------------------------------------------------------ requests

  /** One VM to a host, or anywhere it fits. A VM already moving answers with that migration. */
  async migrate(vm: string, opts: { to?: string; reason?: Reason; mode?: MigrationMode } = {}): Promise<{ job: MigrationJob; existing: boolean }> {
    this.#assertOpen();
    await this.#ready;
    const existing = await this.#store.activeFor(vm);
    if (existing) return { job: existing, existing: true };
    const [hosts, info] = await Promise.all([this.#inventory.hosts(), this.#inventory.vm(vm)]);
    if (!info) throw new SchedulerError('VM_NOT_FOUND', `no VM named '${vm}' on any host`, { userError: true });
    const room = await this.#room(hosts);
    let to = opts.to;
    if (to !== undefined) {
      if (!room.has(to)) throw new SchedulerError('HOST_NOT_FOUND', `no host named '${to}' (hosts: ${[...room.keys()].join(', ')})`, { userError: true });
      if (to === info.host) throw new SchedulerError('ALREADY_THERE', `VM '${vm}' already runs on ${to}`, { userError: true });
      const r = room.get(to)!;
      if (r.memoryMiB < info.memoryMiB || r.diskBytes < info.diskBytes) {
        throw new SchedulerError('NO_CAPACITY', `${to} cannot take '${vm}': it needs ${info.memoryMiB} MiB and ${info.diskBytes} bytes of disk, ${to} has ${r.memoryMiB} MiB and ${r.diskBytes} bytes left`, { userError: true });
      }
    } else {
      to = (await this.#preferred(room, info, opts.mode ?? this.#mode)) ?? pick(room, info, new Set([info.host]));
      if (!to) throw new SchedulerError('NO_CAPACITY', `no other host can take '${vm}' (${info.memoryMiB} MiB, ${info.diskBytes} bytes of disk)`, { userError: true });
    }
    const reason = opts.reason ?? 'manual';
    const [r] = await this.#store.enqueue([{ vm, from: info.host, to, reason, priority: PRIORITY[reason], mode: opts.mode ?? this.#mode, memoryMiB: info.memoryMiB, diskBytes: info.diskBytes }]);
    if (!r!.existing) {
      this.#changed(r!.job);
      this.#queued(r!.job);
    }
    return r!;
  }

  /** Plans a destination for every VM of `host`; all or nothing. */
  async drain(host: string, opts: { mode?: MigrationMode } = {}): Promise<{ job: MigrationJob; existing: boolean }[]> {
    this.#assertOpen();
    await this.#ready;
    const [hosts, vms] = await Promise.all([this.#inventory.hosts(), this.#inventory.vms()]);
    if (!hosts.some((h) => h.name === host)) throw new SchedulerError('HOST_NOT_FOUND', `no host named '${host}' (hosts: ${hosts.map((h) => h.name).join(', ')})`, { userError: true });
    const room = await this.#room(hosts);
    const plan: EnqueueRequest[] = [];
    const unplaced: string[] = [];
    // Largest first: the hardest to place gets the widest choice.
    for (const v of vms.filter((x) => x.host === host).sort((a, b) => b.memoryMiB - a.memoryMiB)) {
      if (await this.#store.activeFor(v.name)) {
        plan.push({ vm: v.name, from: host, to: '', reason: 'drain', priority: PRIORITY.drain, memoryMiB: 0, diskBytes: 0 });
        continue;
      }
      const to = (await this.#preferred(room, v, opts.mode ?? this.#mode)) ?? pick(room, v, new Set([host]));
      if (!to) {
        unplaced.push(`${v.name} (${v.memoryMiB} MiB)`);
        continue;
      }
      const r = room.get(to)!;
      r.memoryMiB -= v.memoryMiB;
      r.diskBytes -= v.diskBytes;
      plan.push({ vm: v.name, from: host, to, reason: 'drain', priority: PRIORITY.drain, mode: opts.mode ?? this.#mode, memoryMiB: v.memoryMiB, diskBytes: v.diskBytes });
    }
    if (unplaced.length > 0) {
      throw new SchedulerError('NO_CAPACITY', `cannot drain ${host}: no host can take ${unplaced.join(', ')}; nothing was queued`, { userError: true });
    }
    const results = await this.#store.enqueue(plan);
    for (const r of results) {
      if (r.existing) continue;
      this.#changed(r.job);
      this.#queued(r.job);
    }
    return results;
  }

  /** The hint's host for this VM, if it is another host of the fleet with room for it. */
  async #preferred(room: Map<string, { memoryMiB: number; diskBytes: number }>, vm: VmInfo, mode: MigrationMode): Promise<string | undefined> {
    const to = await this.#placement?.preferredFor(vm.name, mode).catch((err: unknown) => {
      this.#log.warn({ vm: vm.name, err: errorText(err) }, 'no placement hint: the usual placement');
      return undefined;
    });
    if (to === undefined || to === vm.host) return undefined;
    const r = room.get(to);
    if (!r || r.memoryMiB < vm.memoryMiB || r.diskBytes < vm.diskBytes) {
      this.#log.info({ vm: vm.name, preferred: to, room: r ?? null }, 'the preferred host is not in the fleet or has no room: the usual placement');
      return undefined;
    }
    return to;
  }

  /** Cancels a queued migration at once; a running one is rolled back by the engine (if still possible). */
  async cancel(id: string): Promise<MigrationJob> {
    let job = await this.#store.get(id);
    if (!job) throw new SchedulerError('NO_SUCH_MIGRATION', `no migration '${id}'`, { userError: true });
    if (job.state === 'queued') {
      clearTimeout(this.#timers.get(id));
      this.#timers.delete(id);
      try {
        const done = await this.#store.transition(id, 'cancelled', { detail: 'cancelled while queued' });
        this.#controllers.get(id)?.abort(new SchedulerError('CANCELLED', 'cancelled'));
        this.#controllers.delete(id);
        this.#changed(done);
        return done;
      } catch (err) {
        // Another replica claimed it meanwhile: cancel it as a running one.
        if (!(this.#store.shared && err instanceof SchedulerError && err.code === 'BAD_TRANSITION')) throw err;
        job = (await this.#store.get(id)) ?? job;
      }
    }
    if (job.state === 'running') {
      this.#cancelRequested.add(id);
      const mine = this.#controllers.get(id) ?? this.#held.get(id)?.controller;
      if (mine) mine.abort(new SchedulerError('CANCELLED', `migration ${id} cancelled by request`));
      // Held by another replica: its heartbeat reads the request and cancels its engine.
      else if (this.#store.shared) await this.#store.requestCancel?.(id);
      return job;
    }
    throw new SchedulerError('NOT_CANCELLABLE', `migration ${id} is already ${job.state}`, { userError: true });
  }

  get(id: string): Promise<MigrationJob | undefined> {
    return this.#store.get(id);
  }

  list(limit?: number): Promise<MigrationJob[]> {
    return this.#store.recent(limit);
  }

  journal(id: string): ReturnType<SchedulerStore['journal']> {
    return this.#store.journal(id);
  }

  /** Migrations running now, per source and destination host and in all: what the limits bound. */
  async running(): Promise<{ cluster: number; outgoing: Record<string, number>; incoming: Record<string, number> }> {
    const jobs = await this.#store.inState('running');
    const count = (key: 'from' | 'to'): Record<string, number> => jobs.reduce<Record<string, number>>((m, j) => ({ ...m, [j[key]]: (m[j[key]] ?? 0) + 1 }), {});
    return { cluster: jobs.length, outgoing: count('from'), incoming: count('to') };
  }

  /**
   * Stops taking work. Running migrations get `graceMs` to finish; the rest are cancelled (the
   * engine rolls them back) and left queued, so the next start runs them again.
   */
  async stop(graceMs = 30_000): Promise<void> {
    this.#stopping = true;
    for (const t of this.#timers.values()) clearTimeout(t);
    this.#timers.clear();
    clearTimeout(this.#pollTimer);
    // Off the gate: what has not started stays queued in the database for the next start.
    for (const [id, c] of this.#controllers) if ((await this.#store.get(id).catch(() => undefined))?.state === 'queued') c.abort(new SchedulerError('SCHEDULER_STOPPING', 'the scheduler is stopping'));
    const all = Promise.allSettled([...this.#runs]);
    let timer: NodeJS.Timeout | undefined;
    const finished = await Promise.race([all.then(() => true), new Promise<false>((r) => (timer = setTimeout(r, graceMs, false)))]);
    clearTimeout(timer);
    if (!finished) {
      for (const c of this.#controllers.values()) c.abort(new SchedulerError('SCHEDULER_STOPPING', 'the scheduler is stopping'));
      for (const h of this.#held.values()) h.controller.abort(new SchedulerError('SCHEDULER_STOPPING', 'the scheduler is stopping'));
      await all;
    }
    clearTimeout(this.#heartbeatTimer);
  }

  // ------------------------------------------------------------------ shared store (replicas)

  /**
   * A replica's loops: a heartbeat that renews every lease it holds (leaseMs / 3), and a poll
   * (pollMs, and at once after a request here) that takes over expired leases and claims queued
   * work the cluster's limits admit. Nothing is settled at start: what another replica holds is
   * its own until its lease runs out, this replica's own previous run included.
   */
  #startShared(): void {
    this.#renewedAt = performance.now();
    const beat = (): void => {
      this.#heartbeatTimer = setTimeout(() => void this.#heartbeat().finally(() => !this.#stopping || this.#held.size > 0 ? beat() : undefined), Math.max(50, Math.floor(this.#leaseMs / 3)));
    };
    beat();
    const poll = (): void => {
      if (this.#stopping) return;
      // Jitter: replicas started together do not poll in lockstep.
      this.#pollTimer = setTimeout(() => void this.#dispatch().finally(poll), this.#pollMs * (0.75 + Math.random() / 2));
    };
    void this.#dispatch().finally(poll);
  }

  /** A request queued work here: look for it now instead of at the next poll. */
  #queued(job: MigrationJob): void {
    if (this.#store.shared) void this.#dispatch();
    else this.#schedule(job);
  }

  async #dispatch(): Promise<void> {
    if (this.#dispatching) {
      this.#dispatchAgain = true;
      return;
    }
    this.#dispatching = true;
    try {
      do {
        this.#dispatchAgain = false;
        if (this.#stopping) return;
        for (const c of (await this.#store.claimExpired?.(this.#owner, this.#leaseMs, this.#limits.cluster)) ?? []) this.#hold(c, () => this.#takeOver(c));
        const limits: ClaimLimits = { ...this.#limits, bandwidth: (out, inc) => this.#bandwidthOf(out, inc) ?? null };
        // This replica takes at most the cluster's share; the store's count bounds all replicas.
        while (!this.#stopping && this.#held.size < this.#limits.cluster) {
          const c = await this.#store.claimQueued?.(this.#owner, this.#leaseMs, limits);
          if (!c) break;
          this.#hold(c, () => this.#drive(c.job, this.#held.get(c.job.id)!.controller.signal, c.claim));
        }
      } while (this.#dispatchAgain);
    } catch (err) {
      this.#log.warn({ err: errorText(err) }, 'cannot look for work in the database; the next poll tries again');
    } finally {
      this.#dispatching = false;
    }
  }

  /**
   * Runs `work` under a claim; the lease is renewed until it ends. If it ends without recording
   * an end state (the database gone, the claim lost), the lease is simply no longer renewed:
   * when it runs out, whichever replica takes it over settles the migration with the agents.
   */
  #hold(c: ClaimedJob, work: () => Promise<void>): void {
    const held: Held = { claim: c.claim, controller: new AbortController(), lost: false };
    this.#held.set(c.job.id, held);
    const run = (async () => {
      try {
        await work();
      } catch (err) {
        this.#log.warn({ id: c.job.id, vm: c.job.vm, epoch: c.claim.epoch, err: errorText(err) }, 'a held migration ended without a recorded state; its lease lapses and it is settled by whoever takes it over');
      } finally {
        if (this.#held.get(c.job.id) === held) this.#held.delete(c.job.id);
        this.#cancelRequested.delete(c.job.id);
        if (!this.#stopping) void this.#dispatch();
      }
    })();
    this.#runs.add(run);
    void run.finally(() => this.#runs.delete(run));
  }

  async #takeOver(c: ClaimedJob): Promise<void> {
    this.counters.takeovers++;
    this.emit('takeover', { id: c.job.id, vm: c.job.vm });
    this.#log.warn({ id: c.job.id, vm: c.job.vm, phase: c.job.phase, state: c.job.state, epoch: c.claim.epoch }, 'took over a migration whose lease expired; settling it with the agents');
    await this.#settle(c.job, c.claim);
  }

  async #heartbeat(): Promise<void> {
    const held = [...this.#held.entries()].filter(([, h]) => !h.lost);
    if (held.length === 0) {
      this.#renewedAt = performance.now();
      return;
    }
    const sent = performance.now();
    try {
      const alive = await this.#store.renew!(held.map(([id, h]) => ({ id, claim: h.claim })), this.#leaseMs);
      this.#renewedAt = sent;
      const byId = new Map(alive.map((a) => [a.id, a]));
      for (const [id, h] of held) {
        const a = byId.get(id);
        if (!a) this.#lose(id, h, 'another replica holds it now');
        else if (a.cancelRequested && !this.#cancelRequested.has(id)) {
          this.#cancelRequested.add(id);
          h.controller.abort(new SchedulerError('CANCELLED', `migration ${id} cancelled by request`));
        }
      }
    } catch (err) {
      // Past most of the lease without a renewal, another replica may take over at any moment:
      // stop the engines (they roll back while that is still theirs to do).
      const silentMs = performance.now() - this.#renewedAt;
      this.#log.warn({ err: errorText(err), silentMs }, 'cannot renew leases');
      if (silentMs > 0.75 * this.#leaseMs) for (const [id, h] of held) this.#lose(id, h, `no renewal for ${Math.round(silentMs)} ms`);
    }
  }

  #lose(id: string, h: Held, why: string): void {
    h.lost = true;
    this.counters.leasesLost++;
    this.#log.warn({ id, epoch: h.claim.epoch, why }, 'lost the lease of a migration: its engine stops');
    h.controller.abort(new SchedulerError('LEASE_LOST', `the lease of migration ${id} (epoch ${h.claim.epoch}) was lost: ${why}`));
  }

  // ------------------------------------------------------------------ execution

  #assertOpen(): void {
    if (this.#stopping) throw new SchedulerError('STOPPING', 'the scheduler is stopping and takes no new requests');
  }

  #schedule(job: MigrationJob): void {
    if (this.#stopping) return;
    const wait = job.notBefore - Date.now();
    if (wait > 0) {
      this.#timers.set(
        job.id,
        setTimeout(() => {
          this.#timers.delete(job.id);
          this.#schedule({ ...job, notBefore: 0 });
        }, wait),
      );
      return;
    }
    const ac = new AbortController();
    this.#controllers.set(job.id, ac);
    this.#gate.acquire(job, ac.signal).then(
      (release) => {
        let q = this.#out.get(job.from);
        if (!q) {
          q = new PQueue({ concurrency: this.#limits.outgoingPerHost });
          this.#out.set(job.from, q);
        }
        const run = q.add(() => this.#execute(job.id, ac.signal, release), { priority: job.priority }).catch((err: unknown) => {
          release();
          this.#log.error({ id: job.id, err: errorText(err) }, 'migration task failed unexpectedly');
        });
        this.#runs.add(run);
        void run.finally(() => this.#runs.delete(run));
      },
      () => {
        // Cancelled or stopping while it waited: its state says which, nothing holds a slot.
        if (this.#controllers.get(job.id) === ac) this.#controllers.delete(job.id);
      },
    );
  }

  async #execute(id: string, signal: AbortSignal, release: () => void): Promise<void> {
    let job: MigrationJob;
    try {
      const queued = await this.#store.get(id);
      if (!queued || queued.state !== 'queued' || this.#stopping || signal.aborted) {
        release();
        return;
      }
      const bandwidth = this.#bandwidthFor(queued);
      // Persisted before the engine touches anything: a crash from here on is reconciled.
      job = await this.#store.transition(id, 'running', { attempts: queued.attempts + 1, bandwidthBytesPerSec: bandwidth ?? null, error: null });
    } catch (err) {
      release();
      throw err;
    }
    try {
      await this.#drive(job, signal, undefined);
    } finally {
      // A retry may already have put a new controller in place: leave that one.
      if (this.#controllers.get(id)?.signal === signal) this.#controllers.delete(id);
      this.#cancelRequested.delete(id);
      release();
    }
  }

  /** Runs a migration that is `running` in the store (under `claim` on a shared one) to its end state. */
  async #drive(job: MigrationJob, signal: AbortSignal, claim: Claim | undefined): Promise<void> {
    const id = job.id;
    this.#changed(job);
    this.#log.info({ id, vm: job.vm, from: job.from, to: job.to, attempt: job.attempts, ...(claim ? { epoch: claim.epoch } : {}) }, 'migration starts');
    let lastProgress = 0;
    const startedAt = performance.now();
    {
      const outcome = await this.#runner
        .run(job, {
          signal,
          ...(claim ? { fence: { epoch: claim.epoch } } : {}),
          bandwidthBytesPerSec: job.bandwidthBytesPerSec ?? 0,
          onProgress: (p) => {
            const now = performance.now();
            if (now - lastProgress < 1_000) return;
            lastProgress = now;
            this.emit('progress', { id, vm: job.vm, ...p });
          },
          onPhase: async (phase) => {
            await this.#store.phase(id, phase, claim);
            this.emit('phase', { id, vm: job.vm, phase });
          },
          onSourceSaved: (saved) => this.#store.saveSource(id, saved, claim),
        })
        .catch((err: unknown) => outcomeOfError(err, signal.aborted));
      if (outcome.kind === 'migrated') {
        const tls = outcome.result.plan.dataTls;
        const dataPath = tls.encrypted ? `data over TLS, admitted ${tls.source.identity} on ${job.to} and ${tls.destination.identity} on ${job.from}` : `data in plain text (${tls.reason})`;
        const d = outcome.result.delta;
        const disks = d ? `; disks by delta onto its standby replica (${d.passes} passes, ${d.bytes} bytes)` : '';
        const done = await this.#store.transition(id, 'succeeded', { detail: `${job.vm} runs on ${job.to}${disks}; ${dataPath}; downtime ${outcome.result.downtimeMs} ms` }, claim);
        this.#changed(done);
        const { downtimeMs, diskBytes, ramBytes } = outcome.result;
        this.emit('finished', { job: done, durationMs: performance.now() - startedAt, result: { downtimeMs, diskBytes, ramBytes } });
        this.#log.info({ id, vm: job.vm, to: job.to }, 'migration succeeded');
      } else {
        await this.#failed(job, outcome, claim);
        const after = await this.#store.get(id);
        if (after) this.emit('finished', { job: after, durationMs: performance.now() - startedAt, failure: { code: outcome.error.code, phase: outcome.error.phase } });
      }
    }
  }

  /**
   * What a failed migration becomes, by where the engine left the guest. Only a rollback may run
   * again; past the point of no return, or with the guest's whereabouts in doubt, nothing is retried.
   */
  async #failed(job: MigrationJob, outcome: FailedOutcome, claim: Claim | undefined): Promise<void> {
    const text = errorText(outcome.error);
    const t = (to: MigrationState, change: TransitionChange): Promise<MigrationJob> => this.#store.transition(job.id, to, change, claim);
    switch (outcome.kind) {
      case 'onDestinationNeedsSource':
        this.#changed(
          await t('needs-source', {
            error: `${job.vm} runs on ${job.to} and still needs the source ${job.from} (keep its QEMU up): ${text}`,
            detail: 'past the point of no return; not retried',
          }),
        );
        break;
      case 'uncertain':
        this.#changed(await t('failed', { error: `needs operator: ${text}`, detail: 'outcome uncertain' }));
        break;
      case 'sourceDied':
        this.#changed(await t('failed', { error: `needs operator: the source QEMU of ${job.vm} died on ${job.from}; no QEMU runs the guest: ${text}`, detail: 'source died; not retried' }));
        break;
      case 'rolledBack':
        if (this.#cancelRequested.has(job.id)) {
          this.#changed(await t('cancelled', { error: text, detail: 'cancelled while running; rolled back' }));
        } else if (this.#stopping) {
          this.#changed(await t('queued', { error: text, detail: 'the scheduler stopped; rolled back, runs again at the next start' }));
        } else if (retryable(outcome) && job.attempts < this.#maxAttempts) {
          const delay = this.#baseDelayMs * 2 ** (job.attempts - 1);
          const again = await t('queued', { error: text, notBefore: Date.now() + delay, detail: `attempt ${job.attempts} failed; retry in ${delay} ms` });
          this.#changed(again);
          this.#queued(again);
        } else {
          this.#changed(await t('failed', { error: text, detail: retryable(outcome) ? `gave up after ${job.attempts} attempts` : 'not retryable' }));
        }
        break;
      default:
        assertNever(outcome);
    }
    this.#log.warn({ id: job.id, vm: job.vm, outcome: outcome.kind, err: text }, 'migration failed');
  }

  #bandwidthFor(job: MigrationJob): number | undefined {
    // Slots are taken at the gate, this migration's included.
    return this.#bandwidthOf(this.#gate.outgoingOf(job.from), this.#gate.incomingOf(job.to));
  }

  #bandwidthOf(outgoing: number, incoming: number): number | undefined {
    const budget = this.#limits.bandwidthPerHostBytesPerSec;
    if (budget === undefined) return undefined;
    return Math.floor(Math.min(budget / Math.max(1, outgoing), budget / Math.max(1, incoming)));
  }

  /** Free room per host, minus what queued and running migrations already promised it. */
  async #room(hosts: { name: string; freeMemoryMiB: number; freeDiskBytes: number }[]): Promise<Map<string, { memoryMiB: number; diskBytes: number }>> {
    // Shared: every replica's promises are in the database, not in this process.
    const reserved = this.#store.shared ? await this.#sharedReservations() : this.#reserved;
    return new Map(
      hosts.map((h) => {
        const r = reserved.get(h.name);
        return [h.name, { memoryMiB: h.freeMemoryMiB - (r?.memoryMiB ?? 0), diskBytes: h.freeDiskBytes - (r?.diskBytes ?? 0) }];
      }),
    );
  }

  async #sharedReservations(): Promise<Map<string, { memoryMiB: number; diskBytes: number }>> {
    if (this.#store.reservations) return this.#store.reservations();
    const out = new Map<string, { memoryMiB: number; diskBytes: number }>();
    for (const j of [...(await this.#store.inState('queued')), ...(await this.#store.inState('running'))]) {
      const r = out.get(j.to) ?? { memoryMiB: 0, diskBytes: 0 };
      r.memoryMiB += j.memoryMiB;
      r.diskBytes += j.diskBytes;
      out.set(j.to, r);
    }
    return out;
  }

  #reserve(job: MigrationJob, sign: 1 | -1): void {
    const r = this.#reserved.get(job.to) ?? { memoryMiB: 0, diskBytes: 0 };
    r.memoryMiB += sign * job.memoryMiB;
    r.diskBytes += sign * job.diskBytes;
    this.#reserved.set(job.to, r);
  }

  #changed(job: MigrationJob): void {
    if (TERMINAL.has(job.state) && this.#reservations.delete(job.id)) this.#reserve(job, -1);
    else if (!TERMINAL.has(job.state) && !this.#reservations.has(job.id)) {
      this.#reservations.add(job.id);
      this.#reserve(job, 1);
    }
    this.emit('job', job);
  }
}

/** The host with the most memory left that fits the VM, or undefined. */
function pick(room: Map<string, { memoryMiB: number; diskBytes: number }>, vm: VmInfo, exclude: Set<string>): string | undefined {
  let best: string | undefined;
  let bestFree = -Infinity;
  for (const [name, r] of room) {
    if (exclude.has(name) || r.memoryMiB < vm.memoryMiB || r.diskBytes < vm.diskBytes) continue;
    if (r.memoryMiB > bestFree) {
      best = name;
      bestFree = r.memoryMiB;
    }
  }
  return best;
}
