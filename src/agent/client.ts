import { join } from 'node:path';
import { createWebSocketStream, type WebSocket } from 'ws';
import { errorText, FerryError } from '../errors.js';
import type { BackingNbd, DataTlsPeer, DestinationEndpoint, HostDataTls, IncomingVm, NbdRelayHandle, SourceEndpoint } from '../engine/endpoint.js';
import { randomOrder } from '../host/ports.js';
import { QmpClient } from '../qmp/index.js';
import { parseVmSpec, retargetSpec, type VmSpec } from '../qemu/spec.js';
import { QemuVersionError, type QemuBuild } from '../qemu/versions.js';
import { z } from 'zod';
import type { TlsMaterial } from '../host/tls.js';
import { openSocket, RpcSession, type PeerLabel } from '../rpc/ws-client.js';
import { agentEventSchema, hostInfoSchema, nbdRelayResultSchema, PROTOCOL_VERSION, startResultSchema, vmSummarySchema, type AgentEvent, type HostInfo, type Method } from './protocol.js';

const vmGetSchema = vmSummarySchema.extend({ spec: z.unknown() });
const bytesSentSchema = z.object({ bytes: z.number().nonnegative().nullable() });
const checkResultSchema = z.object({ problems: z.array(z.string()) });

export class AgentCallError extends FerryError {
  override name = 'AgentCallError';
}

/**
 * A scheduler replica's claim on the migration of one VM (fencing): sent at the upgrade of every
 * session and QMP tunnel. The agent remembers the highest epoch it has seen per VM and refuses
 * mutating calls (STALE_EPOCH) from sessions that carry a lower one.
 */
export interface AgentFence {
  vm: string;
  epoch: number;
}

export const FENCE_VM_HEADER = 'x-ferry-fence-vm';
export const FENCE_EPOCH_HEADER = 'x-ferry-fence-epoch';

function fenceHeaders(fence: AgentFence | undefined): Record<string, string> {
  return fence ? { [FENCE_VM_HEADER]: encodeURIComponent(fence.vm), [FENCE_EPOCH_HEADER]: String(fence.epoch) } : {};
}

/** One authenticated RPC session with an agent. Every call has a deadline. */
export class AgentClient {
  readonly #session: RpcSession;
  readonly #url: string;
  readonly #token: string;
  readonly #tls: TlsMaterial | undefined;
  readonly #listeners = new Set<(e: AgentEvent) => void>();
  readonly #fence: AgentFence | undefined;

  private constructor(ws: WebSocket, url: string, token: string, tls: TlsMaterial | undefined, fence: AgentFence | undefined) {
    this.#fence = fence;
    this.#url = url;
    this.#token = token;
    this.#tls = tls;
    this.#session = new RpcSession(ws, {
      version: PROTOCOL_VERSION,
      peer: agentPeer(url),
      onEvent: (raw) => {
        const event = agentEventSchema.safeParse(raw);
        if (event.success) for (const l of this.#listeners) l(event.data);
      },
    });
  }

  /** `wss://` needs `tls` (mutual TLS: this side's certificate and the CA of the agent's). */
  static async connect(url: string, token: string, timeoutMs = 10_000, tls?: TlsMaterial, fence?: AgentFence): Promise<AgentClient> {
    if (url.startsWith('wss://') && !tls) {
      throw new AgentCallError('AGENT_TLS', `${url} is TLS: give the client certificate, key and CA (--tls-cert, --tls-key, --tls-ca)`, { userError: true });
    }
    return openSocket(`${url}/v1`, { token, timeoutMs, peer: agentPeer(url), tls: tlsOptions(url, tls), headers: fenceHeaders(fence) }, (ws) => new AgentClient(ws, url, token, tls, fence));
  }

  call(method: Method, params: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<unknown> {
    return this.#session.call(method, params, timeoutMs);
  }

  /** Subscribes this session to the agent's events; returns the function that unsubscribes. */
  async onEvent(listener: (e: AgentEvent) => void): Promise<() => void> {
    if (this.#listeners.size === 0) await this.call('events.subscribe');
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /**
   * A QMP session to one of this principal's VMs, tunnelled over its own WebSocket. `onClose`:
   * the tunnel's WebSocket close code (1000/1005: the agent closed it, its QEMU's monitor having
   * closed; 1006: it broke, the agent or the link gone, which says nothing of the QEMU).
   */
  async openQmp(vmId: string, timeoutMs = 10_000, opts: { onClose?: (code: number) => void; oob?: boolean } = {}): Promise<QmpClient> {
    const peer = { ...agentPeer(this.#url), who: `the QMP tunnel to ${vmId} on agent ${this.#url}` };
    const stream = await openSocket(`${this.#url}/v1/qmp/${vmId}`, { token: this.#token, timeoutMs, peer, tls: tlsOptions(this.#url, this.#tls), userError: false, headers: fenceHeaders(this.#fence) }, (ws) => {
      const onClose = opts.onClose;
      // Registered before the stream's own listener: the code is known when the session ends.
      if (onClose) ws.once('close', (code: number) => onClose(code));
      return createWebSocketStream(ws);
    });
    return QmpClient.connect({ stream }, { timeoutMs, name: `agent:${vmId}`, ...(opts.oob ? { oob: true } : {}) });
  }

  close(): void {
    this.#session.close();
  }
}

/** Bound on finding a restarted source agent again for the source's last step (systemd's Restart= takes a few seconds). */
const SOURCE_AGAIN_MS = 15_000;

/** The source host is an agent that runs the VM: QMP through its allowlist tunnel. */
export class AgentSource implements SourceEndpoint {
  readonly name: string;
  readonly exportHost: string;
  readonly #portRange: [number, number];
  readonly spec: VmSpec;
  #client: AgentClient;
  readonly #vmId: string;
  readonly #removeDisks: boolean;
  /** How #client was made: a restarted agent is connected to again the same way (reconnect). */
  #dial: (() => Promise<AgentClient>) | undefined;

  readonly #dataTls: HostInfo['dataTls'];

  private constructor(client: AgentClient, info: HostInfo, vmId: string, spec: VmSpec, removeDisks: boolean) {
    this.#client = client;
    this.#dataTls = info.dataTls;
    const name = `${info.name} (agent)`;
    this.exportHost = info.migrationHost;
    this.#portRange = info.portRange;
    this.#removeDisks = removeDisks;
    this.name = name;
    this.#vmId = vmId;
    this.spec = spec;
  }

  /**
   * Finds the running VM `vmName` of this principal on the agent; its spec comes from there.
   * `keepDisks`: leave the source's disk files in place after a successful migration.
   */
  static async connect(url: string, token: string, vmName: string, opts: { keepDisks?: boolean; tls?: TlsMaterial; fence?: AgentFence } = {}): Promise<AgentSource> {
    const client = await AgentClient.connect(url, token, 10_000, opts.tls, opts.fence);
    try {
      const info = hostInfoSchema.parse(await client.call('host.info'));
      const found = vmGetSchema.parse(await client.call('vm.get', { name: vmName }));
      if (found.state !== 'running') throw new AgentCallError('VM_NOT_RUNNING', `VM '${vmName}' on ${info.name} is ${found.state}, not running`, { userError: true });
      const source = new AgentSource(client, info, found.vmId, parseVmSpec(found.spec), !(opts.keepDisks ?? false));
      source.#dial = () => AgentClient.connect(url, token, 5_000, opts.tls, opts.fence);
      return source;
    } catch (err) {
      client.close();
      throw err;
    }
  }

  /** OOB negotiated: the rollback's yank must reach a source whose main loop waits on a silent destination. */
  connect(opts: { timeoutMs: number }): Promise<QmpClient> {
    return this.#client.openQmp(this.#vmId, opts.timeoutMs, { oob: true });
  }

  /** The agent again (a restart takes it a moment), and a new QMP tunnel to the VM, until the deadline. */
  reconnect(opts: { timeoutMs: number }): Promise<QmpClient> {
    return this.#again(opts.timeoutMs, (client, leftMs) => client.openQmp(this.#vmId, leftMs, { oob: true }));
  }

  /** Dials the agent again until `step` succeeds on the new session or the deadline passes. */
  async #again<T>(timeoutMs: number, step: (client: AgentClient, leftMs: number) => Promise<T>): Promise<T> {
    const dial = this.#dial;
    if (!dial) throw new AgentCallError('AGENT_NO_RECONNECT', `no way to reach ${this.name} again`);
    const deadline = performance.now() + timeoutMs;
    let last: unknown;
    while (performance.now() < deadline) {
      try {
        const client = await dial();
        this.#client.close();
        this.#client = client;
        return await step(client, Math.max(1_000, Math.round(deadline - performance.now())));
      } catch (err) {
        last = err;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
    throw new AgentCallError('AGENT_UNREACHABLE', `${this.name} did not answer again within ${timeoutMs} ms: ${errorText(last)}`, { cause: last });
  }

  candidateExportPorts(): Iterable<number> {
    return randomOrder(this.#portRange);
  }

  nbdBytesServed(localPort: number): Promise<number | undefined> {
    return this.#bytesSent({ localPort });
  }

  nbdBytesSent(peer: { host: string; port: number }): Promise<number | undefined> {
    return this.#bytesSent(peer);
  }

  /** A counter the agent cannot read, or a reply that is not one, is "cannot tell". */
  async #bytesSent(which: Record<string, unknown>): Promise<number | undefined> {
    const r = bytesSentSchema.safeParse(await this.#client.call('vm.nbdBytesSent', { vmId: this.#vmId, ...which }).catch(() => undefined));
    return r.success ? (r.data.bytes ?? undefined) : undefined;
  }

  /** The agent has no call for it yet: the engine falls back on QEMU's actual-size. */
  async dataBytes(): Promise<number | undefined> {
    return undefined;
  }

  /** The agent's supervisor saw the source QEMU exit: vm.get says died or stopped. */
  async sourceGone(): Promise<boolean> {
    const found = vmGetSchema.safeParse(await this.#client.call('vm.get', { name: this.spec.name }).catch(() => undefined));
    return found.success && found.data.state !== 'running';
  }

  /**
   * The agent quits the source QEMU itself (it refuses unless QEMU says postmigrate), waits for
   * the exit, and forgets the VM; with removeDisks, the source's now stale disk files go too.
   */
  async dataTls(): Promise<HostDataTls> {
    return this.#dataTls;
  }

  /** The agent sets the source's TLS up itself, through its own monitor (see vm.beginDataTls). */
  async beginDataTls(_qmp: QmpClient, peer: DataTlsPeer, opts: { timeoutMs: number }): Promise<void> {
    await this.#client.call('vm.beginDataTls', { vmId: this.#vmId, ...peer }, opts.timeoutMs);
  }

  async endDataTls(_qmp: QmpClient, opts: { timeoutMs: number }): Promise<void> {
    await this.#client.call('vm.endDataTls', { vmId: this.#vmId }, opts.timeoutMs);
  }

  async retireSource(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void> {
    await qmp.close();
    const params = { vmId: this.#vmId, timeoutMs: opts.timeoutMs, removeDisks: this.#removeDisks };
    try {
      await this.#client.call('vm.retire', params, opts.timeoutMs + 5_000);
    } catch (err) {
      // The agent went (a restart) after the guest moved: its QEMU, paused in postmigrate,
      // outlived it, and nothing else would ever make it exit (issue 17's cells
      // confirm|cleanup/kill-source-agent). The agent found again retires it; it refuses
      // unless QEMU says postmigrate, so a retry can never stop a running guest.
      if (!(err instanceof FerryError && err.code === 'AGENT_DISCONNECTED')) throw err;
      await this.#again(SOURCE_AGAIN_MS, (client) => client.call('vm.retire', params, opts.timeoutMs + 5_000));
    }
  }

  close(): void {
    this.#client.close();
  }
}

/** The destination host is an agent: the engine drives it exactly as it drives a local folder. */
export class AgentDestination implements DestinationEndpoint {
  readonly name: string;
  readonly migrationHost: string;
  readonly #client: AgentClient;
  readonly #info: HostInfo;
  #vmId: string | undefined;

  private constructor(client: AgentClient, info: HostInfo) {
    this.#client = client;
    this.#info = info;
    this.name = `${info.name} (agent)`;
    this.migrationHost = info.migrationHost;
  }

  static async connect(url: string, token: string, opts: { tls?: TlsMaterial; fence?: AgentFence } = {}): Promise<AgentDestination> {
    const client = await AgentClient.connect(url, token, 10_000, opts.tls, opts.fence);
    try {
      const info = hostInfoSchema.parse(await client.call('host.info'));
      return new AgentDestination(client, info);
    } catch (err) {
      client.close();
      throw err;
    }
  }

  get vmId(): string | undefined {
    return this.#vmId;
  }

  targetSpec(spec: VmSpec, migrationId: string): VmSpec {
    const dir = join(this.#info.storageRoot, spec.name);
    return retargetSpec(spec, { dir, runDir: join(dir, `run-${migrationId}`) });
  }

  async freeBytes(_spec?: VmSpec, opts: { signal?: AbortSignal } = {}): Promise<number> {
    return hostInfoSchema.parse(await untilAborted(this.#client.call('host.info'), opts.signal)).freeBytes;
  }

  async checkTarget(spec: VmSpec, opts: { signal?: AbortSignal } = {}): Promise<string[]> {
    try {
      return checkResultSchema.parse(await untilAborted(this.#client.call('dest.check', { spec }), opts.signal)).problems;
    } catch (err) {
      return [`destination agent refused the spec: ${errorText(err)}`];
    }
  }

  async createDisk(disk: { path: string; format: 'qcow2' | 'raw'; virtualSize: number; backingNbd?: BackingNbd }, opts: { signal?: AbortSignal } = {}): Promise<void> {
    await untilAborted(this.#client.call('dest.createDisk', disk), opts.signal);
  }

  async removeDisk(path: string): Promise<void> {
    await this.#client.call('dest.removeDisk', { path });
  }

  async dataTls(): Promise<HostDataTls> {
    return this.#info.dataTls;
  }

  async endDataTls(_spec: VmSpec, _vm: IncomingVm, opts: { timeoutMs: number }): Promise<void> {
    if (this.#vmId) await this.#client.call('vm.endDataTls', { vmId: this.#vmId }, opts.timeoutMs);
  }

  async startIncoming(spec: VmSpec, opts: { timeoutMs: number; dataTls?: DataTlsPeer }): Promise<IncomingVm> {
    const started = startResultSchema.parse(await this.#client.call('dest.start', { spec, ...(opts.dataTls ? { dataTls: opts.dataTls } : {}) }, opts.timeoutMs + 5_000));
    this.#vmId = started.vmId;
    let closeCode: number | undefined;
    const qmp = await this.#client.openQmp(started.vmId, opts.timeoutMs, { onClose: (code) => (closeCode = code) });
    let killed = false;
    let died = false;
    // `closed` resolves with an error when the tunnel breaks (the destination QEMU died), and
    // with undefined when someone closed the session on purpose: only the first means dead.
    const exited = qmp.closed.then((err) => {
      if (err) died = true;
    });
    return {
      pid: started.pid,
      qmp,
      exited,
      // The tunnel closes when the destination QEMU dies: that is what the engine can see.
      running: () => !killed && !died,
      // A tunnel that broke without the agent closing it: the agent or the link went, not (known) the QEMU.
      unreachable: () => !killed && died && closeCode !== 1000 && closeCode !== 1005,
      kill: async () => {
        killed = true;
        await qmp.close();
        await this.#client.call('dest.kill', { vmId: started.vmId });
      },
      release: async () => {
        await this.#client.call('dest.release', { vmId: started.vmId });
        await qmp.close();
      },
    };
  }

  candidatePorts(): Iterable<number> {
    return randomOrder(this.#info.portRange);
  }

  /** The agent runs the relay (dest.startNbdRelay), on its migration address and port range, into the VM's run dir. */
  async startNbdRelay(spec: VmSpec, opts: { signal?: AbortSignal } = {}): Promise<NbdRelayHandle> {
    const vmId = this.#vmId;
    if (!vmId) throw new AgentCallError('AGENT_NO_VM', `no destination VM of '${spec.name}' started on agent ${this.name} for an NBD relay`);
    const relay = nbdRelayResultSchema.parse(await untilAborted(this.#client.call('dest.startNbdRelay', { vmId }), opts.signal));
    return {
      port: relay.port,
      unixPath: relay.unixPath,
      close: async () => {
        await this.#client.call('dest.stopNbdRelay', { vmId });
      },
    };
  }

  /** The incoming VM of this name that the agent started for this principal, abandoned (the agent refuses if the guest runs there). */
  async abandonIncoming(spec: VmSpec): Promise<void> {
    const vms = z.array(vmSummarySchema).parse(await this.#client.call('vm.list', {}, 10_000));
    for (const v of vms.filter((x) => x.name === spec.name && x.role === 'incoming')) await this.#client.call('dest.abandon', { vmId: v.vmId }, 40_000);
  }

  /** The agent has no call for it yet: the engine counts on the source's side. */
  async nbdBytesReceived(): Promise<number | undefined> {
    return undefined;
  }

  /** What the agent's QEMU is, as the agent probed it: preflight checks the pair before any change. */
  async probeQemu(): Promise<QemuBuild> {
    const { qemu } = hostInfoSchema.parse(await this.#client.call('host.info'));
    if (!qemu) throw new QemuVersionError('QEMU_PROBE_FAILED', `agent ${this.name} could not probe its QEMU (see its host.info qemuVersion)`);
    return { version: qemu.version, package: qemu.package, machines: qemu.machines.map((name) => ({ name })) };
  }

  async removeRunDir(): Promise<void> {
    if (this.#vmId) await this.#client.call('dest.removeRunDir', { vmId: this.#vmId }).catch(() => undefined);
  }

  close(): void {
    this.#client.close();
  }
}

/**
 * A call's answer, or the signal's reason once it aborts. The agent may still finish the call:
 * the engine registered its undo before, and undo steps are idempotent.
 */
function untilAborted<T>(call: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return call;
  if (signal.aborted) return Promise.reject(signal.reason);
  let onAbort: (() => void) | undefined;
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
  });
  return Promise.race([call, aborted]).finally(() => signal.removeEventListener('abort', onAbort!));
}

/** ws options for mutual TLS; the agent's certificate must name the host in the URL. */
function tlsOptions(url: string, tls: TlsMaterial | undefined): Record<string, unknown> {
  return url.startsWith('wss://') && tls ? { cert: tls.cert, key: tls.key, ca: tls.ca, minVersion: 'TLSv1.3' } : {};
}

function agentPeer(url: string): PeerLabel {
  return { who: `agent ${url}`, code: 'AGENT', error: (code, message, opts) => new AgentCallError(code, message, opts) };
}
