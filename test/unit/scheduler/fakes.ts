/** Fakes for the scheduler's unit tests: an inventory in memory and a runner the test drives. */
import type { MigrationOutcome } from '../../../src/engine/outcome.js';
import type { MigrationResult } from '../../../src/engine/types.js';
import type { Inventory, MigrationJob, MigrationRunner, Reconciler, RunContext, WhereRuns } from '../../../src/scheduler/types.js';

/** A successful outcome for a fake run: the scheduler reads only the kind. */
export function migrated(job: MigrationJob): MigrationOutcome {
  return { kind: 'migrated', result: { ok: true, migrationId: job.id, plan: { dataTls: { encrypted: false, reason: 'a fake runner' } }, downtimeMs: 42, diskBytes: 1000, ramBytes: 500 } as MigrationResult };
}

export class FakeInventory implements Inventory {
  hostList: { name: string; freeMemoryMiB: number; freeDiskBytes: number }[];
  vmList: { name: string; host: string; memoryMiB: number; diskBytes: number }[];
  constructor(hosts: string[], vms: [string, string][], opts: { memoryMiB?: number; vmMemoryMiB?: number } = {}) {
    this.hostList = hosts.map((name) => ({ name, freeMemoryMiB: opts.memoryMiB ?? 16_384, freeDiskBytes: 1e12 }));
    this.vmList = vms.map(([name, host]) => ({ name, host, memoryMiB: opts.vmMemoryMiB ?? 512, diskBytes: 1e9 }));
  }
  async hosts() {
    return this.hostList;
  }
  async vms() {
    return this.vmList;
  }
  async vm(name: string) {
    return this.vmList.find((v) => v.name === name);
  }
}

interface Running {
  job: MigrationJob;
  ctx: RunContext;
  finish(): void;
  fail(err: unknown): void;
}

/** Each run waits until the test finishes or fails it; tracks concurrency per host. */
export class FakeRunner implements MigrationRunner {
  readonly running = new Map<string, Running>();
  readonly started: MigrationJob[] = [];
  maxCluster = 0;
  readonly maxOut = new Map<string, number>();
  readonly maxIn = new Map<string, number>();
  auto: 'finish' | undefined;
  #waiters: (() => void)[] = [];

  async run(job: MigrationJob, ctx: RunContext): Promise<MigrationOutcome> {
    this.started.push(job);
    return new Promise<MigrationOutcome>((resolve, reject) => {
      const r: Running = {
        job,
        ctx,
        finish: () => {
          this.running.delete(job.id);
          // The scheduler reads only the kind; a fake result stands in for the engine's.
          resolve(migrated(job));
        },
        fail: (err) => {
          this.running.delete(job.id);
          reject(err);
        },
      };
      this.running.set(job.id, r);
      const count = (key: 'from' | 'to', host: string): number => [...this.running.values()].filter((x) => x.job[key] === host).length;
      this.maxCluster = Math.max(this.maxCluster, this.running.size);
      this.maxOut.set(job.from, Math.max(this.maxOut.get(job.from) ?? 0, count('from', job.from)));
      this.maxIn.set(job.to, Math.max(this.maxIn.get(job.to) ?? 0, count('to', job.to)));
      ctx.signal.addEventListener('abort', () => r.fail(ctx.signal.reason), { once: true });
      for (const w of this.#waiters.splice(0)) w();
      if (this.auto === 'finish') queueMicrotask(() => r.finish());
    });
  }

  /** Resolves once `n` runs are in progress. */
  async until(n: number, timeoutMs = 2_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.running.size < n) {
      if (Date.now() > deadline) throw new Error(`expected ${n} running migrations, have ${this.running.size}`);
      await new Promise<void>((r) => {
        this.#waiters.push(r);
        setTimeout(r, 20);
      });
    }
  }

  finishAll(): void {
    for (const r of [...this.running.values()]) r.finish();
  }
}

export class FakeReconciler implements Reconciler {
  answer: WhereRuns = 'from';
  readonly asked: string[] = [];
  async settle(job: MigrationJob) {
    this.asked.push(job.vm);
    return { runsOn: this.answer, detail: `fake says ${this.answer}` };
  }
}

export const tick = (ms = 0): Promise<void> => new Promise((r) => setTimeout(r, ms));
