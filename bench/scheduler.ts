/**
 * The scheduler's own cost, with fake agents (no QEMU): 100 hosts, N queued requests for N in
 * 100, 1,000 and 10,000, on a real SQLite file (WAL, synchronous=FULL). Figures per operation:
 *   enqueue   one `migrate` request accepted, journalled and queued, with N-1 already queued
 *   dispatch  picking the next migration, starting it, and completing it (two transitions),
 *             measured over the whole queue draining through the limits
 * Flat means the per-operation cost does not grow with N. JSON on stdout, a table on stderr.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scheduler } from '../src/scheduler/scheduler.js';
import { SqliteStore as SchedulerStore } from '../src/scheduler/sqlite-store.js';
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

async function measure(n: number): Promise<{ n: number; enqueueUs: number; dispatchUs: number; enqueueLast10pctUs: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-bench-sched-'));
  const store = new SchedulerStore(join(dir, 'state.db'));
  const fleet = new FakeFleet(n);
  const scheduler = new Scheduler({ store, inventory: fleet, runner: fleet, reconciler: fleet, limits: { outgoingPerHost: 2, incomingPerHost: 2, cluster: 5 } });
  await scheduler.start();
  const times: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await scheduler.migrate(`vm${i}`, { to: `h${(i + 1) % HOSTS}` });
    times.push(performance.now() - t0);
  }
  const enqueueUs = (times.reduce((a, b) => a + b, 0) / n) * 1000;
  const tail = times.slice(Math.floor(n * 0.9));
  const enqueueLast10pctUs = (tail.reduce((a, b) => a + b, 0) / tail.length) * 1000;
  const t1 = performance.now();
  fleet.release();
  while (fleet.done < n) await new Promise((r) => setImmediate(r));
  // Let the last completions reach the store.
  while ((await store.inState('running')).length > 0) await new Promise((r) => setImmediate(r));
  const dispatchUs = ((performance.now() - t1) / n) * 1000;
  if ((await store.inState('succeeded')).length !== n) throw new Error(`only ${(await store.inState('succeeded')).length} of ${n} succeeded`);
  await scheduler.stop(0);
  store.close();
  rmSync(dir, { recursive: true, force: true });
  return { n, enqueueUs: round(enqueueUs), enqueueLast10pctUs: round(enqueueLast10pctUs), dispatchUs: round(dispatchUs) };
}

const round = (x: number): number => Math.round(x * 10) / 10;

const results = [];
for (const n of [100, 1_000, 10_000]) results.push(await measure(n));
const base = results[0]!;
process.stdout.write(`${JSON.stringify({ bench: 'scheduler', hosts: HOSTS, results, ratio10kTo100: { enqueue: round(results[2]!.enqueueUs / base.enqueueUs), dispatch: round(results[2]!.dispatchUs / base.dispatchUs) } }, null, 2)}\n`);
process.stderr.write(`\n${'queued'.padStart(8)}  ${'enqueue µs'.padStart(11)}  ${'enqueue (last 10%) µs'.padStart(22)}  ${'pick+run+complete µs'.padStart(21)}\n`);
for (const r of results) process.stderr.write(`${String(r.n).padStart(8)}  ${String(r.enqueueUs).padStart(11)}  ${String(r.enqueueLast10pctUs).padStart(22)}  ${String(r.dispatchUs).padStart(21)}\n`);
