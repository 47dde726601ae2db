import { join } from 'node:path';
import { WebSocket, createWebSocketStream } from 'ws';
import { errorText, FerryError } from '../errors.js';
import type { BackingNbd, DestinationEndpoint, IncomingVm, SourceEndpoint } from '../engine/endpoint.js';
import { randomOrder } from '../engine/local-endpoint.js';
import { QmpClient } from '../qmp/index.js';
import { parseVmSpec, retargetSpec, type VmSpec } from '../qemu/spec.js';
import { z } from 'zod';
import type { TlsMaterial } from './tls.js';
import { eventFrameSchema, hostInfoSchema, PROTOCOL_VERSION, responseSchema, startResultSchema, vmSummarySchema, type AgentEvent, type HostInfo, type Method } from './protocol.js';

const vmGetSchema = vmSummarySchema.extend({ spec: z.unknown() });

export class AgentCallError extends FerryError {
  override name = 'AgentCallError';
}

/** One authenticated RPC session with an agent. Every call has a deadline. */
export class AgentClient {
  readonly #ws: WebSocket;
  readonly #url: string;
  readonly #token: string;
  #next = 1;
  readonly #listeners = new Set<(e: AgentEvent) => void>();
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();

  readonly #tls: TlsMaterial | undefined;

  private constructor(ws: WebSocket, url: string, token: string, tls: TlsMaterial | undefined) {
    this.#tls = tls;
    this.#ws = ws;
    this.#url = url;
    this.#token = token;
    ws.on('message', (data: Buffer) => {
      const json = safeJson(data.toString('utf8'));
      const event = eventFrameSchema.safeParse(json);
      if (event.success) {
        for (const l of this.#listeners) l(event.data.event);
        return;
      }
      const parsed = responseSchema.safeParse(json);
      if (!parsed.success || typeof parsed.data.id !== 'number') return;
      const p = this.#pending.get(parsed.data.id);
      if (!p) return;
      this.#pending.delete(parsed.data.id);
      clearTimeout(p.timer);
      if (parsed.data.ok) p.resolve(parsed.data.result);
      else p.reject(new AgentCallError(parsed.data.error.code, parsed.data.error.message, { userError: true }));
    });
    ws.on('close', () => {
      for (const [id, p] of this.#pending) {
        clearTimeout(p.timer);
        p.reject(new AgentCallError('AGENT_DISCONNECTED', `agent ${url} closed the session`));
        this.#pending.delete(id);
      }
    });
  }

  /** `wss://` needs `tls` (mutual TLS: this side's certificate and the CA of the agent's). */
  static connect(url: string, token: string, timeoutMs = 10_000, tls?: TlsMaterial): Promise<AgentClient> {
    return new Promise((resolve, reject) => {
      if (url.startsWith('wss://') && !tls) {
        reject(new AgentCallError('AGENT_TLS', `${url} is TLS: give the client certificate, key and CA (--tls-cert, --tls-key, --tls-ca)`, { userError: true }));
        return;
      }
      const ws = new WebSocket(`${url}/v1`, { headers: { authorization: `Bearer ${token}` }, handshakeTimeout: timeoutMs, ...tlsOptions(url, tls) });
      ws.once('open', () => resolve(new AgentClient(ws, url, token, tls)));
      ws.once('unexpected-response', (_req, res) => {
        reject(new AgentCallError('AGENT_REFUSED', `agent ${url} refused the connection: HTTP ${res.statusCode}`, { userError: true }));
        ws.terminate();
      });
      ws.once('error', (err) => reject(new AgentCallError('AGENT_UNREACHABLE', `cannot reach agent ${url}: ${err.message}`, { userError: true })));
    });
  }

  call(method: Method, params: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<unknown> {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new AgentCallError('AGENT_TIMEOUT', `agent ${this.#url} did not answer ${method} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      this.#ws.send(JSON.stringify({ v: PROTOCOL_VERSION, id, method, params }));
    });
  }

  /** Subscribes this session to the agent's events; returns the function that unsubscribes. */
  async onEvent(listener: (e: AgentEvent) => void): Promise<() => void> {
    if (this.#listeners.size === 0) await this.call('events.subscribe');
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** A QMP session to one of this principal's VMs, tunnelled over its own WebSocket. */
  openQmp(vmId: string, timeoutMs = 10_000): Promise<QmpClient> {
    const ws = new WebSocket(`${this.#url}/v1/qmp/${vmId}`, { headers: { authorization: `Bearer ${this.#token}` }, handshakeTimeout: timeoutMs, ...tlsOptions(this.#url, this.#tls) });
    return new Promise((resolve, reject) => {
      ws.once('open', () => {
        QmpClient.connect({ stream: createWebSocketStream(ws) }, { timeoutMs, name: `agent:${vmId}` }).then(resolve, reject);
      });
      ws.once('unexpected-response', (_req, res) => reject(new AgentCallError('AGENT_REFUSED', `QMP tunnel to ${vmId} refused: HTTP ${res.statusCode}`)));
      ws.once('error', (err) => reject(new AgentCallError('AGENT_UNREACHABLE', `QMP tunnel to ${vmId}: ${err.message}`)));
    });
  }

  close(): void {
    this.#ws.close();
  }
}

/** The source host is an agent that runs the VM: QMP through its allowlist tunnel. */
export class AgentSource implements SourceEndpoint {
  readonly name: string;
  readonly exportHost: string;
  readonly #portRange: [number, number];
  readonly spec: VmSpec;
  readonly #client: AgentClient;
  readonly #vmId: string;
  readonly #removeDisks: boolean;

  private constructor(client: AgentClient, info: HostInfo, vmId: string, spec: VmSpec, removeDisks: boolean) {
    this.#client = client;
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
  static async connect(url: string, token: string, vmName: string, opts: { keepDisks?: boolean; tls?: TlsMaterial } = {}): Promise<AgentSource> {
    const client = await AgentClient.connect(url, token, 10_000, opts.tls);
    try {
      const info = hostInfoSchema.parse(await client.call('host.info'));
      const found = vmGetSchema.parse(await client.call('vm.get', { name: vmName }));
      if (found.state !== 'running') throw new AgentCallError('VM_NOT_RUNNING', `VM '${vmName}' on ${info.name} is ${found.state}, not running`, { userError: true });
      return new AgentSource(client, info, found.vmId, parseVmSpec(found.spec), !(opts.keepDisks ?? false));
    } catch (err) {
      client.close();
      throw err;
    }
  }

  connect(opts: { timeoutMs: number }): Promise<QmpClient> {
    return this.#client.openQmp(this.#vmId, opts.timeoutMs);
  }

  candidateExportPorts(): Iterable<number> {
    return randomOrder(this.#portRange);
  }

  async nbdBytesServed(localPort: number): Promise<number | undefined> {
    const r = (await this.#client.call('vm.nbdBytesSent', { vmId: this.#vmId, localPort }).catch(() => ({ bytes: null }))) as { bytes: number | null };
    return r.bytes ?? undefined;
  }

  async nbdBytesSent(peer: { host: string; port: number }): Promise<number | undefined> {
    const r = (await this.#client.call('vm.nbdBytesSent', { vmId: this.#vmId, ...peer }).catch(() => ({ bytes: null }))) as { bytes: number | null };
    return r.bytes ?? undefined;
  }

  /**
   * The agent quits the source QEMU itself (it refuses unless QEMU says postmigrate), waits for
   * the exit, and forgets the VM; with removeDisks, the source's now stale disk files go too.
   */
  async retireSource(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void> {
    await qmp.close();
    await this.#client.call('vm.retire', { vmId: this.#vmId, timeoutMs: opts.timeoutMs, removeDisks: this.#removeDisks }, opts.timeoutMs + 5_000);
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

  static async connect(url: string, token: string, opts: { tls?: TlsMaterial } = {}): Promise<AgentDestination> {
    const client = await AgentClient.connect(url, token, 10_000, opts.tls);
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

  async freeBytes(): Promise<number> {
    return hostInfoSchema.parse(await this.#client.call('host.info')).freeBytes;
  }

  async checkTarget(spec: VmSpec): Promise<string[]> {
    try {
      const r = (await this.#client.call('dest.check', { spec })) as { problems: string[] };
      return r.problems;
    } catch (err) {
      return [`destination agent refused the spec: ${errorText(err)}`];
    }
  }

  async createDisk(disk: { path: string; format: 'qcow2' | 'raw'; virtualSize: number; backingNbd?: BackingNbd }): Promise<void> {
    await this.#client.call('dest.createDisk', disk);
  }

  async removeDisk(path: string): Promise<void> {
    await this.#client.call('dest.removeDisk', { path });
  }

  async startIncoming(spec: VmSpec, opts: { timeoutMs: number }): Promise<IncomingVm> {
    const started = startResultSchema.parse(await this.#client.call('dest.start', { spec }, opts.timeoutMs + 5_000));
    this.#vmId = started.vmId;
    const qmp = await this.#client.openQmp(started.vmId, opts.timeoutMs);
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

  async removeRunDir(): Promise<void> {
    if (this.#vmId) await this.#client.call('dest.removeRunDir', { vmId: this.#vmId }).catch(() => undefined);
  }

  close(): void {
    this.#client.close();
  }
}

/** ws options for mutual TLS; the agent's certificate must name the host in the URL. */
function tlsOptions(url: string, tls: TlsMaterial | undefined): { cert?: Buffer; key?: Buffer; ca?: Buffer; minVersion?: 'TLSv1.3' } {
  return url.startsWith('wss://') && tls ? { cert: tls.cert, key: tls.key, ca: tls.ca, minVersion: 'TLSv1.3' } : {};
}

function safeJson(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch {
    return undefined;
  }
}
