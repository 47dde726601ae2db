import type { QmpClient, QueryMigrateReturn } from '../qmp/index.js';
import type { SourceEndpoint } from './endpoint.js';
import { mirrorJobId } from './names.js';
import type { DiskProgress, MigrationPlan, Phase, ProgressSnapshot, RamProgress } from './types.js';

interface Sample {
  at: number;
  bytes: number;
}

/**
 * Turns QEMU's counters into what an operator wants to read: bytes really copied and still to
 * copy, rate and ETA. Disk bytes come from the kernel's counters on the NBD connection when the
 * source host can read them: the mirror's own offset/len count zero ranges that cost nothing on
 * the wire, so an 8 GiB disk holding 50 MiB would look like 8 GiB of work.
 */
export class ProgressTracker {
  readonly #plan: MigrationPlan;
  readonly #source: SourceEndpoint;
  readonly #started = performance.now();
  readonly #window: Sample[] = [];
  readonly #windowMs: number;
  #lastMovedAt = performance.now();
  #lastBytes = -1;
  #diskSent = 0;
  #diskSentMeasured = false;
  #ram: RamProgress | undefined;

  constructor(plan: MigrationPlan, source: SourceEndpoint, intervalMs: number) {
    this.#plan = plan;
    this.#source = source;
    this.#windowMs = Math.max(2_000, intervalMs * 4);
  }

  get ramTransferred(): number {
    return this.#ram?.transferredBytes ?? 0;
  }

  /** Milliseconds since any byte of disk or RAM last moved. */
  idleMs(): number {
    return performance.now() - this.#lastMovedAt;
  }

  recordFinalRam(mig: QueryMigrateReturn): void {
    this.#ram = ramProgress(mig) ?? this.#ram;
  }

  /** Disk bytes sent to the destination: measured where possible, else the jobs' counters. */
  async finalDiskBytes(): Promise<number> {
    const sent = await this.#measureSent();
    if (sent !== undefined) return sent;
    return this.#diskSent;
  }

  async sample(
    qmp: QmpClient,
    dest: { nbdPort: number },
    phase: Phase,
    downtimeLimitMs: number,
    mig: QueryMigrateReturn | undefined,
  ): Promise<ProgressSnapshot> {
    this.#nbdPeer = { port: dest.nbdPort };
    const jobs = await qmp.execute('query-block-jobs', undefined, { timeoutMs: 10_000 });
    const sent = await this.#measureSent();
    const disks: DiskProgress[] = this.#plan.disks.map((d) => {
      const job = jobs.find((j) => j.device === mirrorJobId(d.id));
      return {
        id: d.id,
        allocatedBytes: d.allocatedBytes,
        sentBytes: undefined,
        jobOffset: job?.offset ?? 0,
        jobLength: job?.len ?? 0,
        ready: job?.ready ?? false,
      };
    });
    const jobOffsets = disks.reduce((s, d) => s + d.jobOffset, 0);
    const allocated = disks.reduce((s, d) => s + d.allocatedBytes, 0);
    // Per-disk wire bytes are not separable on one NBD server; the total is.
    const diskCopied = sent ?? Math.min(jobOffsets, allocated);
    this.#diskSent = Math.max(this.#diskSent, diskCopied);
    if (mig) this.#ram = ramProgress(mig) ?? this.#ram;

    const moved = diskCopied + (this.#ram?.transferredBytes ?? 0);
    const now = performance.now();
    if (moved !== this.#lastBytes) {
      this.#lastBytes = moved;
      this.#lastMovedAt = now;
    }
    this.#window.push({ at: now, bytes: moved });
    while (this.#window.length > 2 && now - this.#window[0]!.at > this.#windowMs) this.#window.shift();
    const first = this.#window[0]!;
    const rate = now > first.at ? ((moved - first.bytes) * 1000) / (now - first.at) : 0;

    const allReady = disks.every((d) => d.ready);
    const diskLeft = allReady ? 0 : Math.max(0, allocated - diskCopied);
    const ramLeft = this.#ram ? this.#ram.remainingBytes : this.#plan.ramBytes;
    const etaMs = rate > 0 ? ((diskLeft + ramLeft) * 1000) / rate : undefined;
    return {
      phase,
      elapsedMs: Math.round(now - this.#started),
      disks,
      diskCopiedBytes: diskCopied,
      diskTotalBytes: Math.max(allocated, diskCopied),
      ram: this.#ram,
      rateBytesPerSec: Math.round(rate),
      etaMs: etaMs === undefined ? undefined : Math.round(etaMs),
      downtimeLimitMs,
    };
  }

  #nbdPeer: { port: number } | undefined;

  async #measureSent(): Promise<number | undefined> {
    if (!this.#nbdPeer) return undefined;
    const host = this.#plan.destinationHost;
    const sent = await this.#source.nbdBytesSent({ host, port: this.#nbdPeer.port });
    if (sent !== undefined) {
      this.#diskSentMeasured = true;
      this.#diskSent = Math.max(this.#diskSent, sent);
      return this.#diskSent;
    }
    return this.#diskSentMeasured ? this.#diskSent : undefined;
  }
}

function ramProgress(mig: QueryMigrateReturn): RamProgress | undefined {
  const ram = mig.ram;
  if (!ram || !mig.status) return undefined;
  return {
    status: mig.status,
    transferredBytes: ram.transferred,
    remainingBytes: ram.remaining,
    totalBytes: ram.total,
    mbps: ram.mbps ?? 0,
    dirtyPagesRate: ram['dirty-pages-rate'] ?? 0,
    dirtySyncCount: ram['dirty-sync-count'] ?? 0,
    expectedDowntimeMs: mig['expected-downtime'],
  };
}
