/**
 * ferry-scheduler: the Scheduler over real agents, its SQLite file, and an API for operators
 * (protocol.ts). One process; its state is the database, so it may be killed at any moment.
 */
import { createServer, type Server } from 'node:http';
import { WebSocketServer } from 'ws';
import { z } from 'zod';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { bearerAuthenticator, serveRpc } from '../rpc/ws-rpc.js';
import { loadTls, TlsFilesSchema } from '../host/tls.js';
import { AgentFleet, HostConfigSchema } from './agents.js';
import { SCHEDULER_PROTOCOL_VERSION, schedulerMethods, type SchedulerMethod } from './protocol.js';
import { Scheduler, type SchedulerEvents } from './scheduler.js';
import { SchedulerStore } from './store.js';
import { ProtectionService } from './protections.js';
import { SchedulerError } from './types.js';

export const SchedulerConfigSchema = z
  .object({
    listenHost: z.string().default('127.0.0.1'),
    listenPort: z.number().int().min(0).max(65535).default(7430),
    database: z.string().min(1),
    hosts: z
      .array(HostConfigSchema)
      .min(1, 'at least one host')
      .refine((h) => new Set(h.map((x) => x.name)).size === h.length, 'host names must be unique'),
    /** Mutual TLS to wss:// agents: the scheduler's certificate and key, and the agents' CA. */
    agentTls: TlsFilesSchema.optional(),
    /** The token the scheduler presents to the agents. */
    agentToken: z.string().min(16, 'the agent token must be at least 16 characters'),
    /** Tokens of the scheduler's own API: token -> principal. */
    tokens: z.record(z.string(), z.string().min(1)).refine((t) => Object.keys(t).every((k) => k.length >= 16), 'tokens must be at least 16 characters'),
    limits: z
      .object({
        outgoingPerHost: z.number().int().positive().default(2),
        incomingPerHost: z.number().int().positive().default(2),
        cluster: z.number().int().positive().default(5),
        bandwidthPerHostBytesPerSec: z.number().positive().optional(),
      })
      .strict()
      .default({ outgoingPerHost: 2, incomingPerHost: 2, cluster: 5 }),
    /** lazy mode: cap on each disk's background hydration, bytes/s. */
    hydrationBytesPerSec: z.number().int().positive().optional(),
    /**
     * TLS on the data path (NBD, migration streams): required refuses a pair of hosts that cannot;
     * preferred uses it where both can. An agent that requires it wins over preferred or off.
     */
    dataTls: z.enum(['required', 'preferred', 'off']).default('preferred'),
    /** The engine's mode when a request names none: precopy (default) or lazy. */
    mode: z.enum(['precopy', 'lazy']).default('precopy'),
    /** Ping interval of the API's sessions, ms: a client that stops answering is dropped within twice this. */
    heartbeatMs: z.number().int().min(100).max(600_000).default(10_000),
    retry: z
      .object({ maxAttempts: z.number().int().positive().default(3), baseDelayMs: z.number().int().positive().default(5_000) })
      .strict()
      .default({ maxAttempts: 3, baseDelayMs: 5_000 }),
  })
  .strict();
export type SchedulerConfig = z.infer<typeof SchedulerConfigSchema>;

export interface RunningScheduler {
  url: string;
  scheduler: Scheduler;
  close(opts?: { graceMs?: number }): Promise<void>;
}

export async function startSchedulerService(input: unknown, logger: Logger = silentLogger): Promise<RunningScheduler> {
  const parsed = SchedulerConfigSchema.safeParse(input);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new SchedulerError('SCHEDULER_CONFIG', `invalid scheduler config: ${issue.path.join('.') || '(config)'}: ${issue.message}`, { userError: true });
  }
  const config = parsed.data;
  const log = logger.child({ tool: 'ferry-scheduler' });
  const tls = config.agentTls ? await loadTls(config.agentTls) : undefined;
  const store = new SchedulerStore(config.database);
  const fleet = new AgentFleet(config.hosts, config.agentToken, log, tls, { dataTls: config.dataTls, ...(config.hydrationBytesPerSec ? { hydrationBytesPerSec: config.hydrationBytesPerSec } : {}) });
  const scheduler = new Scheduler({ store, inventory: fleet, runner: fleet, reconciler: fleet, limits: config.limits, retry: config.retry, mode: config.mode, logger: log });
  await scheduler.start();
  const protections = new ProtectionService({ store, hosts: config.hosts, token: config.agentToken, tls, log });
  protections.start();
  fleet.delta = { before: (job) => protections.deltaBefore(job), after: (job, outcome) => protections.deltaAfter(job, outcome) };

  const handle = async (method: SchedulerMethod, params: unknown): Promise<unknown> => {
    switch (method) {
      case 'hosts': {
        const [hosts, vms] = await Promise.all([fleet.hosts(), fleet.vms()]);
        const running = scheduler.running();
        return config.hosts.map((h) => {
          const info = hosts.find((x) => x.name === h.name);
          return {
            name: h.name,
            url: h.url,
            reachable: info !== undefined,
            freeMemoryMiB: info?.freeMemoryMiB ?? null,
            freeDiskBytes: info?.freeDiskBytes ?? null,
            vms: vms.filter((v) => v.host === h.name).length,
            outgoing: running.outgoing[h.name] ?? 0,
            incoming: running.incoming[h.name] ?? 0,
          };
        });
      }
      case 'vms':
        return fleet.vms();
      case 'migrate': {
        const p = schedulerMethods.migrate.parse(params);
        return scheduler.migrate(p.vm, { ...(p.to ? { to: p.to } : {}), ...(p.reason ? { reason: p.reason } : {}), ...(p.mode ? { mode: p.mode } : {}) });
      }
      case 'drain': {
        const p = schedulerMethods.drain.parse(params);
        return scheduler.drain(p.host, p.mode ? { mode: p.mode } : {});
      }
      case 'queue': {
        const p = schedulerMethods.queue.parse(params);
        const jobs = scheduler.list(p.limit);
        return p.all ? jobs : jobs.filter((j) => j.state === 'queued' || j.state === 'running');
      }
      case 'get': {
        const id = schedulerMethods.get.parse(params).id;
        const job = scheduler.get(id);
        if (!job) throw new SchedulerError('NO_SUCH_MIGRATION', `no migration '${id}'`, { userError: true });
        return job;
      }
      case 'journal':
        return store.journal(schedulerMethods.journal.parse(params).id);
      case 'cancel':
        return scheduler.cancel(schedulerMethods.cancel.parse(params).id);
      case 'watch':
        return {};
      case 'protect':
        return protections.protect(schedulerMethods.protect.parse(params));
      case 'unprotect':
        return protections.unprotect(schedulerMethods.unprotect.parse(params).vm);
      case 'protect-status':
        return protections.status();
      case 'recover':
        return protections.recover(schedulerMethods.recover.parse(params));
    }
  };

  const authenticate = bearerAuthenticator(config.tokens);
  const http: Server = createServer((_req, res) => res.writeHead(426, { 'content-type': 'text/plain' }).end('ferry-scheduler speaks WebSocket on /v1\n'));
  const wss = new WebSocketServer({ noServer: true, maxPayload: 256 * 1024 });
  http.on('upgrade', (req, socket, head) => {
    const principal = authenticate(req);
    const reject = (status: string): void => void socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    if (!principal) return reject('401 Unauthorized');
    if (req.url !== '/v1') return reject('404 Not Found');
    wss.handleUpgrade(req, socket, head, (ws) => {
      const send = (event: Record<string, unknown>): void => void (ws.readyState === ws.OPEN && ws.send(JSON.stringify({ v: SCHEDULER_PROTOCOL_VERSION, event })));
      const onJob = (...[job]: SchedulerEvents['job']): void => send({ type: 'job', job });
      const onPhase = (...[p]: SchedulerEvents['phase']): void => send({ type: 'phase', ...p });
      const onProgress = (...[p]: SchedulerEvents['progress']): void => send({ type: 'progress', ...p });
      let watching = false;
      serveRpc(ws, {
        version: SCHEDULER_PROTOCOL_VERSION,
        methods: schedulerMethods,
        handle: async (method, params) => {
          if (method === 'watch' && !watching) {
            watching = true;
            scheduler.on('job', onJob);
            scheduler.on('phase', onPhase);
            scheduler.on('progress', onProgress);
          }
          return handle(method, params);
        },
        log: log.child({ principal }),
        heartbeatMs: config.heartbeatMs,
      });
      ws.once('close', () => {
        scheduler.off('job', onJob);
        scheduler.off('phase', onPhase);
        scheduler.off('progress', onProgress);
      });
    });
  });
  await new Promise<void>((resolve, reject) => {
    http.once('error', reject);
    http.listen(config.listenPort, config.listenHost, () => resolve());
  });
  const address = http.address();
  if (address === null || typeof address === 'string') throw new SchedulerError('SCHEDULER_LISTEN', `the API has no TCP address (${String(address)})`);
  const port = address.port;
  log.info({ port, hosts: config.hosts.length, database: config.database }, 'scheduler listening');
  return {
    url: `ws://${config.listenHost}:${port}`,
    scheduler,
    close: async (opts = {}) => {
      for (const c of wss.clients) c.terminate();
      await new Promise<void>((r) => http.close(() => r()));
      await protections.stop().catch((err: unknown) => log.error({ err: errorText(err) }, 'stopping the protections'));
      await scheduler.stop(opts.graceMs).catch((err: unknown) => log.error({ err: errorText(err) }, 'stopping the scheduler'));
      store.close();
    },
  };
}
