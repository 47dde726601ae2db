/**
 * The standby replicas an agent owns (issue 12), one folder each under
 * `<storageRoot>/replicas/<principal-hash>-<vm>/` (manifest, chains, daemon socket). Each is a
 * StandbyReplica (src/replica/standby-daemon.ts) whose qemu-storage-daemon outlives the agent, as
 * its VMs do; a restarted agent re-opens every manifest and re-attaches (or starts the daemon
 * again on the same chains). Also the source side of a sync, on the agent's own monitor of a VM.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import type { z } from 'zod';
import { errorText } from '../errors.js';
import type { Logger } from '../log.js';
import type { QmpClient } from '../qmp/index.js';
import { ReplicaError } from '../replica/errors.js';
import { sourceAbortSync, sourceCommitBitmaps, sourceReconcileBitmaps, sourceRemoveReplicaBitmaps, sourceSync } from '../replica/source-sync.js';
import { StandbyReplica } from '../replica/standby-daemon.js';
import { replicaDelta } from '../replica/delta-replica.js';
import { randomOrder } from '../host/ports.js';
import { allocatedBytes } from '../host/disk-files.js';
import { diskNodeName } from '../qemu/spec.js';
import { AgentError } from './errors.js';
import type { replicaMethodParams, ReplicaStatus } from './replica-protocol.js';
import type { VmRecord } from './registry.js';
import type { HostTlsMaterial } from '../host/data-tls.js';

type P = typeof replicaMethodParams;
type Handler<M extends keyof P> = (principal: string, params: z.infer<P[M]>) => Promise<unknown>;
export type ReplicaHandlers = { [M in keyof P]: Handler<M> };

export interface AgentReplicaDeps {
  storageRoot: string;
  migrationHost: string;
  portRange: [number, number];
  log: Logger;
  /** A VM of this principal, by id (refuses another's). */
  owned(principal: string, vmId: string): VmRecord;
  /** The agent's own monitor of a running VM. */
  monitor(vmId: string): QmpClient | undefined;
  /** Is host an address this agent's VMs may send data to (a migration peer)? */
  peerAllowed(host: string): boolean;
  /** A disk path of a caller's request, confined to the storage root and claimed for it (dest.createDisk's rules). */
  claimDisk(principal: string, path: string): string;
  /** A path this caller claimed, confined (dest.removeDisk's rules). */
  ownedDisk(principal: string, path: string): string;
  /** Undo of claimDisk (the file is gone). */
  releaseDisk(path: string): void;
  /** Creates and starts a VM of this host from a spec (vm.create + vm.start, placement checked). */
  startVm(principal: string, spec: unknown): Promise<unknown>;
  /** The agent's data-path TLS: `required` refuses a plain sync on either side. */
  dataTls: { mode: 'required' | 'preferred' | 'off'; material(): HostTlsMaterial };
}

export class AgentReplicas {
  readonly #d: AgentReplicaDeps;
  readonly #root: string;
  readonly #replicas = new Map<string, StandbyReplica>();
  readonly #syncing = new Set<string>();

  constructor(d: AgentReplicaDeps) {
    this.#d = d;
    this.#root = join(d.storageRoot, 'replicas');
  }

  /** After a restart: every replica re-opened (daemon re-attached or started again on its chains). */
  async load(): Promise<void> {
    if (!existsSync(this.#root)) return;
    for (const name of readdirSync(this.#root)) {
      const dir = join(this.#root, name);
      if (!existsSync(join(dir, 'manifest.json'))) continue;
      try {
        const r = await StandbyReplica.open({ dir, host: this.#d.migrationHost, log: this.#d.log });
        this.#replicas.set(name, r);
      } catch (err) {
        this.#d.log.error({ dir, err: errorText(err) }, 'cannot re-open a replica');
      }
    }
  }

  /** The agent stops: its daemons keep the replicas. */
  async detach(): Promise<void> {
    for (const r of this.#replicas.values()) await r.detach();
  }

  #key(principal: string, vm: string): string {
    return `${createHash('sha256').update(principal).digest('hex').slice(0, 8)}-${vm}`;
  }

  #get(principal: string, vm: string): StandbyReplica {
    const r = this.#replicas.get(this.#key(principal, vm));
    if (!r) throw new AgentError('NO_REPLICA', `no replica of '${vm}' of yours on this host`, { userError: true });
    return r;
  }

  #status(r: StandbyReplica, key: string): ReplicaStatus {
    const m = r.manifest;
    return { vm: m.vm, state: m.state, consistent: m.consistent, lastSync: m.lastSync, failedSyncs: m.failedSyncs, syncing: this.#syncing.has(key) || m.pending !== null, daemonPid: m.daemon?.pid ?? null };
  }

  #monitor(principal: string, vmId: string): QmpClient {
    const r = this.#d.owned(principal, vmId);
    const q = r.state === 'running' ? this.#d.monitor(vmId) : undefined;
    if (!q) throw new AgentError('VM_NOT_RUNNING', `VM '${r.name}' is not running (or the agent holds no monitor of it)`, { userError: true });
    return q;
  }

  handlers(): ReplicaHandlers {
    return {
      'replica.create': async (principal, p) => {
        const key = this.#key(principal, p.vm);
        if (this.#replicas.has(key)) throw new AgentError('REPLICA_EXISTS', `a replica of '${p.vm}' already exists here`, { userError: true });
        mkdirSync(this.#root, { recursive: true, mode: 0o700 });
        const port = await firstFreePort(this.#d.migrationHost, this.#d.portRange);
        const r = await StandbyReplica.create({ dir: join(this.#root, key), host: this.#d.migrationHost, port, vm: p.vm, disks: p.disks, needBytes: p.needBytes, log: this.#d.log });
        this.#replicas.set(key, r);
        return this.#status(r, key);
      },
      'replica.status': async (principal, p) => this.#status(this.#get(principal, p.vm), this.#key(principal, p.vm)),
      'replica.prepareSync': async (principal, p) => {
        const key = this.#key(principal, p.vm);
        const r = this.#get(principal, p.vm);
        if (!p.tls && this.#d.dataTls.mode === 'required') throw new AgentError('DATA_TLS_REQUIRED', 'this agent requires TLS on the data path: replica.prepareSync needs tls', { userError: true });
        const target = await r.prepareSync(p.seq, { tls: p.tls ? { material: this.#d.dataTls.material(), peerIdentity: p.tls.peerIdentity } : undefined });
        this.#syncing.add(key);
        return target;
      },
      'replica.completeSync': async (principal, p) => {
        this.#syncing.delete(this.#key(principal, p.vm));
        await this.#get(principal, p.vm).completeSync(p.seq, { pointAt: p.pointAt, bytes: p.bytes, durationMs: p.durationMs });
        return {};
      },
      'replica.abortSync': async (principal, p) => {
        this.#syncing.delete(this.#key(principal, p.vm));
        await this.#get(principal, p.vm).abortSync(p.seq);
        return {};
      },
      'replica.destroy': async (principal, p) => {
        const key = this.#key(principal, p.vm);
        const r = this.#replicas.get(key);
        if (!r) return {};
        await r.destroy();
        this.#replicas.delete(key);
        return {};
      },
      'replica.recover': async (principal, p) => {
        const r = this.#get(principal, p.vm);
        if (!r.manifest.consistent) throw new ReplicaError('NO_REPLICA', `the replica of ${p.vm} has no consistent point: nothing to recover from`, { userError: true });
        const consistent = r.manifest.consistent;
        const { tops } = await r.release();
        const spec = { ...(withDisks(p.spec, tops) as object), runDir: join(r.dir, 'run') };
        const started = await this.#d.startVm(principal, spec);
        return { seq: consistent.seq, pointAt: consistent.pointAt, started };
      },
      'replica.prepareOverlays': async (principal, p) => {
        const r = this.#get(principal, p.vm);
        const disks = p.disks.map((d) => ({ ...d, path: this.#d.claimDisk(principal, d.path) }));
        try {
          await replicaDelta(r).prepareOverlays(disks, {});
        } catch (err) {
          for (const d of disks) this.#d.releaseDisk(d.path);
          throw err;
        }
        return {};
      },
      'replica.restore': async (principal, p) => {
        const r = this.#get(principal, p.vm);
        const paths = p.paths.map((x) => this.#d.ownedDisk(principal, x));
        await replicaDelta(r, { allowReleased: true }).restore(paths);
        for (const x of paths) this.#d.releaseDisk(x);
        return {};
      },
      'vm.replicaReconcile': async (principal, p) => {
        const q = this.#monitor(principal, p.vmId);
        return { previous: await sourceReconcileBitmaps(q, { disks: this.#d.owned(principal, p.vmId).spec.disks, consistentSeq: p.consistentSeq }) };
      },
      'vm.replicaSync': async (principal, p) => {
        const q = this.#monitor(principal, p.vmId);
        if (!this.#d.peerAllowed(p.target.host)) throw new AgentError('PEER_REFUSED', `${p.target.host} is not a migration peer this agent allows`, { userError: true });
        const disks = this.#d.owned(principal, p.vmId).spec.disks;
        for (const d of disks) if (!p.target.exports[d.id]) throw new AgentError('BAD_TARGET', `the sync target has no export for disk '${d.id}'`, { userError: true });
        if (!p.tlsHostname && this.#d.dataTls.mode === 'required') throw new AgentError('DATA_TLS_REQUIRED', 'this agent requires TLS on the data path: vm.replicaSync needs tlsHostname', { userError: true });
        const tls = p.tlsHostname ? { material: this.#d.dataTls.material(), runDir: this.#d.owned(principal, p.vmId).spec.runDir, hostname: p.tlsHostname } : undefined;
        return sourceSync(q, { disks, seq: p.seq, previous: p.previous, target: p.target, tls, timeoutMs: 600_000 });
      },
      'vm.replicaCommit': async (principal, p) => {
        await sourceCommitBitmaps(this.#monitor(principal, p.vmId), { disks: this.#d.owned(principal, p.vmId).spec.disks, seq: p.seq });
        return {};
      },
      'vm.replicaAbort': async (principal, p) => {
        await sourceAbortSync(this.#monitor(principal, p.vmId), { disks: this.#d.owned(principal, p.vmId).spec.disks, seq: p.seq });
        return {};
      },
      'vm.replicaDisks': async (principal, p) => {
        const q = this.#monitor(principal, p.vmId);
        const nodes = await q.execute('query-named-block-nodes', { flat: true }, { timeoutMs: 10_000 });
        return this.#d.owned(principal, p.vmId).spec.disks.map((d) => {
          const node = nodes.find((n) => n['node-name'] === diskNodeName(d.id));
          if (!node) throw new AgentError('NO_DISK', `VM has no block node for disk '${d.id}'`);
          return { id: d.id, virtualSize: node.image['virtual-size'], allocatedBytes: allocatedBytes(d.path) };
        });
      },
      'vm.replicaRemove': async (principal, p) => {
        await sourceRemoveReplicaBitmaps(this.#monitor(principal, p.vmId), this.#d.owned(principal, p.vmId).spec.disks);
        return {};
      },
    };
  }
}

/** The source's spec with each disk replaced by the replica chain's top (a qcow2). */
function withDisks(spec: unknown, tops: Record<string, string>): unknown {
  if (!spec || typeof spec !== 'object' || !('disks' in spec) || !Array.isArray(spec.disks)) throw new AgentError('BAD_SPEC', 'replica.recover: spec.disks must be a list', { userError: true });
  const disks = (spec.disks as unknown[]).map((d) => {
    const id = d && typeof d === 'object' && 'id' in d && typeof d.id === 'string' ? d.id : undefined;
    const top = id ? tops[id] : undefined;
    if (!top) throw new AgentError('BAD_SPEC', `replica.recover: the replica has no disk '${String(id)}'`, { userError: true });
    return { ...(d as object), path: top, format: 'qcow2' };
  });
  return { ...spec, disks };
}

async function firstFreePort(host: string, range: [number, number]): Promise<number> {
  const { createServer } = await import('node:net');
  for (const port of randomOrder(range)) {
    const free = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once('error', () => resolve(false));
      s.listen({ host, port }, () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new AgentError('NO_PORT', `no free port in ${range[0]}-${range[1]} on ${host} for the replica's NBD server`);
}
