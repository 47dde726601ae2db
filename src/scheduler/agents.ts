/**
 * The scheduler's view of real hosts: their agents. Inventory from host.info and vm.list, each
 * migration run by the engine between two agents, and the settling of a migration that was in
 * flight when the scheduler died.
 */
import type { DataTlsMode } from '../engine/data-tls-plan.js';
import { z } from 'zod';
import { AgentClient, AgentDestination, AgentSource, type AgentFence } from '../agent/client.js';
import type { TlsMaterial } from '../host/tls.js';
import { hostInfoSchema, vmSummarySchema, type VmSummary } from '../agent/protocol.js';
import { migrateOutcome } from '../engine/migrate.js';
import type { MigrationOutcome } from '../engine/outcome.js';
import type { DeltaReplica } from '../engine/delta.js';
import { finishHydration, recoveryFor, rollBackSource, unexportSource } from '../engine/recover.js';
import type { SavedSourceSettings } from '../engine/types.js';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { SchedulerError, type HostInfo, type Inventory, type MigrationJob, type MigrationRunner, type Reconciler, type RunContext, type VmInfo, type WhereRuns, type Fence } from './types.js';

export const HostConfigSchema = z
  .object({
    name: z.string().min(1),
    url: z.string().regex(/^wss?:\/\/[^/]+$/, 'must be ws://HOST:PORT or wss://HOST:PORT'),
    /** Memory this host may give to VMs; default: all of its RAM. */
    memoryMiB: z.number().int().positive().optional(),
  })
  .strict();
export type HostConfig = z.infer<typeof HostConfigSchema>;

const MiB = 1024 * 1024;

export class AgentFleet implements Inventory, MigrationRunner, Reconciler {
  readonly #hosts: HostConfig[];
  readonly #token: string;
  readonly #log: Logger;

  readonly #tls: TlsMaterial | undefined;

  readonly #hydrationBytesPerSec: number | undefined;
  readonly #dataTls: DataTlsMode;

  constructor(hosts: HostConfig[], token: string, logger: Logger = silentLogger, tls?: TlsMaterial, opts: { hydrationBytesPerSec?: number; dataTls?: DataTlsMode } = {}) {
    this.#tls = tls;
    this.#hydrationBytesPerSec = opts.hydrationBytesPerSec;
    this.#dataTls = opts.dataTls ?? 'preferred';
    this.#hosts = hosts;
    this.#token = token;
    this.#log = logger.child({ component: 'fleet' });
  }

  #host(name: string): HostConfig {
    const h = this.#hosts.find((x) => x.name === name);
    if (!h) throw new SchedulerError('HOST_NOT_FOUND', `no host named '${name}'`, { userError: true });
    return h;
  }

  async #withClient<T>(host: HostConfig, fn: (c: AgentClient) => Promise<T>, fence?: AgentFence): Promise<T> {
    const c = await AgentClient.connect(host.url, this.#token, 5_000, this.#tls, fence);
    try {
      return await fn(c);
    } finally {
      c.close();
    }
  }

  async #list(host: HostConfig): Promise<VmSummary[]> {
    return this.#withClient(host, async (c) => z.array(vmSummarySchema).parse(await c.call('vm.list', {}, 10_000)));
  }

  /** Hosts whose agent answers; one that does not is left out (and logged), not fatal. */
  async hosts(): Promise<HostInfo[]> {
    const out = await Promise.all(
      this.#hosts.map(async (h) => {
        try {
          const info = hostInfoSchema.parse(await this.#withClient(h, (c) => c.call('host.info', {}, 15_000)));
          const capacity = h.memoryMiB ?? Math.floor(info.memoryBytes / MiB);
          return { name: h.name, freeMemoryMiB: capacity - info.vmMemoryMiB, freeDiskBytes: info.freeBytes };
        } catch (err) {
          this.#log.warn({ host: h.name, err: errorText(err) }, 'host unreachable: left out of planning');
          return undefined;
        }
      }),
    );
    return out.filter((h): h is HostInfo => h !== undefined);
  }

  /** Running VMs of every reachable host: what can move live. */
  async vms(): Promise<VmInfo[]> {
    const lists = await Promise.all(
      this.#hosts.map(async (h) => {
        try {
          return (await this.#list(h)).filter((v) => v.role === 'vm' && v.running).map((v) => ({ name: v.name, host: h.name, memoryMiB: v.memoryMiB, diskBytes: v.diskBytes }));
        } catch (err) {
          this.#log.warn({ host: h.name, err: errorText(err) }, 'host unreachable: its VMs are not listed');
          return [];
        }
      }),
    );
    return lists.flat();
  }

  async vm(name: string): Promise<VmInfo | undefined> {
    return (await this.vms()).find((v) => v.name === name);
  }

  #endpointOpts(fence: AgentFence | undefined): { tls?: TlsMaterial; fence?: AgentFence } {
    return { ...(this.#tls ? { tls: this.#tls } : {}), ...(fence ? { fence } : {}) };
  }

  /**
   * Standby replicas (src/scheduler/protections.ts): `before` pauses a protected VM's syncs and
   * says whether the migration goes by delta (onto its standby); `after` learns how it ended and
   * where the VM runs, so the protection ends, follows the VM, or goes on (outcome undefined: the
   * run rejected, which changed nothing).
   */
  replicas: { before(job: MigrationJob): Promise<DeltaReplica | undefined>; after(job: MigrationJob, outcome: MigrationOutcome | undefined, byDelta: boolean): Promise<void> } | undefined;

  async run(job: MigrationJob, ctx: RunContext): Promise<MigrationOutcome> {
    const delta = await this.replicas?.before(job).catch((err: unknown) => {
      this.#log.warn({ vm: job.vm, err: String(err) }, 'no delta evacuation: a full migration instead');
      return undefined;
    });
    let outcome: MigrationOutcome | undefined;
    try {
      outcome = await this.#run(job, ctx, delta);
      return outcome;
    } finally {
      await this.replicas?.after(job, outcome, delta !== undefined).catch((err: unknown) => this.#log.warn({ vm: job.vm, err: String(err) }, 'after the migration of a protected VM'));
    }
  }

  async #run(job: MigrationJob, ctx: RunContext, delta: DeltaReplica | undefined): Promise<MigrationOutcome> {
    const fence = ctx.fence ? { vm: job.vm, epoch: ctx.fence.epoch } : undefined;
    const source = await AgentSource.connect(this.#host(job.from).url, this.#token, job.vm, this.#endpointOpts(fence));
    try {
      const destination = await AgentDestination.connect(this.#host(job.to).url, this.#token, this.#endpointOpts(fence));
      try {
        return await migrateOutcome({
          spec: source.spec,
          source,
          destination,
          migrationId: job.id.replace(/^m-/, '').slice(0, 8),
          options: {
            mode: job.mode,
            dataTls: this.#dataTls,
            ...(ctx.bandwidthBytesPerSec > 0 ? { bandwidthBytesPerSec: ctx.bandwidthBytesPerSec } : {}),
            ...(job.mode === 'lazy' && this.#hydrationBytesPerSec ? { hydrationBytesPerSec: this.#hydrationBytesPerSec } : {}),
          },
          signal: ctx.signal,
          logger: this.#log,
          // Persisted before the engine goes on: a phase, and the source's settings.
          durable: async (e) => {
            if (e.event === 'phase') await ctx.onPhase(e.phase);
            else await ctx.onSourceSaved?.(e.saved);
          },
          ...(delta ? { delta } : {}),
          onEvent: (e) => {
            if (e.event === 'progress') {
              const p = e.progress;
              const ram = p.ram ? { done: p.ram.transferredBytes, total: p.ram.transferredBytes + p.ram.remainingBytes } : { done: 0, total: 0 };
              ctx.onProgress?.({ phase: p.phase, doneBytes: p.diskCopiedBytes + ram.done, totalBytes: p.diskTotalBytes + ram.total, bytesPerSec: Math.round(p.rateBytesPerSec), etaMs: p.etaMs ?? null });
            } else if (e.event === 'hydration') {
              const done = e.disks.reduce((s, d) => s + d.doneBytes, 0);
              ctx.onProgress?.({ phase: 'hydrate', doneBytes: done, totalBytes: e.disks.reduce((s, d) => s + d.totalBytes, 0), bytesPerSec: e.elapsedMs > 0 ? Math.round((done * 1000) / e.elapsedMs) : 0, etaMs: null });
            }
          },
        });
      } finally {
        destination.close();
      }
    } finally {
      source.close();
    }
  }

  /**
   * The recovery table (engine/recover.ts `recoveryFor`) on the last persisted phase, checked
   * against the destination's own word:
   *   roll-back:        destination not running -> abandon it, roll the source back: 'from'
   *   ask-destination:  running -> hand over: 'to'; not running -> roll back: 'from'
   *   hand-over:        running -> finish the hydration, retire the source: 'to'
   *   anything else (no answer, or a destination whose state contradicts the phase) -> touch
   *   nothing: 'unknown'. The source is resumed only if it ran before (its saved settings).
   */
  async settle(job: MigrationJob, saved: SavedSourceSettings | undefined, claim?: Fence): Promise<{ runsOn: WhereRuns; detail: string }> {
    const to = this.#host(job.to);
    const fence = claim ? { vm: job.vm, epoch: claim.epoch } : undefined;
    // A takeover first raises the epoch on both agents: from here on the replica that held the
    // migration before cannot change anything there, whatever it still believes.
    if (fence) {
      for (const h of [this.#host(job.from), to]) {
        try {
          await this.#withClient(h, (c) => c.call('fence.advance', {}, 10_000), fence);
        } catch (err) {
          throw new SchedulerError('FENCE_UNCONFIRMED', `cannot raise the fencing epoch of ${job.vm} to ${fence.epoch} on ${h.name}: ${errorText(err)}`, { cause: err });
        }
      }
    }
    return this.#settleFenced(job, saved, fence);
  }

  async #settleFenced(job: MigrationJob, saved: SavedSourceSettings | undefined, fence: AgentFence | undefined): Promise<{ runsOn: WhereRuns; detail: string }> {
    const to = this.#host(job.to);
    let destList: VmSummary[];
    try {
      destList = await this.#list(to);
    } catch (err) {
      return { runsOn: 'unknown', detail: `destination ${to.name} unreachable: ${errorText(err)}` };
    }
    if (destList.some((v) => v.name === job.vm && v.role === 'vm' && v.running)) return { runsOn: 'to', detail: `${job.vm} already runs on ${to.name}` };
    const incoming = destList.find((v) => v.name === job.vm && v.role === 'incoming');
    let destStatus: string | undefined = 'absent';
    if (incoming?.running) {
      destStatus = await this.#withClient(to, async (c) => {
        const q = await c.openQmp(incoming.vmId, 10_000);
        try {
          return (await q.execute('query-status', undefined, { timeoutMs: 10_000 })).status;
        } finally {
          await q.close();
        }
      }).catch(() => undefined);
    }
    if (destStatus === undefined) return { runsOn: 'unknown', detail: `cannot ask the destination QEMU of ${job.vm} on ${to.name} whether it runs` };
    const action = recoveryFor(job.phase);
    const runs = destStatus === 'running';
    if (runs && incoming && action !== 'roll-back') return this.#handOver(job, incoming.vmId, fence);
    if (!runs && action !== 'hand-over') return this.#rollBack(job, saved, incoming?.vmId, destStatus, fence);
    return {
      runsOn: 'unknown',
      detail: `the phase (${job.phase ?? 'none'}) and the destination (${destStatus}) disagree: ${runs ? 'it runs though cont was never sent' : 'the guest ran there but its QEMU is not running'}; nothing touched`,
    };
  }

  /**
   * The guest moved. Lazy mode: the destination may still read from the source, so first every
   * overlay is hydrated to the end; then the source must be in postmigrate (vm.retire checks) and goes.
   */
  async #handOver(job: MigrationJob, vmId: string, fence: AgentFence | undefined): Promise<{ runsOn: WhereRuns; detail: string }> {
    const from = this.#host(job.from);
    const to = this.#host(job.to);
    const hydrated = await this.#withClient(to, async (c) => {
      const q = await c.openQmp(vmId, 10_000);
      try {
        return await finishHydration(q, this.#log, { bytesPerSec: this.#hydrationBytesPerSec });
      } finally {
        await q.close();
      }
    }, fence);
    // A source already gone (retired before the crash) has nothing left to do.
    if ((await this.#list(from)).some((v) => v.name === job.vm && v.role === 'vm' && v.running)) {
      const source = await AgentSource.connect(from.url, this.#token, job.vm, this.#endpointOpts(fence));
      try {
        const q = await source.connect({ timeoutMs: 10_000 });
        await unexportSource(q);
        // Closes q; the agent quits the source (refused unless postmigrate) and removes its disks.
        await source.retireSource(q, { timeoutMs: 30_000 });
      } finally {
        source.close();
      }
    }
    await this.#withClient(to, (c) => c.call('dest.release', { vmId }), fence);
    return { runsOn: 'to', detail: `the destination ran ${job.vm}: hand-over finished${hydrated.length ? ` (${hydrated.join(', ')})` : ''}` };
  }

  /** The destination never ran the guest: it goes, and the source is made whole again. */
  async #rollBack(job: MigrationJob, saved: SavedSourceSettings | undefined, vmId: string | undefined, destStatus: string, fence: AgentFence | undefined): Promise<{ runsOn: WhereRuns; detail: string }> {
    const from = this.#host(job.from);
    const to = this.#host(job.to);
    if (vmId) await this.#withClient(to, (c) => c.call('dest.abandon', { vmId }, 40_000), fence);
    let source: AgentSource;
    try {
      source = await AgentSource.connect(from.url, this.#token, job.vm, this.#endpointOpts(fence));
    } catch (err) {
      return { runsOn: 'unknown', detail: `${job.vm} runs on neither host (source: ${errorText(err)})` };
    }
    try {
      const q = await source.connect({ timeoutMs: 10_000 });
      try {
        const did = await rollBackSource(q, this.#log, { saved });
        return { runsOn: 'from', detail: `rolled back on ${from.name}${did.length ? `: ${did.join(', ')}` : ''}${vmId ? `; abandoned the destination QEMU (${destStatus})` : ''}` };
      } finally {
        await q.close();
      }
    } finally {
      source.close();
    }
  }
}
