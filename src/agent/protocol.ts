/**
 * The agent's wire protocol, version 1. JSON text frames on `/v1`; every message is parsed here
 * and anything unknown (method, field, version) is refused with a clear error.
 *
 *   request   { v: 1, id, method, params }
 *   response  { v: 1, id, ok: true, result } | { v: 1, id, ok: false, error: { code, message } }
 *
 * QMP for an incoming VM goes over its own WebSocket, `/v1/qmp/<vmId>`: raw QMP lines, filtered
 * by the agent against a per-command argument policy (see qmp-policy.ts), so a QmpClient works
 * over it unchanged.
 */
import { isIP } from 'node:net';
import { z } from 'zod';
import { replicaMethodParams } from './replica-protocol.js';

export const PROTOCOL_VERSION = 1;
export const MAX_MESSAGE_BYTES = 1024 * 1024;

/** A lazy overlay's backing: structured, so the agent builds the backing string itself. */
const backingNbd = z
  .object({
    host: z.string().refine((h) => isIP(h) !== 0, 'must be an IP address'),
    port: z.number().int().min(1).max(65535),
    export: z.string().regex(/^[A-Za-z0-9_-]{1,64}$/),
    reconnectDelayS: z.number().int().min(0).max(300),
    /** The source's export is TLS: the overlay's backing uses ferry's client object and checks this name. */
    tlsHostname: z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/).optional(),
  })
  .strict();
const diskParams = z.object({ path: z.string().min(1), format: z.enum(['qcow2', 'raw']), virtualSize: z.number().int().positive(), backingNbd: backingNbd.optional() }).strict();
const vmName = z.object({ name: z.string().min(1) }).strict();
const vmRef = z.object({ vmId: z.string().regex(/^[a-z0-9-]{1,64}$/) }).strict();
/** A peer host's data-TLS identity (its certificate's subject, as QEMU's authz compares it). */
const peerTls = z
  .object({
    peerIdentity: z.string().regex(/^[A-Za-z][A-Za-z0-9.]*=[A-Za-z0-9 ._@:-]+(,[A-Za-z][A-Za-z0-9.]*=[A-Za-z0-9 ._@:-]+)*$/, 'must be a certificate subject such as CN=h18'),
    /** The name this side checks the peer's certificate for (its migration address). */
    peerHostname: z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/, 'must be an IP address or a host name'),
  })
  .strict();

export const methodParams = {
  'host.info': z.object({}).strict(),
  'dest.check': z.object({ spec: z.unknown() }).strict(),
  'dest.createDisk': diskParams,
  'dest.removeDisk': z.object({ path: z.string().min(1) }).strict(),
  /** dataTls: launch with ferry's TLS objects and the incoming stream's TLS parameters set. */
  'dest.start': z.object({ spec: z.unknown(), dataTls: peerTls.optional() }).strict(),
  'dest.kill': vmRef,
  /** Rolls back a destination whose engine is gone: refused if the guest runs there. */
  'dest.abandon': vmRef,
  'dest.release': vmRef,
  'dest.removeRunDir': vmRef,
  /**
   * A QEMU < 8.0 destination (copy mode auto): a TCP_NODELAY relay on this agent's migration
   * address and port range, into the VM's run dir socket its NBD server listens on. One per VM;
   * closed by dest.stopNbdRelay, dest.kill, dest.abandon, dest.release and the agent's exit.
   */
  'dest.startNbdRelay': vmRef,
  'dest.stopNbdRelay': vmRef,
  'events.subscribe': z.object({}).strict(),
  /** all: every principal's VMs (admin principals only). */
  'vm.list': z.object({ all: z.boolean().optional() }).strict(),
  'vm.get': vmName,
  'vm.create': z.object({ spec: z.unknown() }).strict(),
  'vm.start': vmName,
  /** QMP quit (QEMU flushes the disks), SIGKILL after timeoutMs. */
  'vm.stop': z.object({ name: z.string().min(1), timeoutMs: z.number().int().positive().max(600_000).default(30_000) }).strict(),
  'vm.delete': z.object({ name: z.string().min(1), removeDisks: z.boolean() }).strict(),
  /** Bytes the VM's QEMU sent to host:port (precopy's mirror), or from its own localPort (lazy's export). */
  /** A source VM gets ready for TLS on both data streams with one peer (object-add, parameters). */
  'vm.beginDataTls': vmRef.extend(peerTls.shape).strict(),
  /** Undoes vm.beginDataTls (also for an incoming VM): parameters cleared, objects and files gone. */
  'vm.endDataTls': vmRef,
  'vm.nbdBytesSent': z.union([
    z.object({ vmId: z.string(), host: z.string(), port: z.number().int() }).strict(),
    z.object({ vmId: z.string(), localPort: z.number().int().min(1).max(65535) }).strict(),
  ]),
  /** After a migration: quits the source QEMU (refused unless it is postmigrate) and forgets it. */
  'vm.retire': z.object({ vmId: z.string(), timeoutMs: z.number().int().positive().max(600_000), removeDisks: z.boolean() }).strict(),
  /**
   * Fencing (fencing.ts): the session's own fence (headers x-ferry-fence-vm / -epoch) is raised
   * here, or refused as stale; a scheduler replica calls it on both hosts before it settles a
   * migration it took over.
   */
  'fence.advance': z.object({}).strict(),
  /** Refused stale calls so far, and the highest epoch seen per VM. */
  'fence.status': z.object({}).strict(),
  /** Standby replicas (issue 12): replica-protocol.ts. */
  ...replicaMethodParams,
} as const;

/** Methods that change nothing: a stale fence does not stop them. */
export const READ_ONLY_METHODS: ReadonlySet<Method> = new Set<Method>(['host.info', 'vm.list', 'vm.get', 'dest.check', 'events.subscribe', 'vm.nbdBytesSent', 'fence.status']);

export const fenceStatusSchema = z.object({ staleRefused: z.number().int().nonnegative(), epochs: z.record(z.string(), z.number().int()) }).strict();

export type Method = keyof typeof methodParams;
export const METHODS = Object.keys(methodParams) as Method[];



export const hostInfoSchema = z
  .object({
    name: z.string(),
    storageRoot: z.string(),
    freeBytes: z.number(),
    migrationHost: z.string(),
    portRange: z.tuple([z.number().int(), z.number().int()]),
    qemuVersion: z.string(),
    /** The QEMU this agent starts, probed (src/qemu/versions.ts); absent when the probe failed. */
    qemu: z
      .object({
        version: z.object({ major: z.number().int(), minor: z.number().int(), micro: z.number().int() }).strict(),
        package: z.string(),
        machines: z.array(z.string()),
      })
      .strict()
      .optional(),
    migrationCapabilities: z.array(z.string()),
    cpus: z.number().int(),
    memoryBytes: z.number(),
    freeMemoryBytes: z.number(),
    /** Memory of the VMs this agent runs, summed from their specs. */
    vmMemoryMiB: z.number(),
    runningVms: z.number().int(),
    /** mode, and (when not off) this host's certificate identity and the names it is valid for. */
    dataTls: z.object({ mode: z.enum(['required', 'preferred', 'off']), identity: z.string().nullable(), names: z.array(z.string()) }).strict(),
  })
  .strict();
export type HostInfo = z.infer<typeof hostInfoSchema>;

export const nbdRelayResultSchema = z.object({ port: z.number().int().min(1).max(65535), unixPath: z.string().min(1) }).strict();

export const startResultSchema = z.object({ vmId: z.string(), pid: z.number().int() }).strict();

export const vmSummarySchema = z
  .object({
    vmId: z.string(),
    name: z.string(),
    role: z.enum(['vm', 'incoming']),
    state: z.enum(['stopped', 'running', 'died']),
    pid: z.number().int().nullable(),
    running: z.boolean(),
    memoryMiB: z.number().int(),
    /** Bytes its disk files occupy (allocated, not virtual): what a copy needs elsewhere. */
    diskBytes: z.number(),
  })
  .strict();
export type VmSummary = z.infer<typeof vmSummarySchema>;

/** Pushed to sessions that called events.subscribe: `{ v: 1, event }`, no id. */
export const agentEventSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('vm.state'), vm: vmSummarySchema }).strict(),
  z.object({ type: z.literal('vm.retired'), vmId: z.string(), name: z.string() }).strict(),
  z
    .object({
      type: z.literal('vm.qmp'),
      vmId: z.string(),
      name: z.string(),
      event: z.string(),
      data: z.record(z.string(), z.unknown()),
      timestamp: z.object({ seconds: z.number(), microseconds: z.number() }),
    })
    .strict(),
]);
export type AgentEvent = z.infer<typeof agentEventSchema>;
