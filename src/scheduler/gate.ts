/**
 * Admission: outgoing-per-host, incoming-per-host and cluster-wide slots, granted together, by
 * priority then arrival. A pick walks the waiters only until the cluster is full, skipping hosts
 * already found full, so it does not scale with the queue in the common case.
 */
import type { SchedulerLimits } from './scheduler.js';
import type { MigrationJob } from './types.js';

interface Waiter {
  job: MigrationJob;
  grant: (release: () => void) => void;
}

/** Outgoing-per-host, incoming-per-host and cluster-wide slots, granted together by priority then arrival. */
export class Gate {
  readonly #outgoing = new Map<string, number>();
  readonly #incoming = new Map<string, number>();
  #cluster = 0;
  /** Waiters per priority, each bucket in arrival (seq) order. */
  readonly #buckets = new Map<number, Waiter[]>();
  readonly #limits: SchedulerLimits;

  constructor(limits: SchedulerLimits) {
    this.#limits = limits;
  }

  acquire(job: MigrationJob, signal: AbortSignal): Promise<() => void> {
    return new Promise((resolve, reject) => {
      if (signal.aborted) return reject(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
      const w: Waiter = { job, grant: resolve };
      let bucket = this.#buckets.get(job.priority);
      if (!bucket) {
        bucket = [];
        this.#buckets.set(job.priority, bucket);
      }
      // New work arrives with the highest seq: the end; a retry goes back to its place.
      const last = bucket.at(-1);
      if (!last || last.job.seq < job.seq) bucket.push(w);
      else bucket.splice(lowerBound(bucket, job.seq), 0, w);
      const onAbort = (): void => {
        const b = this.#buckets.get(job.priority);
        const i = b ? b.indexOf(w) : -1;
        if (i >= 0) b!.splice(i, 1);
        reject(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
      };
      signal.addEventListener('abort', onAbort, { once: true });
      w.grant = (release) => {
        signal.removeEventListener('abort', onAbort);
        resolve(release);
      };
      this.#pump();
    });
  }

  outgoingOf(host: string): number {
    return this.#outgoing.get(host) ?? 0;
  }

  incomingOf(host: string): number {
    return this.#incoming.get(host) ?? 0;
  }

  #pump(): void {
    const fullOut = new Set<string>();
    const fullIn = new Set<string>();
    const priorities = [...this.#buckets.keys()].sort((x, y) => y - x);
    for (const p of priorities) {
      const bucket = this.#buckets.get(p)!;
      for (let i = 0; i < bucket.length && this.#cluster < this.#limits.cluster; ) {
        const { job } = bucket[i]!;
        if (fullOut.has(job.from) || fullIn.has(job.to)) {
          i++;
          continue;
        }
        if (this.outgoingOf(job.from) >= this.#limits.outgoingPerHost) fullOut.add(job.from);
        if (this.incomingOf(job.to) >= this.#limits.incomingPerHost) fullIn.add(job.to);
        if (fullOut.has(job.from) || fullIn.has(job.to)) {
          i++;
          continue;
        }
        const w = bucket.splice(i, 1)[0]!;
        this.#cluster++;
        this.#outgoing.set(job.from, this.outgoingOf(job.from) + 1);
        this.#incoming.set(job.to, this.incomingOf(job.to) + 1);
        let released = false;
        w.grant(() => {
          if (released) return;
          released = true;
          this.#cluster--;
          this.#outgoing.set(job.from, this.outgoingOf(job.from) - 1);
          this.#incoming.set(job.to, this.incomingOf(job.to) - 1);
          this.#pump();
        });
      }
      if (bucket.length === 0) this.#buckets.delete(p);
      if (this.#cluster >= this.#limits.cluster) return;
    }
  }
}

function lowerBound(bucket: Waiter[], seq: number): number {
  let lo = 0;
  let hi = bucket.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (bucket[mid]!.job.seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

