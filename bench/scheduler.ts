/**
 * The scheduler's own cost, with fake agents (no QEMU): 100 hosts, N queued requests for N in
 * 100, 1,000 and 10,000, per store:
 *   sqlite         a real SQLite file (WAL, synchronous=FULL), one scheduler
 *   postgres x1    a real PostgreSQL, one replica
 *   postgres x3    the same database, three replicas in this process (each its own pool), the
 *                  requests spread over them and all three claiming work
 * PostgreSQL: FERRY_BENCH_PG_URL names a server to use (its tables are dropped first!); without
 * it the bench makes a throwaway cluster (test/helpers/postgres.ts: initdb as nobody, unix
 * socket, fsync on as in production unless FERRY_BENCH_PG_FSYNC=off). Figures per operation:
 *   enqueue   one `migrate` request accepted, journalled and queued, with N-1 already queued
 *   dispatch  picking the next migration, starting it, and completing it (two transitions),
 *             measured over the whole queue draining through the limits
 * Flat means the per-operation cost does not grow with N. JSON on stdout, a table on stderr.
 *   --runs R       each figure is the median of R runs, with their [min..max] (default 1)
 *   --only S       sqlite | postgres (default both)
 *   --sizes LIST   queue sizes (default 100,1000,10000)
 * Each row goes to stderr as it is measured; the JSON at the end. On a slow disk PostgreSQL's
 * fsync per commit dominates: the 10,000 rows take minutes.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { PostgresStore } from '../src/scheduler/pg-store.js';
import { Scheduler } from '../src/scheduler/scheduler.js';
import { SqliteStore } from '../src/scheduler/sqlite-store.js';
import type { SchedulerStore } from '../src/scheduler/store.js';
import { startPostgres, type TestPostgres } from '../test/helpers/postgres.js';
import type { HostInfo, Inventory, MigrationJob, MigrationRunner, Reconciler, RunContext, VmInfo } from '../src/scheduler/types.js';
import type { MigrationOutcome } from '../src/engine/outcome.js';
import type { MigrationResult } from '../src/engine/types.js';

const HOSTS = 100;

class FakeFleet implements Inventory, MigrationRunner, Reconciler {
  readonly #hosts: HostInfo[];
  readonly #vms = new Map<string, VmInfo>();
  hold = true;
  readonly #held: (() => void)[] = [];
  done = 0;

  constructor(n: number) {
    this.#hosts = Array.from({ length: HOSTS }, (_, i) => ({ name: `h${i}`, freeMemoryMiB: 1e9, freeDiskBytes: 1e15 }));
    for (let i = 0; i < n; i++) this.#vms.set(`vm${i}`, { name: `vm${i}`, host: `h${i % HOSTS}`, memoryMiB: 1024, diskBytes: 1e9 });
  }
  async hosts() {
    return this.#hosts;
  }
  async vms() {
    return [...this.#vms.values()];
  }
  async vm(name: string) {
    return this.#vms.get(name);
  }
  run(job: MigrationJob, _ctx: RunContext): Promise<MigrationOutcome> {
    return new Promise((resolve) => {
      const finish = (): void => {
        this.done++;
        // The scheduler reads only the kind.
        resolve({ kind: 'migrated', result: { ok: true, migrationId: job.id, plan: { dataTls: { encrypted: false, reason: 'a fake runner' } } } as MigrationResult });
      };
      if (this.hold) this.#held.push(finish);
      else queueMicrotask(finish);
    });
  }
  release(): void {
    this.hold = false;
    for (const f of this.#held.splice(0)) f();
  }
  async settle() {
    return { runsOn: 'unknown' as const, detail: 'bench' };
  }
}

type Variant = { name: string; kind: 'sqlite' } | { name: string; kind: 'postgres'; replicas: number };

const { values: args } = parseArgs({ options: { runs: { type: 'string', default: '1' }, only: { type: 'string' }, sizes: { type: 'string', default: '100,1000,10000' } }, strict: true });
const SIZES = args.sizes.split(',').map(Number);
if (SIZES.length === 0 || !SIZES.every((n) => Number.isInteger(n) && n > 0)) throw new Error(`--sizes: expected positive integers separated by commas, got '${args.sizes}'`);
const RUNS = Number(args.runs);
if (!Number.isInteger(RUNS) || RUNS < 1) throw new Error(`--runs: expected a positive integer, got '${args.runs}'`);
if (args.only !== undefined && args.only !== 'sqlite' && args.only !== 'postgres') throw new Error(`--only: expected sqlite or postgres, got '${args.only}'`);

let server: TestPostgres | undefined;
// Interrupted: the throwaway cluster (a postgres running as nobody, its dir) goes too.
for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.once(sig, () => {
    void (server?.stop() ?? Promise.resolve()).finally(() => process.exit(130));
  });
}
async function pgUrl(): Promise<string> {
  if (process.env.FERRY_BENCH_PG_URL) return process.env.FERRY_BENCH_PG_URL;
  server ??= await startPostgres({ fsync: process.env.FERRY_BENCH_PG_FSYNC !== 'off' });
  return server.url;
}

/** An empty database for each run: the scheduler's tables dropped, the store makes them again. */
async function emptyPg(url: string): Promise<void> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  try {
    await c.query('DROP TABLE IF EXISTS leases, protection_leases, journal, migrations, protections, recoveries, ferry_schema; DROP SEQUENCE IF EXISTS migration_seq, fencing_epoch');
  } finally {
    await c.end();
  }
}

async function measure(variant: Variant, n: number): Promise<{ n: number; enqueueUs: number; dispatchUs: number; enqueueLast10pctUs: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-bench-sched-'));
  const fleet = new FakeFleet(n);
  const limits = { outgoingPerHost: 2, incomingPerHost: 2, cluster: 5 };
  const stores: SchedulerStore[] = [];
  if (variant.kind === 'sqlite') stores.push(new SqliteStore(join(dir, 'state.db')));
  else {
    const url = await pgUrl();
    await emptyPg(url);
    for (let i = 0; i < variant.replicas; i++) stores.push(await PostgresStore.open(url));
  }
  const schedulers = stores.map((store, i) => new Scheduler({ store, inventory: fleet, runner: fleet, reconciler: fleet, limits, replica: { owner: `bench-${i}`, leaseMs: 60_000, pollMs: 100 } }));
  for (const s of schedulers) await s.start();
  const store = stores[0]!;
  const times: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await schedulers[i % schedulers.length]!.migrate(`vm${i}`, { to: `h${(i + 1) % HOSTS}` });
    times.push(performance.now() - t0);
  }
  const enqueueUs = (times.reduce((a, b) => a + b, 0) / n) * 1000;
  const tail = times.slice(Math.floor(n * 0.9));
  const enqueueLast10pctUs = (tail.reduce((a, b) => a + b, 0) / tail.length) * 1000;
  const t1 = performance.now();
  fleet.release();
  const pause = (): Promise<void> => new Promise((r) => (variant.kind === 'sqlite' ? setImmediate(r) : setTimeout(r, 5)));
  while (fleet.done < n) await pause();
  // Let the last completions reach the store.
  while ((await store.inState('running')).length > 0) await pause();
  const dispatchUs = ((performance.now() - t1) / n) * 1000;
  const succeeded = (await store.inState('succeeded')).length;
  if (succeeded !== n) throw new Error(`${variant.name}: only ${succeeded} of ${n} succeeded`);
  for (const s of schedulers) await s.stop(0);
  for (const st of stores) await st.close();
  rmSync(dir, { recursive: true, force: true });
  return { n, enqueueUs: round(enqueueUs), enqueueLast10pctUs: round(enqueueLast10pctUs), dispatchUs: round(dispatchUs) };
}

const round = (x: number): number => Math.round(x * 10) / 10;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const spread = (xs: number[]): [number, number] => [Math.min(...xs), Math.max(...xs)];
const range = ([lo, hi]: [number, number]): string => `[${lo}..${hi}]`;

const variants: Variant[] = [
  ...(args.only === 'postgres' ? [] : [{ name: 'sqlite', kind: 'sqlite' as const }]),
  ...(args.only === 'sqlite' ? [] : [{ name: 'postgres x1', kind: 'postgres' as const, replicas: 1 }, { name: 'postgres x3', kind: 'postgres' as const, replicas: 3 }]),
];
type Measured = Awaited<ReturnType<typeof measure>>;
type Row = Measured & { enqueueSpreadUs: [number, number]; dispatchSpreadUs: [number, number]; runs: Measured[] };
const table: { store: string; results: Row[] }[] = [];
try {
  for (const v of variants) {
    const results: Row[] = [];
    for (const n of SIZES) {
      const runs = [];
      for (let r = 0; r < RUNS; r++) runs.push(await measure(v, n));
      const row = {
        n,
        enqueueUs: median(runs.map((x) => x.enqueueUs)),
        enqueueSpreadUs: spread(runs.map((x) => x.enqueueUs)),
        enqueueLast10pctUs: median(runs.map((x) => x.enqueueLast10pctUs)),
        dispatchUs: median(runs.map((x) => x.dispatchUs)),
        dispatchSpreadUs: spread(runs.map((x) => x.dispatchUs)),
        runs,
      };
      results.push(row);
      process.stderr.write(`${v.name.padEnd(12)}  ${String(n).padStart(8)}  enqueue ${row.enqueueUs} µs ${range(row.enqueueSpreadUs)} (last 10%: ${row.enqueueLast10pctUs})  pick+run+complete ${row.dispatchUs} µs ${range(row.dispatchSpreadUs)}\n`);
    }
    table.push({ store: v.name, results });
  }
} finally {
  await server?.stop();
}
process.stdout.write(
  `${JSON.stringify(
    {
      bench: 'scheduler',
      hosts: HOSTS,
      runs: RUNS,
      stores: table.map((t) => ({ ...t, ratioLargestToSmallest: { enqueue: round(t.results.at(-1)!.enqueueUs / t.results[0]!.enqueueUs), dispatch: round(t.results.at(-1)!.dispatchUs / t.results[0]!.dispatchUs) } })),
    },
    null,
    2,
  )}\n`,
);
process.stderr.write(`\n${'store'.padEnd(12)}  ${'queued'.padStart(8)}  ${'enqueue µs [min..max]'.padStart(26)}  ${'enqueue (last 10%) µs'.padStart(22)}  ${'pick+run+complete µs [min..max]'.padStart(32)}\n`);
for (const t of table) {
  for (const r of t.results) {
    process.stderr.write(`${t.store.padEnd(12)}  ${String(r.n).padStart(8)}  ${`${r.enqueueUs} ${range(r.enqueueSpreadUs)}`.padStart(26)}  ${String(r.enqueueLast10pctUs).padStart(22)}  ${`${r.dispatchUs} ${range(r.dispatchSpreadUs)}`.padStart(32)}\n`);
  }
}
