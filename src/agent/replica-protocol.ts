/**
 * The agent's replica methods (issue 12), spread into methodParams (protocol.ts). Two sides:
 *   replica.*      on the standby: its replica of a VM (a qemu-storage-daemon, replicas.ts)
 *   vm.replica*    on the source: one sync's steps on the VM's own QEMU, run by the agent on its
 *                  monitor (no QMP tunnel: the agent decides what runs, and where it writes)
 */
import { isIP } from 'node:net';
import { z } from 'zod';

const vmName = z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$/, 'must be a VM name');
const seq = z.number().int().positive();
const vmRef = z.string().regex(/^[a-z0-9-]{1,64}$/);
export const replicaTargetSchema = z
  .object({
    seq,
    host: z.string().refine((h) => isIP(h) !== 0, 'must be an IP address'),
    port: z.number().int().min(1).max(65535),
    exports: z.record(z.string().regex(/^[a-z][a-z0-9-]{0,15}$/), z.string().regex(/^[A-Za-z0-9._-]{1,128}$/)),
  })
  .strict();

export const replicaMethodParams = {
  /** Checks the room (needBytes: what the source's disks hold), then an empty replica and its daemon. */
  'replica.create': z
    .object({ vm: vmName, disks: z.array(z.object({ id: z.string().regex(/^[a-z][a-z0-9-]{0,15}$/), virtualSize: z.number().int().positive() }).strict()).min(1), needBytes: z.number().int().nonnegative() })
    .strict(),
  'replica.status': z.object({ vm: vmName }).strict(),
  /**
   * tls: the sync's NBD server over TLS, admitting only the source host's certificate name
   * (peerIdentity, as QEMU's authz compares it). Refused without it by an agent whose dataTls is
   * required.
   */
  'replica.prepareSync': z.object({ vm: vmName, seq, tls: z.object({ peerIdentity: z.string().min(1).max(1024) }).strict().optional() }).strict(),
  'replica.completeSync': z.object({ vm: vmName, seq, pointAt: z.number(), bytes: z.number().nonnegative(), durationMs: z.number().nonnegative() }).strict(),
  'replica.abortSync': z.object({ vm: vmName, seq }).strict(),
  /** Unprotect: the daemon quits and the replica's files go. */
  'replica.destroy': z.object({ vm: vmName }).strict(),
  /**
   * Failover, once the caller has shown the source is gone: the replica's chains become the disks
   * of a new VM of this host (spec: the source's, its disks replaced), started.
   */
  'replica.recover': z.object({ vm: vmName, spec: z.unknown() }).strict(),
  /**
   * Evacuation by delta onto this replica (src/engine/delta.ts): the daemon lets go, and at each
   * path (confined, claimed for the caller as dest.createDisk would) a qcow2 overlay on the chain.
   */
  'replica.prepareOverlays': z
    .object({ vm: vmName, disks: z.array(z.object({ id: z.string().regex(/^[a-z][a-z0-9-]{0,15}$/), path: z.string().min(1), virtualSize: z.number().int().positive() }).strict()).min(1) })
    .strict(),
  /** Undo of prepareOverlays: the overlays removed and released, the daemon serving again. */
  'replica.restore': z.object({ vm: vmName, paths: z.array(z.string().min(1)) }).strict(),
  'vm.replicaReconcile': z.object({ vmId: vmRef, consistentSeq: seq.nullable() }).strict(),
  /** tlsHostname: the NBD client nodes over TLS, the standby's certificate checked for that name. */
  'vm.replicaSync': z.object({ vmId: vmRef, seq, previous: seq.nullable(), target: replicaTargetSchema, tlsHostname: z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/).optional() }).strict(),
  'vm.replicaCommit': z.object({ vmId: vmRef, seq }).strict(),
  'vm.replicaAbort': z.object({ vmId: vmRef, seq }).strict(),
  'vm.replicaRemove': z.object({ vmId: vmRef }).strict(),
  /** The VM's disks as QEMU has them: id, virtual size, allocated bytes (what a replica needs). */
  'vm.replicaDisks': z.object({ vmId: vmRef }).strict(),
} as const;

export const replicaStatusSchema = z
  .object({
    vm: z.string(),
    state: z.enum(['active', 'released']),
    consistent: z.object({ seq: z.number(), pointAt: z.number() }).nullable(),
    lastSync: z.object({ seq: z.number(), pointAt: z.number(), bytes: z.number(), durationMs: z.number() }).nullable(),
    failedSyncs: z.number(),
    syncing: z.boolean(),
    daemonPid: z.number().nullable(),
  })
  .strict();
export type ReplicaStatus = z.infer<typeof replicaStatusSchema>;

export const syncOutcomeSchema = z.object({ seq: z.number(), pointAt: z.number(), pointAtMono: z.number(), bytes: z.number(), durationMs: z.number() }).strict();

export const replicaDisksSchema = z.array(z.object({ id: z.string(), virtualSize: z.number().int().positive(), allocatedBytes: z.number().nonnegative() }).strict());
