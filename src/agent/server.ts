/**
 * ferry-agent: one per hypervisor host. It owns the destination QEMUs it starts, keeps every disk
 * path inside its storage root, and carries control traffic only: disk and RAM bytes go QEMU to
 * QEMU. Callers authenticate at the HTTP upgrade with a bearer token; each token is a principal,
 * and a principal sees only the VMs it created.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { promisify } from 'node:util';
import { WebSocketServer, type WebSocket } from 'ws';
import { z } from 'zod';
import { errorText, FerryError } from '../errors.js';
import { LocalDestination, type LocalIncomingVm } from '../engine/local-endpoint.js';
import { silentLogger, type Logger } from '../log.js';
import { qmpSocketPath } from '../qemu/argv.js';
import { parseVmSpec, SpecError, type VmSpec } from '../qemu/spec.js';
import { MAX_MESSAGE_BYTES, methodParams, PROTOCOL_VERSION, requestSchema, type HostInfo, type Method } from './protocol.js';
import { DESTINATION_QMP_ALLOWLIST, SOURCE_QMP_ALLOWLIST, tunnelQmp } from './qmp-tunnel.js';
import { launchVm } from '../qemu/launcher.js';
import { tcpBytesAcked } from '../engine/wire.js';

const run = promisify(execFile);

export const AgentConfigSchema = z
  .object({
    name: z.string().min(1).default('agent'),
    listenHost: z.string().default('127.0.0.1'),
    listenPort: z.number().int().min(0).max(65535).default(7420),
    storageRoot: z.string().refine((p) => p.startsWith('/'), 'must be an absolute path'),
    /** token -> principal */
    tokens: z.record(z.string().min(16, 'tokens must be at least 16 characters'), z.string().min(1)),
    migrationHost: z.string().default('127.0.0.1'),
    portRange: z.tuple([z.number().int().min(1024), z.number().int().max(65535)]).default([20000, 29999]),
    qemuBinary: z.string().optional(),
  })
  .strict();
export type AgentConfig = z.infer<typeof AgentConfigSchema>;

export class AgentError extends FerryError {
  override name = 'AgentError';
}

interface OwnedVm {
  principal: string;
  spec: VmSpec;
  /** 'source': a VM this host runs; 'incoming': the destination of a migration. */
  role: 'source' | 'incoming';
  vm: Pick<LocalIncomingVm, 'pid' | 'exited' | 'running' | 'kill' | 'release'>;
}

export interface RunningAgent {
  port: number;
  url: string;
  close(): Promise<void>;
}

export async function startAgent(input: unknown, logger: Logger = silentLogger): Promise<RunningAgent> {
  const parsed = AgentConfigSchema.safeParse(input);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new AgentError('AGENT_CONFIG', `invalid agent config: ${issue.path.join('.')}: ${issue.message}`, { userError: true });
  }
  const config = parsed.data;
  const log = logger.child({ agent: config.name });
  const local = new LocalDestination({ dir: config.storageRoot, migrationHost: config.migrationHost, portRange: config.portRange, logger: log, outliveProcess: true, ...(config.qemuBinary ? { qemuBinary: config.qemuBinary } : {}) });
  const vms = new Map<string, OwnedVm>();
  const tokenDigests = Object.entries(config.tokens).map(([t, principal]) => ({ digest: sha256(t), principal }));

  const authenticate = (req: IncomingMessage): string | undefined => {
    const m = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
    if (!m) return undefined;
    const given = sha256(m[1]!);
    // Compare digests in constant time, against every token, so timing says nothing.
    let principal: string | undefined;
    for (const t of tokenDigests) if (timingSafeEqual(given, t.digest)) principal = t.principal;
    return principal;
  };

  const confined = (field: string, path: string): void => {
    parseVmSpec(
      { name: 'path-check', memoryMiB: 16, disks: [{ id: 'd', path, format: 'raw' }], boot: { disk: 'd' }, runDir: config.storageRoot },
      { allowedRoots: [config.storageRoot] },
    );
    void field;
  };
  const owned = (principal: string, vmId: string): OwnedVm => {
    const v = vms.get(vmId);
    if (!v || v.principal !== principal) throw new AgentError('VM_NOT_FOUND', `no VM '${vmId}' of yours on this host`, { userError: true });
    return v;
  };

  const handlers: { [M in Method]: (principal: string, params: z.infer<(typeof methodParams)[M]>) => Promise<unknown> } = {
    'host.info': async (): Promise<HostInfo> => {
      const version = (await run(config.qemuBinary ?? 'qemu-system-x86_64', ['--version'])).stdout.split('\n')[0] ?? '';
      return {
        name: config.name,
        storageRoot: config.storageRoot,
        freeBytes: await local.freeBytes(),
        migrationHost: config.migrationHost,
        portRange: config.portRange,
        qemuVersion: version,
      };
    },
    'dest.check': async (_p, params) => {
      const spec = parseVmSpec(params.spec, { allowedRoots: [config.storageRoot] });
      return { problems: await local.checkTarget(spec) };
    },
    'dest.createDisk': async (_p, params) => {
      confined('path', params.path);
      await local.createDisk(params);
      return {};
    },
    'dest.removeDisk': async (_p, params) => {
      confined('path', params.path);
      await local.removeDisk(params.path);
      return {};
    },
    'dest.start': async (principal, params) => {
      const spec = parseVmSpec(params.spec, { allowedRoots: [config.storageRoot] });
      const vm = await local.startIncoming(spec, { timeoutMs: 30_000 });
      const vmId = `${spec.name.toLowerCase().replace(/[^a-z0-9-]/g, '-').slice(0, 40)}-${randomBytes(4).toString('hex')}`;
      vms.set(vmId, { principal, spec, vm, role: 'incoming' });
      void vm.exited.then(() => log.info({ vmId }, 'VM exited'));
      return { vmId, pid: vm.pid };
    },
    'vm.start': async (principal, params) => {
      const spec = parseVmSpec(params.spec, { allowedRoots: [config.storageRoot] });
      if ([...vms.values()].some((v) => v.spec.name === spec.name && v.vm.running())) {
        throw new AgentError('VM_EXISTS', `a VM named '${spec.name}' already runs here`, { userError: true });
      }
      const p = await launchVm(spec, { timeoutMs: 30_000, logger: log, ...(config.qemuBinary ? { qemuBinary: config.qemuBinary } : {}) });
      // The agent's VMs outlive the agent (restarts, upgrades).
      p.release();
      await p.qmp.close();
      const vmId = `${spec.name.toLowerCase().replace(/[^a-z0-9-]/g, '-').slice(0, 40)}-${randomBytes(4).toString('hex')}`;
      vms.set(vmId, { principal, spec, role: 'source', vm: { pid: p.pid, exited: p.exited, running: () => p.running(), kill: () => p.kill(), release: async () => undefined } });
      return { vmId, pid: p.pid };
    },
    'vm.get': async (principal, params) => {
      const found = [...vms.entries()].find(([, v]) => v.principal === principal && v.spec.name === params.name && v.vm.running());
      if (!found) throw new AgentError('VM_NOT_FOUND', `no running VM named '${params.name}' of yours on this host`, { userError: true });
      return { vmId: found[0], role: found[1].role, spec: found[1].spec };
    },
    'vm.nbdBytesSent': async (principal, params) => {
      owned(principal, params.vmId);
      return { bytes: (await tcpBytesAcked({ host: params.host, port: params.port })) ?? null };
    },
    'vm.waitExit': async (principal, params) => {
      const v = owned(principal, params.vmId);
      let timer: NodeJS.Timeout | undefined;
      const exited = await Promise.race([v.vm.exited.then(() => true), new Promise<false>((r) => (timer = setTimeout(r, params.timeoutMs, false)))]);
      clearTimeout(timer);
      if (exited) vms.delete(params.vmId);
      return { exited };
    },
    'dest.kill': async (principal, params) => {
      // Ownership stays until the run dir is gone: the caller's rollback removes it after this.
      await owned(principal, params.vmId).vm.kill();
      return {};
    },
    'dest.release': async (principal, params) => {
      const v = owned(principal, params.vmId);
      await v.vm.release();
      return {};
    },
    'dest.removeRunDir': async (principal, params) => {
      const v = owned(principal, params.vmId);
      if (v.vm.running()) throw new AgentError('VM_RUNNING', `VM '${params.vmId}' still runs: stop it first`, { userError: true });
      await local.removeRunDir(v.spec);
      vms.delete(params.vmId);
      return {};
    },
    'vm.list': async (principal) =>
      [...vms.entries()].filter(([, v]) => v.principal === principal).map(([vmId, v]) => ({ vmId, name: v.spec.name, role: v.role, pid: v.vm.pid, running: v.vm.running() })),
  };

  const onRpc = (ws: WebSocket, principal: string): void => {
    // ws reports a frame over maxPayload (and other protocol faults) here, then closes the
    // connection with the right code (1009): log it, nothing more.
    ws.on('error', (err) => log.warn({ err: err.message, principal }, 'WebSocket session ended on an error'));
    ws.on('message', (data: Buffer, isBinary: boolean) => {
      void (async () => {
        let id: string | number | null = null;
        try {
          if (isBinary) throw new AgentError('BAD_MESSAGE', 'binary frames are not part of the protocol', { userError: true });
          let raw: unknown;
          try {
            raw = JSON.parse(data.toString('utf8'));
          } catch {
            throw new AgentError('BAD_MESSAGE', 'the message is not JSON', { userError: true });
          }
          const req = requestSchema.safeParse(raw);
          if (!req.success) {
            const issue = req.error.issues[0]!;
            throw new AgentError('BAD_MESSAGE', `bad request: ${issue.path.join('.') || '(message)'}: ${issue.message}`, { userError: true });
          }
          id = req.data.id;
          const method = req.data.method;
          if (!(method in methodParams)) throw new AgentError('UNKNOWN_METHOD', `unknown method '${method}'`, { userError: true });
          const schema = methodParams[method as Method];
          const params = schema.safeParse(req.data.params);
          if (!params.success) {
            const issue = params.error.issues[0]!;
            throw new AgentError('BAD_PARAMS', `${method}: ${issue.path.join('.') || 'params'}: ${issue.message}`, { userError: true });
          }
          const handler = handlers[method as Method] as (p: string, params: unknown) => Promise<unknown>;
          const result = await handler(principal, params.data);
          ws.send(JSON.stringify({ v: PROTOCOL_VERSION, id, ok: true, result }));
        } catch (err) {
          const code = err instanceof SpecError ? 'PATH_REFUSED' : err instanceof FerryError ? err.code : 'INTERNAL';
          if (!(err instanceof FerryError && err.userError)) log.error({ err: errorText(err) }, 'request failed');
          ws.send(JSON.stringify({ v: PROTOCOL_VERSION, id, ok: false, error: { code, message: errorText(err) } }));
        }
      })();
    });
  };

  const http: Server = createServer((_req, res) => {
    res.writeHead(426, { 'content-type': 'text/plain' }).end('ferry-agent speaks WebSocket on /v1\n');
  });
  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_MESSAGE_BYTES });
  http.on('upgrade', (req, socket, head) => {
    const principal = authenticate(req);
    const reject = (status: string): void => {
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    };
    if (!principal) return reject('401 Unauthorized');
    const url = req.url ?? '';
    const qmp = /^\/v1\/qmp\/([a-z0-9-]{1,64})$/.exec(url);
    if (url !== '/v1' && !qmp) return reject('404 Not Found');
    if (qmp && (!vms.has(qmp[1]!) || vms.get(qmp[1]!)!.principal !== principal)) return reject('404 Not Found');
    wss.handleUpgrade(req, socket, head, (ws) => {
      const target = qmp ? vms.get(qmp[1]!) : undefined;
      if (target) tunnelQmp(ws, qmpSocketPath(target.spec), log, target.role === 'source' ? SOURCE_QMP_ALLOWLIST : DESTINATION_QMP_ALLOWLIST);
      else onRpc(ws, principal);
    });
  });

  await new Promise<void>((resolve, reject) => {
    http.once('error', reject);
    http.listen(config.listenPort, config.listenHost, () => resolve());
  });
  const port = (http.address() as AddressInfo).port;
  log.info({ port, storageRoot: config.storageRoot }, 'agent listening');
  return {
    port,
    url: `ws://${config.listenHost}:${port}`,
    close: async () => {
      for (const c of wss.clients) c.terminate();
      await new Promise<void>((r) => http.close(() => r()));
    },
  };
}

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}
