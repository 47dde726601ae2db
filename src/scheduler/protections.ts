/**
 * Standby replicas through the scheduler (issue 12): one Protection loop (src/replica/
 * protection.ts) per protected VM, its rows in the store, its two sides spoken through the
 * agents: the source agent runs each sync's steps on the VM's own QEMU (vm.replica*), the standby
 * agent owns the replica's qemu-storage-daemon (replica.*). A connection per call, so an agent
 * that restarts between two syncs is simply there again at the next one (its replica re-attached).
 *
 * A restarted scheduler starts every stored loop again; the first sync reconciles the source's
 * bitmaps with the standby's consistent seq, so replication resumes without a full resync.
 *
 * Scheduler replicas on PostgreSQL lease the loops (store.claimProtections): each protection's
 * loop runs on the one replica holding its lease, renewed every third of it; a replica that dies
 * loses its loops to whoever claims next, which resumes them the same incremental way. An
 * operation on a protection (unprotect, recover, a delta evacuation) first takes its lease on
 * the replica that was asked: the holder is asked to hand it over (its loop stopped, the sync in
 * flight ended), or it expires.
 */
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { errorText, FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import type { TlsMaterial } from '../host/tls.js';
import { AgentClient } from '../agent/client.js';
import { replicaDisksSchema, replicaStatusSchema, syncOutcomeSchema } from '../agent/replica-protocol.js';
import { hostInfoSchema, vmSummarySchema, type Method } from '../agent/protocol.js';
import { planDataTls, type DataTlsMode, type DataTlsPlan, type SideDataTls } from '../engine/data-tls-plan.js';
import { MigrationError } from '../engine/types.js';
import { Protection, type SourceSide, type StandbySide } from '../replica/protection.js';
import type { ReplicaTarget } from '../replica/standby-daemon.js';
import type { HostConfig } from './agents.js';
import type { protectionMethods, ProtectionStatusRow } from './protection-protocol.js';
import type { ProtectionRow, RecoveryRow, SchedulerStore } from './store.js';
import { SchedulerError, type MigrationJob, type MigrationMode } from './types.js';
import type { DeltaReplica } from '../engine/delta.js';
import type { MigrationOutcome } from '../engine/outcome.js';

const CALL_MS = 30_000;
const SYNC_CALL_MS = 600_000;
const targetSchema = z.object({ seq: z.number(), host: z.string(), port: z.number(), exports: z.record(z.string(), z.string()) });
const vmGetSchema = z.looseObject({ vmId: z.string(), name: z.string(), state: z.string(), spec: z.unknown() });

export class ProtectionService {
  readonly #store: SchedulerStore;
  readonly #hosts: HostConfig[];
  readonly #token: string;
  readonly #tls: TlsMaterial | undefined;
  readonly #log: Logger;
  readonly #loops = new Map<string, Protection>();
  /** Protections whose loop is held (the VM's whereabouts in doubt), and why: `protect status` says so. */
  readonly #suspended = new Map<string, string>();
  /** Each running loop's data path, once planned: what `protect status` says of it. */
  readonly #dataPaths = new Map<string, DataTlsPlan>();
  readonly #dataTls: DataTlsMode;
  /** Shared store: this replica's name in the leases, and their length. */
  readonly #lease: { owner: string; leaseMs: number } | undefined;
  /** Shared store: protections whose lease this replica took for an operation (no loop under it). */
  readonly #ops = new Set<string>();
  #ticker: NodeJS.Timeout | undefined;
  #ticking: Promise<void> | undefined;
  #renewedAt = 0;

  constructor(opts: { store: SchedulerStore; hosts: HostConfig[]; token: string; tls?: TlsMaterial | undefined; dataTls?: DataTlsMode | undefined; log: Logger; lease?: { owner: string; leaseMs: number } }) {
    this.#dataTls = opts.dataTls ?? 'preferred';
    this.#store = opts.store;
    this.#lease = opts.store.claimProtections ? opts.lease : undefined;
    this.#hosts = opts.hosts;
    this.#token = opts.token;
    this.#tls = opts.tls;
    this.#log = opts.log.child({ component: 'protections' });
  }

  /**
   * Every stored protection's loop, started again (on a shared store: those this replica
   * claims); one whose VM now runs elsewhere (moved while no loop ran) follows it first (#current).
   */
  async start(): Promise<void> {
    if (!this.#lease) {
      for (const p of await this.#store.protections()) {
        const row = await this.#current(p);
        if (row) this.#startLoop(row);
      }
      return;
    }
    await this.#claim();
    const every = Math.max(200, Math.floor(this.#lease.leaseMs / 3));
    this.#ticker = setInterval(() => void this.#claim(), every);
  }

  async stop(): Promise<void> {
    clearInterval(this.#ticker);
    this.#ticker = undefined;
    await this.#ticking;
    const ran = [...this.#loops.keys()];
    await Promise.all([...this.#loops.values()].map((l) => l.stop()));
    this.#loops.clear();
    this.#dataPaths.clear();
    // Handed back at once, so another replica resumes the loops without waiting out the leases.
    if (this.#lease) for (const vm of ran) await this.#store.releaseProtection!(vm, this.#lease.owner).catch(() => undefined);
  }

  /** One round of the leases: claim and renew, hand over what was asked, run what is held. */
  #claim(): Promise<void> {
    this.#ticking ??= (async () => {
      const lease = this.#lease!;
      try {
        const { held, handOver } = await this.#store.claimProtections!(lease.owner, lease.leaseMs);
        this.#renewedAt = performance.now();
        for (const vm of handOver) {
          await this.#stopLoop(vm);
          await this.#store.releaseProtection!(vm, lease.owner);
          this.#log.info({ vm }, 'handed a sync loop over to the replica that asked');
        }
        const keep = new Set([...held, ...this.#ops]);
        for (const vm of [...this.#loops.keys()]) if (!keep.has(vm)) await this.#stopLoop(vm);
        for (const vm of held) {
          if (this.#loops.has(vm) || this.#ops.has(vm)) continue;
          const stored = await this.#store.protection(vm);
          const row = stored && (await this.#current(stored));
          if (row && !this.#loops.has(vm) && !this.#ops.has(vm)) this.#startLoop(row);
        }
      } catch (err) {
        // Past most of a lease without renewing, another replica may take the loops at any moment.
        if (performance.now() - this.#renewedAt > 0.75 * lease.leaseMs && this.#loops.size > 0) {
          this.#log.warn({ err: errorText(err) }, 'cannot renew the sync loops\' leases: stopping them (another replica resumes them)');
          for (const vm of [...this.#loops.keys()]) await this.#stopLoop(vm);
        } else this.#log.warn({ err: errorText(err) }, 'cannot renew the sync loops\' leases; trying again');
      } finally {
        this.#ticking = undefined;
      }
    })();
    return this.#ticking;
  }

  async #stopLoop(vm: string): Promise<void> {
    const loop = this.#loops.get(vm);
    this.#loops.delete(vm);
    this.#dataPaths.delete(vm);
    await loop?.stop();
  }

  /**
   * Before an operation on a protection: no loop may sync under it. On a shared store its lease
   * is taken for the operation (the holder hands it over, or the lease runs out); here, the
   * local loop stops.
   */
  async #acquire(vm: string): Promise<void> {
    if (this.#lease) {
      const { owner, leaseMs } = this.#lease;
      const deadline = performance.now() + 2 * leaseMs + 10_000;
      while (!(await this.#store.takeProtection!(vm, owner, leaseMs))) {
        if (performance.now() > deadline) throw new SchedulerError('PROTECTION_BUSY', `another scheduler replica runs the sync loop of ${vm} and did not hand it over within ${Math.round((2 * leaseMs + 10_000) / 1000)} s`);
        await new Promise((r) => setTimeout(r, 250));
      }
      this.#ops.add(vm);
    }
    await this.#stopLoop(vm);
  }

  /** After an operation: the loop may run again (wherever its lease is claimed next). */
  async #release(vm: string): Promise<void> {
    if (!this.#lease) return;
    this.#ops.delete(vm);
    await this.#store.releaseProtection!(vm, this.#lease.owner);
  }

  async protect(p: z.infer<(typeof protectionMethods)['protect']>): Promise<ProtectionStatusRow> {
    if (await this.#store.protection(p.vm)) throw new SchedulerError('ALREADY_PROTECTED', `${p.vm} is already protected`, { userError: true });
    const standby = this.#host(p.standby);
    const found = await this.#find(p.vm);
    if (!found) throw new SchedulerError('VM_NOT_FOUND', `no running VM named '${p.vm}' on any host`, { userError: true });
    if (found.host.name === standby.name) throw new SchedulerError('STANDBY_IS_SOURCE', `${p.vm} runs on ${standby.name}: its standby must be another host`, { userError: true });
    // Refused here, before anything is made, when a side requires TLS the other cannot give.
    await this.#planTls(found.host, standby);
    const disks = await this.#call(found.host, 'vm.replicaDisks', { vmId: found.vmId }, (r) => replicaDisksSchema.parse(r));
    const needBytes = disks.reduce((s, d) => s + d.allocatedBytes, 0);
    // The standby checks its room before anything is made, and refuses with what it has.
    await this.#call(standby, 'replica.create', { vm: p.vm, disks: disks.map((d) => ({ id: d.id, virtualSize: d.virtualSize })), needBytes }, (r) => replicaStatusSchema.parse(r));
    const row: ProtectionRow = { vm: p.vm, source: found.host.name, standby: standby.name, intervalMs: p.intervalMs, spec: found.spec, createdAt: Date.now() };
    await this.#store.addProtection(row);
    if (this.#lease) await this.#claim();
    else this.#startLoop(row);
    return this.#statusOf(row);
  }

  async unprotect(vm: string): Promise<{ vm: string }> {
    const row = await this.#row(vm);
    await this.#acquire(vm);
    this.#suspended.delete(vm);
    const found = await this.#find(vm).catch(() => undefined);
    if (found) await this.#call(found.host, 'vm.replicaRemove', { vmId: found.vmId }, () => undefined).catch((err: unknown) => this.#log.warn({ vm, err: errorText(err) }, 'removing the source bitmaps failed'));
    try {
      await this.#call(this.#host(row.standby), 'replica.destroy', { vm }, () => undefined);
      await this.#store.removeProtection(vm);
    } finally {
      await this.#release(vm);
    }
    return { vm };
  }

  async status(): Promise<ProtectionStatusRow[]> {
    return Promise.all((await this.#store.protections()).map((p) => (this.#lease && !this.#loops.has(p.vm) && !this.#suspended.has(p.vm) ? this.#remoteStatusOf(p) : this.#statusOf(p))));
  }

  /** A loop another replica runs: what the standby's agent holds is the truth (its counters start at the replica's). */
  async #remoteStatusOf(p: ProtectionRow): Promise<ProtectionStatusRow> {
    const st = await this.#call(this.#host(p.standby), 'replica.status', { vm: p.vm }, (r) => replicaStatusSchema.parse(r)).catch(() => undefined);
    if (!st) return this.#statusOf(p);
    return {
      ...this.#statusOf(p),
      state: this.#ops.has(p.vm) ? 'paused' : st.syncing ? 'syncing' : 'idle',
      consistentAt: st.consistent?.pointAt ?? null,
      rpoMs: st.consistent ? Math.max(0, Date.now() - st.consistent.pointAt) : null,
      lastBytes: st.lastSync?.bytes ?? null,
      lastDurationMs: st.lastSync?.durationMs ?? null,
      syncs: st.lastSync?.seq ?? 0,
      failedSyncs: st.failedSyncs,
    };
  }

  async recover(p: z.infer<(typeof protectionMethods)['recover']>): Promise<RecoveryRow> {
    const row = await this.#row(p.vm);
    const source = this.#host(row.source);
    // Never two copies: the source agent must say the VM does not run there; an unreachable
    // one proves nothing, unless the operator states the host is fenced.
    const onSource = await this.#call(source, 'vm.list', {}, (r) => z.array(vmSummarySchema).parse(r)).then(
      (vms) => ({ reachable: true, running: vms.some((v) => v.name === p.vm && v.running) }),
      () => ({ reachable: false, running: false }),
    );
    if (onSource.running) throw new SchedulerError('SOURCE_RUNNING', `refusing to recover ${p.vm}: ${source.name} still runs it (migrate it instead)`, { userError: true });
    if (!onSource.reachable && !p.sourceFenced) {
      throw new SchedulerError('SOURCE_UNKNOWN', `refusing to recover ${p.vm}: ${source.name} cannot be reached, so it may still run the guest; make sure the host is off, then pass --source-fenced`, { userError: true });
    }
    await this.#acquire(p.vm);
    this.#suspended.delete(p.vm);
    const failedAt = Date.now();
    const id = `r-${randomBytes(5).toString('hex')}`;
    try {
      const r = await this.#call(this.#host(row.standby), 'replica.recover', { vm: p.vm, spec: row.spec }, (x) => z.looseObject({ seq: z.number(), pointAt: z.number() }).parse(x), SYNC_CALL_MS);
      const rec: RecoveryRow = { id, vm: p.vm, source: row.source, standby: row.standby, state: 'succeeded', seq: r.seq, pointAt: r.pointAt, rpoMs: Math.max(0, failedAt - r.pointAt), detail: `booted on ${row.standby} from sync ${r.seq}`, createdAt: failedAt };
      await this.#store.addRecovery(rec);
      // The replica is the VM's disk now: nothing is protected any more.
      await this.#store.removeProtection(p.vm);
      return rec;
    } catch (err) {
      await this.#store.addRecovery({ id, vm: p.vm, source: row.source, standby: row.standby, state: 'failed', seq: null, pointAt: null, rpoMs: null, detail: errorText(err), createdAt: failedAt });
      throw err;
    } finally {
      await this.#release(p.vm);
    }
  }

  /**
   * For a drain, or a migration that names no host: the VM's standby, when a migration there
   * would go by delta (precopy, the replica active with a consistent point); else undefined.
   */
  async preferredFor(vm: string, mode: MigrationMode): Promise<string | undefined> {
    const row = await this.#store.protection(vm);
    if (!row || mode !== 'precopy') return undefined;
    return (await this.#deltaReady(row)) ? row.standby : undefined;
  }

  /**
   * A migration of a VM is about to start. A protected VM's loop stops first, whatever the
   * destination: a backup job on the source would keep the migration from inactivating its disks,
   * and where the loop goes on depends on where the VM ends up (afterMigration). Onto the VM's
   * standby, with a consistent replica, it goes by delta; anything else is a full migration
   * (undefined).
   */
  async beforeMigration(job: MigrationJob): Promise<DeltaReplica | undefined> {
    const row = await this.#store.protection(job.vm);
    if (!row) return undefined;
    // Held until afterMigration (which is called whatever happens here).
    await this.#acquire(job.vm);
    if (row.standby !== job.to || job.mode !== 'precopy') return undefined;
    const st = await this.#deltaReady(row);
    if (!st) return undefined;
    const standby = this.#host(row.standby);
    const vm = job.vm;
    return {
      seq: st.seq,
      prepareOverlays: async (disks) => this.#call(standby, 'replica.prepareOverlays', { vm, disks }, () => undefined, SYNC_CALL_MS),
      restore: async (paths) => this.#call(standby, 'replica.restore', { vm, paths }, () => undefined, SYNC_CALL_MS),
    };
  }

  /**
   * A migration of a VM ended (`byDelta`: it went onto the replica). Where the guest runs decides:
   *   its source still (rolled back,       the loop goes on
   *   or the run never started)
   *   its standby, by delta                the replica is the VM's disk: protection ends
   *   its standby, by a full migration     the VM runs from its own copy; the replica is stale and
   *                                        a host cannot be its own VM's standby: replica removed,
   *                                        protection ends
   *   another host                         the protection follows the VM (follow())
   *   in doubt (uncertain, source died,    the loop stays stopped, `protect status` says
   *   lazy needing its source)             'suspended' and why
   */
  async afterMigration(job: MigrationJob, outcome: MigrationOutcome | undefined, byDelta: boolean): Promise<void> {
    const row = await this.#store.protection(job.vm);
    if (!row) return void (await this.#release(job.vm));
    // undefined: the run rejected before it changed anything (MigrationRunner's contract).
    if (!outcome || outcome.kind === 'rolledBack') return this.#resume(row);
    if (outcome.kind !== 'migrated') {
      // The lease (shared store) stays with this replica's operation: no other replica resumes it.
      this.#suspend(job.vm, `migration ${job.id} ended ${outcome.kind}: where ${job.vm} runs is not settled; syncs held (unprotect, or migrate it again once it runs)`);
      return;
    }
    const spec = await this.#call(this.#host(job.to), 'vm.get', { name: job.vm }, (r) => vmGetSchema.parse(r).spec).catch(() => row.spec);
    const next = await this.#moved(row, job.to, spec, byDelta);
    if (next) await this.#resume(next);
    else await this.#release(job.vm);
  }

  /** The loop runs again: here, or (shared store) wherever its lease is claimed next, likely here at once. */
  async #resume(row: ProtectionRow): Promise<void> {
    if (!this.#lease) {
      if (!this.#loops.has(row.vm)) this.#startLoop(row);
      return;
    }
    await this.#release(row.vm);
    await this.#claim();
  }

  /**
   * The VM runs on `host` now, not on the row's source (afterMigration's table): the protection
   * ends (onto its standby) or is re-targeted (elsewhere). Returns the row to run the loop with,
   * or undefined when the protection ended.
   */
  async #moved(row: ProtectionRow, host: string, spec: unknown, byDelta: boolean): Promise<ProtectionRow | undefined> {
    const vm = row.vm;
    this.#suspended.delete(vm);
    if (host === row.standby) {
      // A released replica (a delta evacuation, a recovery) is the VM's disk: destroy keeps its files.
      if (!byDelta) await this.#call(this.#host(row.standby), 'replica.destroy', { vm }, () => undefined).catch((err: unknown) => this.#log.warn({ vm, err: errorText(err) }, 'removing the stale replica failed; unprotect removes it'));
      await this.#store.removeProtection(vm);
      this.#log.info({ vm, standby: row.standby, byDelta }, byDelta ? 'evacuated onto its replica: protection ends' : 'runs on its standby now (a full migration): the stale replica removed, protection ends');
      return undefined;
    }
    // The replica stays: the next sync reconciles with the new source's bitmaps (a persistent
    // bitmap that migrated with the VM keeps it incremental; without it, a full sync).
    await this.#store.retargetProtection(vm, host, spec);
    this.#log.info({ vm, from: row.source, to: host, standby: row.standby }, 'the protected VM moved: its protection follows it');
    return { ...row, source: host, spec };
  }

  /** Before a loop starts: a VM that moved while no loop ran (the scheduler down) is followed first. */
  async #current(row: ProtectionRow): Promise<ProtectionRow | undefined> {
    const found = await this.#find(row.vm).catch(() => undefined);
    if (!found || found.host.name === row.source) return row;
    return this.#moved(row, found.host.name, found.spec, false);
  }

  /**
   * A running loop finds its replica released: a delta evacuation let go of it (`prepareOverlays`:
   * the daemon quits, the manifest says released) and its undo never ran. Its scheduler died (the
   * standby agent abandons the incoming VM, overlays and record, but not the replica's state), or
   * the standby agent was gone when the rollback called `replica.restore`. Every sync would fail on
   * a daemon that is not running. No loop runs during a migration (beforeMigration stops it) and
   * none after a delta evacuation arrived (the protection ends), so if the source runs the VM and
   * the standby holds no VM of that name (no disk stands on the chains), the replica is served
   * again as the rollback would have done (fault matrix: evacuate/kill-orchestrator,
   * evacuate/kill-destination-agent). True when it was.
   */
  async #reactivateAbandoned(row: ProtectionRow): Promise<boolean> {
    const standby = this.#host(row.standby);
    // Only a clear "no such VM" counts: anything else (a VM there, no answer) leaves it alone.
    const absent = await this.#call(standby, 'vm.get', { name: row.vm }, (r) => vmGetSchema.parse(r)).then(
      () => false,
      (err: unknown) => err instanceof FerryError && err.code === 'VM_NOT_FOUND',
    );
    const onSource = await this.#call(this.#host(row.source), 'vm.get', { name: row.vm }, (r) => vmGetSchema.parse(r).state === 'running').catch(() => false);
    if (!absent || !onSource) return false;
    await this.#call(standby, 'replica.restore', { vm: row.vm, paths: [] }, () => undefined, SYNC_CALL_MS);
    this.#log.warn({ vm: row.vm, standby: row.standby }, 'the replica was left released by an evacuation that did not end or roll back in full: served again');
    return true;
  }

  async #deltaReady(row: ProtectionRow): Promise<{ seq: number } | undefined> {
    const st = await this.#call(this.#host(row.standby), 'replica.status', { vm: row.vm }, (r) => replicaStatusSchema.parse(r));
    return st.consistent && st.state === 'active' ? { seq: st.consistent.seq } : undefined;
  }

  #suspend(vm: string, why: string): void {
    this.#suspended.set(vm, why);
    this.#log.warn({ vm, why }, 'protection suspended');
  }

  #statusOf(p: ProtectionRow): ProtectionStatusRow {
    const s = this.#loops.get(p.vm)?.status();
    return {
      vm: p.vm,
      source: p.source,
      standby: p.standby,
      intervalMs: p.intervalMs,
      state: this.#suspended.has(p.vm) ? 'suspended' : (s?.state ?? 'stopped'),
      consistentAt: s?.consistentAt ?? null,
      rpoMs: s?.rpoMs ?? null,
      lastBytes: s?.lastBytes ?? null,
      lastDurationMs: s?.lastDurationMs ?? null,
      syncs: s?.syncs ?? 0,
      failedSyncs: s?.failedSyncs ?? 0,
      lastError: this.#suspended.get(p.vm) ?? s?.lastError ?? null,
      dataPath: s ? dataPathOf(this.#dataPaths.get(p.vm)) : null,
    };
  }

  /**
   * TLS on the sync's data path, as a migration's (engine/data-tls-plan.ts) between the same two
   * hosts: the source QEMU is the NBD client and checks the standby's name (its migration
   * address, where the daemon listens), the daemon admits only the source's certificate name.
   */
  async #planTls(source: HostConfig, standby: HostConfig): Promise<DataTlsPlan> {
    const side = async (h: HostConfig): Promise<SideDataTls> => {
      const info = await this.#call(h, 'host.info', {}, (r) => hostInfoSchema.parse(r));
      // The QEMU pieces are not probed here: one that lacks them fails the sync loudly, never plain.
      return { ...info.dataTls, qemuMissing: [], address: info.migrationHost };
    };
    const [src, dst] = await Promise.all([side(source), side(standby)]);
    try {
      return planDataTls(this.#dataTls, src, dst);
    } catch (err) {
      if (!(err instanceof MigrationError)) throw err;
      throw new SchedulerError(err.code, `cannot replicate from ${source.name} to ${standby.name}: ${err.message}`, { userError: true, cause: err });
    }
  }

  #startLoop(p: ProtectionRow): void {
    const standby = this.#host(p.standby);
    const source = this.#host(p.source);
    // Planned once per loop (a failure is planned again at the next sync).
    let planned: Promise<DataTlsPlan> | undefined;
    const tls = (): Promise<DataTlsPlan> =>
      (planned ??= this.#planTls(source, standby).then(
        (plan) => (this.#dataPaths.set(p.vm, plan), plan),
        (err: unknown) => {
          planned = undefined;
          throw err;
        },
      ));
    const vmId = async (): Promise<string> => {
      const found = await this.#call(source, 'vm.get', { name: p.vm }, (r) => vmGetSchema.parse(r));
      return found.vmId;
    };
    const standbySide: StandbySide = {
      consistent: async () => {
        const st = await this.#call(standby, 'replica.status', { vm: p.vm }, (r) => replicaStatusSchema.parse(r));
        // Serving it again keeps the point: st.consistent stands either way.
        if (st.state === 'released') await this.#reactivateAbandoned(p);
        return st.consistent;
      },
      prepareSync: async (seq) => {
        const t = await tls();
        return this.#call(standby, 'replica.prepareSync', { vm: p.vm, seq, ...(t.encrypted ? { tls: { peerIdentity: t.source.identity } } : {}) }, (r): ReplicaTarget => targetSchema.parse(r));
      },
      completeSync: (seq, f) => this.#call(standby, 'replica.completeSync', { vm: p.vm, seq, ...f }, () => undefined, SYNC_CALL_MS),
      abortSync: (seq) => this.#call(standby, 'replica.abortSync', { vm: p.vm, seq }, () => undefined),
    };
    const sourceSide: SourceSide = {
      reconcile: async (consistentSeq) => this.#call(source, 'vm.replicaReconcile', { vmId: await vmId(), consistentSeq }, (r) => z.object({ previous: z.number().nullable() }).parse(r).previous),
      sync: async (i) => {
        // A backup job on the source would keep a migration from inactivating its disks: no sync
        // starts while the scheduler moves the VM (one already running when it starts may fail it,
        // which rolls back).
        const moving = await this.#store.activeFor(p.vm);
        if (moving) throw new SchedulerError('VM_MOVING', `${p.vm} is being migrated (${moving.id}): sync skipped`);
        const t = await tls();
        return this.#call(source, 'vm.replicaSync', { vmId: await vmId(), ...i, ...(t.encrypted ? { tlsHostname: t.destination.hostname } : {}) }, (r) => syncOutcomeSchema.parse(r), SYNC_CALL_MS);
      },
      commit: async (seq) => this.#call(source, 'vm.replicaCommit', { vmId: await vmId(), seq }, () => undefined),
      abort: async (seq) => this.#call(source, 'vm.replicaAbort', { vmId: await vmId(), seq }, () => undefined),
    };
    const loop = new Protection({ vm: p.vm, source: sourceSide, standby: standbySide, intervalMs: p.intervalMs, log: this.#log });
    this.#loops.set(p.vm, loop);
    loop.start();
  }

  /** Where a VM runs now (vm.list of every host) and its id and spec there. */
  async #find(vm: string): Promise<{ host: HostConfig; vmId: string; spec: unknown } | undefined> {
    for (const h of this.#hosts) {
      const got = await this.#call(h, 'vm.get', { name: vm }, (r) => vmGetSchema.parse(r)).catch(() => undefined);
      if (got && got.state === 'running') return { host: h, vmId: got.vmId, spec: got.spec };
    }
    return undefined;
  }

  async #row(vm: string): Promise<ProtectionRow> {
    const row = await this.#store.protection(vm);
    if (!row) throw new SchedulerError('NOT_PROTECTED', `${vm} is not protected`, { userError: true });
    return row;
  }

  #host(name: string): HostConfig {
    const h = this.#hosts.find((x) => x.name === name);
    if (!h) throw new SchedulerError('HOST_NOT_FOUND', `no host named '${name}'`, { userError: true });
    return h;
  }

  async #call<T>(host: HostConfig, method: Method, params: Record<string, unknown>, parse: (r: unknown) => T, timeoutMs = CALL_MS): Promise<T> {
    const c = await AgentClient.connect(host.url, this.#token, 5_000, this.#tls);
    try {
      return parse(await c.call(method, params, timeoutMs));
    } finally {
      c.close();
    }
  }
}

/** What `protect status` says of a loop's data path. */
function dataPathOf(plan: DataTlsPlan | undefined): string | null {
  if (!plan) return null;
  return plan.encrypted ? 'tls' : `plain: ${plan.reason}`;
}
