/**
 * The scheduler's Prometheus metrics (prom-client, text format on /metrics; service.ts serves
 * them). Counters and histograms follow the Scheduler's events; gauges are read from the store at
 * each scrape, so they say what the database says, also after a restart.
 *
 *   ferry_migrations_total{outcome,mode}                 runs of the engine that ended, by the job's new state
 *   ferry_migration_duration_seconds{outcome,mode}       how long those runs took
 *   ferry_migration_downtime_seconds{mode}               the guest's pause, migrations that moved it
 *   ferry_migration_bytes_total{kind="disk"|"ram"}       bytes the moved guests' copies sent
 *   ferry_migration_failures_total{code,phase}           failed runs by the engine's error code and the phase it failed in
 *   ferry_scheduler_queue_depth{host}                    queued migrations, by source host
 *   ferry_scheduler_in_flight{host,direction="out"|"in"} running migrations, by host and side
 *   ferry_migration_phase_seconds{id,vm,from,to,phase}   running migrations: time in their current phase
 *   ferry_scheduler_host_progress_timestamp_seconds{host} last time a migration out of the host moved
 *                                                        a byte, changed phase or ended
 *   ferry_scheduler_lease_takeovers_total                migrations this replica took over (PostgreSQL store)
 *   ferry_scheduler_stale_calls_refused_total            calls of this replica an agent refused as stale (fencing)
 *
 * The last two stay 0 until the PostgreSQL store (leases, epochs) calls `recordLeaseTakeover` and
 * `recordStaleCallRefused`. QMP errors are counted where every QMP command passes: the agents'
 * tunnels (agent/metrics.ts).
 */
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { renderWithProcess } from '../host/process-metrics.js';
import type { Scheduler, SchedulerEvents } from './scheduler.js';
import type { MigrationJob } from './types.js';

/** What the gauges read at each scrape: the store's queued and running migrations. */
export interface MigrationSource {
  queued(): MigrationJob[] | Promise<MigrationJob[]>;
  running(): MigrationJob[] | Promise<MigrationJob[]>;
}

/** Seconds: a migration of a small VM takes seconds, a large one under load an hour. */
const DURATION_BUCKETS = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600];
/** Seconds: ferry's downtime limit is 0.3 s by default; a forced switchover may pause for seconds. */
const DOWNTIME_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10];

export class SchedulerMetrics {
  readonly registry = new Registry();
  readonly #scheduler: Scheduler;
  readonly #migrations: Counter<'outcome' | 'mode'>;
  readonly #duration: Histogram<'outcome' | 'mode'>;
  readonly #downtime: Histogram<'mode'>;
  readonly #bytes: Counter<'kind'>;
  readonly #failures: Counter<'code' | 'phase'>;
  readonly #takeovers: Counter;
  readonly #staleRefused: Counter;
  readonly #hostProgress: Gauge<'host'>;
  /** Running migrations' current phase and since when (ms, Date.now()). */
  readonly #phases = new Map<string, { job: MigrationJob; phase: string; since: number }>();
  readonly #onJob: (...a: SchedulerEvents['job']) => void;
  readonly #onPhase: (...a: SchedulerEvents['phase']) => void;
  readonly #onProgress: (...a: SchedulerEvents['progress']) => void;
  readonly #onFinished: (...a: SchedulerEvents['finished']) => void;

  constructor(scheduler: Scheduler, source: MigrationSource, hosts: readonly string[]) {
    this.#scheduler = scheduler;
    const registers = [this.registry];
    this.#migrations = new Counter({ name: 'ferry_migrations_total', help: 'Runs of the migration engine that ended, by the state the migration went to (succeeded, failed, cancelled, queued for a retry, needs-source) and mode', labelNames: ['outcome', 'mode'], registers });
    this.#duration = new Histogram({ name: 'ferry_migration_duration_seconds', help: 'How long a run of the migration engine took, by outcome and mode', labelNames: ['outcome', 'mode'], buckets: DURATION_BUCKETS, registers });
    this.#downtime = new Histogram({ name: 'ferry_migration_downtime_seconds', help: "The guest's pause at the switchover (source stopped until the destination ran), migrations that moved the guest", labelNames: ['mode'], buckets: DOWNTIME_BUCKETS, registers });
    this.#bytes = new Counter({ name: 'ferry_migration_bytes_total', help: 'Bytes the migrations that moved a guest sent: disk (NBD) and ram (migration stream)', labelNames: ['kind'], registers });
    this.#failures = new Counter({ name: 'ferry_migration_failures_total', help: "Runs of the migration engine that failed, by the error's stable code (a QMP error's among them) and the phase it failed in", labelNames: ['code', 'phase'], registers });
    this.#takeovers = new Counter({ name: 'ferry_scheduler_lease_takeovers_total', help: 'Migrations this replica took over after another replica\'s lease expired (0 with the SQLite store)', registers });
    this.#staleRefused = new Counter({ name: 'ferry_scheduler_stale_calls_refused_total', help: 'Calls of this replica that an agent refused for a stale fencing epoch (0 with the SQLite store)', registers });
    this.#hostProgress = new Gauge({ name: 'ferry_scheduler_host_progress_timestamp_seconds', help: 'Last time a migration out of this host moved a byte, changed phase or ended (unix seconds); with queued or running work and an old value, the host\'s drain stalls', labelNames: ['host'], registers });
    for (const kind of ['disk', 'ram']) this.#bytes.inc({ kind }, 0);
    const now = Date.now() / 1000;
    for (const host of hosts) this.#hostProgress.set({ host }, now);

    new Gauge({
      name: 'ferry_scheduler_queue_depth',
      help: 'Queued migrations, by source host',
      labelNames: ['host'],
      registers,
      async collect() {
        this.reset();
        for (const host of hosts) this.set({ host }, 0);
        for (const j of await source.queued()) this.inc({ host: j.from });
      },
    });
    new Gauge({
      name: 'ferry_scheduler_in_flight',
      help: 'Running migrations, by host: direction out (source) or in (destination)',
      labelNames: ['host', 'direction'],
      registers,
      async collect() {
        this.reset();
        for (const host of hosts) for (const direction of ['out', 'in']) this.set({ host, direction }, 0);
        for (const j of await source.running()) {
          this.inc({ host: j.from, direction: 'out' });
          this.inc({ host: j.to, direction: 'in' });
        }
      },
    });
    const phases = this.#phases;
    new Gauge({
      name: 'ferry_migration_phase_seconds',
      help: 'Running migrations: seconds since the migration entered its current phase (one series per running migration)',
      labelNames: ['id', 'vm', 'from', 'to', 'phase'],
      registers,
      collect() {
        this.reset();
        const at = Date.now();
        for (const [id, p] of phases) this.set({ id, vm: p.job.vm, from: p.job.from, to: p.job.to, phase: p.phase }, (at - p.since) / 1000);
      },
    });

    this.#onJob = (job) => {
      if (job.state === 'running') {
        if (!this.#phases.has(job.id)) this.#phases.set(job.id, { job, phase: job.phase ?? 'starting', since: Date.now() });
      } else this.#phases.delete(job.id);
      if (job.state === 'queued' || job.state === 'running') this.#moved(job.from);
    };
    this.#onPhase = (p) => {
      const cur = this.#phases.get(p.id);
      if (cur && cur.phase !== p.phase) this.#phases.set(p.id, { job: cur.job, phase: p.phase, since: Date.now() });
      if (cur) this.#moved(cur.job.from);
    };
    this.#onProgress = (p) => {
      const cur = this.#phases.get(p.id);
      if (cur) this.#moved(cur.job.from);
    };
    this.#onFinished = ({ job, durationMs, result, failure }) => {
      if (failure) this.#failures.inc(failure);
      this.#migrations.inc({ outcome: job.state, mode: job.mode });
      this.#duration.observe({ outcome: job.state, mode: job.mode }, durationMs / 1000);
      if (result && Number.isFinite(result.downtimeMs)) {
        this.#downtime.observe({ mode: job.mode }, result.downtimeMs / 1000);
        this.#bytes.inc({ kind: 'disk' }, result.diskBytes);
        this.#bytes.inc({ kind: 'ram' }, result.ramBytes);
      }
      this.#moved(job.from);
    };
    scheduler.on('job', this.#onJob);
    scheduler.on('phase', this.#onPhase);
    scheduler.on('progress', this.#onProgress);
    scheduler.on('finished', this.#onFinished);
    scheduler.on('takeover', this.#onTakeover);
  }

  readonly #onTakeover = (): void => this.recordLeaseTakeover();

  /** A migration this replica took over after another's lease expired (the scheduler's 'takeover'). */
  recordLeaseTakeover(count = 1): void {
    this.#takeovers.inc(count);
  }

  /** Called when an agent refuses one of this replica's calls for a stale fencing epoch. */
  recordStaleCallRefused(count = 1): void {
    this.#staleRefused.inc(count);
  }

  /** The text format Prometheus scrapes, and its content type. */
  async render(): Promise<{ contentType: string; body: string }> {
    return renderWithProcess(this.registry, 'ferry_scheduler_');
  }

  close(): void {
    this.#scheduler.off('job', this.#onJob);
    this.#scheduler.off('phase', this.#onPhase);
    this.#scheduler.off('progress', this.#onProgress);
    this.#scheduler.off('finished', this.#onFinished);
    this.#scheduler.off('takeover', this.#onTakeover);
  }

  #moved(host: string): void {
    this.#hostProgress.set({ host }, Date.now() / 1000);
  }
}
