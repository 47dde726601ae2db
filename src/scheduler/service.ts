/**
 * ferry-scheduler: the Scheduler over real agents, its store (a SQLite file, or PostgreSQL shared
 * by replicas), and an API for operators (protocol.ts). Its state is the database, so it may be
 * killed at any moment; on PostgreSQL any replica answers any request.
 */
import { createServer, type Server } from 'node:http';
import { WebSocketServer } from 'ws';
import { z } from 'zod';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { BROWSER_SUBPROTOCOL, bearerAuthenticator, serveRpc } from '../rpc/ws-rpc.js';
import { handleMetricsRequest, MetricsListenSchema, startMetricsListener } from '../host/metrics-http.js';
import { loadTls, TlsFilesSchema } from '../host/tls.js';
import { AgentFleet, HostConfigSchema } from './agents.js';
import { SCHEDULER_PROTOCOL_VERSION, schedulerMethods, type SchedulerMethod } from './protocol.js';
import { Scheduler } from './scheduler.js';
import { FleetEvents, type WatchEvent } from './fleet-events.js';
import { SchedulerMetrics } from './metrics.js';
import { openStore, redactDatabase } from './store.js';
import { crossOrigin, handleWebRequest } from './web.js';
import { ProtectionService } from './protections.js';
import { SchedulerError } from './types.js';

export const SchedulerConfigSchema = z
  .object({
    listenHost: z.string().default('127.0.0.1'),
    listenPort: z.number().int().min(0).max(65535).default(7430),
    /** A SQLite file (one scheduler), or postgres://USER:PASS@HOST/DB (any number of replicas). */
    database: z.string().min(1),
    /**
     * PostgreSQL only: how long a replica's claim lasts without a heartbeat (renewed every third
     * of it), and how often a replica looks for queued work and expired leases.
     */
    replica: z
      .object({ leaseMs: z.number().int().min(500).max(600_000).default(15_000), pollMs: z.number().int().min(50).max(60_000).default(1_000) })
      .strict()
      .default({ leaseMs: 15_000, pollMs: 1_000 }),
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
    /**
     * /metrics without a token on an address of its own (a management network); unset: /metrics
     * is on the API's port only, with an API token.
     */
    metricsListen: MetricsListenSchema.optional(),
    /** Serve the web view (web/) on the API's port; its data still needs an API token. */
    web: z.boolean().default(true),
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
  /** The watch stream's events (this replica's, and on PostgreSQL every replica's): one listener per watching caller. */
  events: FleetEvents;
  metrics: SchedulerMetrics;
  /** http://…/metrics of `metricsListen`, when configured. */
  metricsUrl?: string;
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
  const store = await openStore(config.database, { log });
  // Made after the scheduler (its lease owner name); the placement hint asks it once it exists.
  let standbys: ProtectionService | undefined;
  const fleet = new AgentFleet(config.hosts, config.agentToken, log, tls, { dataTls: config.dataTls, ...(config.hydrationBytesPerSec ? { hydrationBytesPerSec: config.hydrationBytesPerSec } : {}) });
  const scheduler = new Scheduler({
    store,
    inventory: fleet,
    runner: fleet,
    reconciler: fleet,
    limits: config.limits,
    retry: config.retry,
    mode: config.mode,
    logger: log,
    replica: { leaseMs: config.replica.leaseMs, pollMs: config.replica.pollMs },
    // A drain (or a migration naming no host) sends a protected VM to its standby: by delta.
    placement: { preferredFor: async (vm, mode) => standbys?.preferredFor(vm, mode) },
  });
  const metrics = new SchedulerMetrics(scheduler, { queued: () => store.inState('queued'), running: () => store.inState('running') }, config.hosts.map((h) => h.name));
  let events: FleetEvents;
  try {
    await scheduler.start();
    events = await FleetEvents.start(scheduler, store, log);
  } catch (err) {
    await scheduler.stop(0).catch(() => undefined);
    await store.close().catch(() => undefined);
    throw err;
  }
  // On a shared store the sync loops are leased like migrations, with the same owner name and lease length.
  const protections = new ProtectionService({ store, hosts: config.hosts, token: config.agentToken, tls, dataTls: config.dataTls, log, lease: { owner: scheduler.owner, leaseMs: config.replica.leaseMs } });
  standbys = protections;
  await protections.start();
  fleet.replicas = { before: (job) => protections.beforeMigration(job), after: (job, outcome, byDelta) => protections.afterMigration(job, outcome, byDelta) };

  const handle = async (method: SchedulerMethod, params: unknown): Promise<unknown> => {
    switch (method) {
      case 'hosts': {
        const [hosts, vms] = await Promise.all([fleet.hosts(), fleet.vms()]);
        const running = await scheduler.running();
        const queued = (await store.inState('queued')).reduce<Record<string, number>>((m, j) => ({ ...m, [j.from]: (m[j.from] ?? 0) + 1 }), {});
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
            /** Queued migrations out of this host: its queue depth. */
            queued: queued[h.name] ?? 0,
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
        const jobs = await scheduler.list(p.limit);
        return p.all ? jobs : jobs.filter((j) => j.state === 'queued' || j.state === 'running');
      }
      case 'get': {
        const id = schedulerMethods.get.parse(params).id;
        const job = await scheduler.get(id);
        if (!job) throw new SchedulerError('NO_SUCH_MIGRATION', `no migration '${id}'`, { userError: true });
        return job;
      }
      case 'journal':
        return scheduler.journal(schedulerMethods.journal.parse(params).id);
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

  // The CLI sends its token in Authorization, the web view's WebSocket in its subprotocol offer;
  // /metrics (Prometheus) in Authorization only.
  const authenticate = bearerAuthenticator(config.tokens, { subprotocol: true });
  const authenticateHeader = bearerAuthenticator(config.tokens);
  const http: Server = createServer((req, res) => {
    if (handleMetricsRequest(req, res, () => metrics.render(), { authorized: authenticateHeader(req) !== undefined, log })) return;
    if (config.web && handleWebRequest(req, res, log)) return;
    res.writeHead(426, { 'content-type': 'text/plain' }).end('ferry-scheduler speaks WebSocket on /v1\n');
  });
  const wss = new WebSocketServer({
    noServer: true,
    maxPayload: 256 * 1024,
    // Never echo an offered token back: select the protocol's own name, or none (the CLI offers none).
    handleProtocols: (offered) => (offered.has(BROWSER_SUBPROTOCOL) ? BROWSER_SUBPROTOCOL : false),
  });
  http.on('upgrade', (req, socket, head) => {
    const reject = (status: string): void => void socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    if (crossOrigin(req)) return reject('403 Forbidden');
    const principal = authenticate(req);
    if (!principal) return reject('401 Unauthorized');
    if (req.url !== '/v1') return reject('404 Not Found');
    wss.handleUpgrade(req, socket, head, (ws) => {
      const send = (event: WatchEvent): void => void (ws.readyState === ws.OPEN && ws.send(JSON.stringify({ v: SCHEDULER_PROTOCOL_VERSION, event })));
      let watching = false;
      serveRpc(ws, {
        version: SCHEDULER_PROTOCOL_VERSION,
        methods: schedulerMethods,
        handle: async (method, params) => {
          if (method === 'watch' && !watching) {
            watching = true;
            events.on('event', send);
          }
          return handle(method, params);
        },
        log: log.child({ principal }),
        heartbeatMs: config.heartbeatMs,
      });
      ws.once('close', () => events.off('event', send));
    });
  });
  await new Promise<void>((resolve, reject) => {
    http.once('error', reject);
    http.listen(config.listenPort, config.listenHost, () => resolve());
  });
  const address = http.address();
  if (address === null || typeof address === 'string') throw new SchedulerError('SCHEDULER_LISTEN', `the API has no TCP address (${String(address)})`);
  const port = address.port;
  log.info({ port, hosts: config.hosts.length, database: redactDatabase(config.database), replica: store.shared ? scheduler.owner : undefined }, 'scheduler listening');
  const metricsListener = config.metricsListen ? await startMetricsListener(config.metricsListen, () => metrics.render(), log).catch(async (err: unknown) => {
    await new Promise<void>((r) => http.close(() => r()));
    await scheduler.stop(0);
    await events.stop();
    await store.close().catch(() => undefined);
    throw err;
  }) : undefined;
  return {
    url: `ws://${config.listenHost}:${port}`,
    scheduler,
    events,
    metrics,
    ...(metricsListener ? { metricsUrl: metricsListener.url } : {}),
    close: async (opts = {}) => {
      for (const c of wss.clients) c.terminate();
      await new Promise<void>((r) => http.close(() => r()));
      await metricsListener?.close();
      metrics.close();
      await protections.stop().catch((err: unknown) => log.error({ err: errorText(err) }, 'stopping the protections'));
      await scheduler.stop(opts.graceMs).catch((err: unknown) => log.error({ err: errorText(err) }, 'stopping the scheduler'));
      await events.stop().catch((err: unknown) => log.error({ err: errorText(err) }, 'stopping the fleet events'));
      await store.close().catch((err: unknown) => log.error({ err: errorText(err) }, 'closing the store'));
    },
  };
}
