/**
 * /metrics and the web view's door on a real agent and a real scheduler service over loopback
 * (no guest: what is counted here needs none): refused without the API token, served with it,
 * served without one on the operator's separate metrics address; the page's WebSocket with its
 * token in the subprotocol offer, and refused from another origin.
 */
import { readFile } from 'node:fs/promises';
import { request } from 'node:https';
import { afterAll, beforeAll, expect, test } from 'vitest';
import WebSocket from 'ws';
import { AgentClient } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { startSchedulerService, type RunningScheduler } from '../../src/scheduler/service.js';
import { cleanupAll, makeTempDir } from '../helpers/guest.js';
import { makePki } from '../helpers/pki.js';

const AGENT_TOKEN = 'agent-token-for-the-scheduler-0123';
const API_TOKEN = 'operator-token-0123456789abcdef';
let agent: RunningAgent;
let svc: RunningScheduler;

beforeAll(async () => {
  agent = await startAgent({ name: 'A', listenPort: 0, storageRoot: await makeTempDir('ferry-metrics-A-'), tokens: { [AGENT_TOKEN]: 'scheduler' }, metricsListen: { host: '127.0.0.1', port: 0 } });
  svc = await startSchedulerService({
    listenPort: 0,
    database: `${await makeTempDir('ferry-metrics-db-')}/state.db`,
    hosts: [{ name: 'A', url: agent.url }],
    agentToken: AGENT_TOKEN,
    tokens: { [API_TOKEN]: 'ops' },
    metricsListen: { host: '127.0.0.1', port: 0 },
  });
});

afterAll(async () => {
  await svc?.close({ graceMs: 0 });
  await agent?.close();
  await cleanupAll();
});

const httpUrl = (wsUrl: string, path: string): string => `${wsUrl.replace(/^ws/, 'http')}${path}`;

test('the scheduler: /metrics refused without the API token, served with it and on its own address', async () => {
  const url = httpUrl(svc.url, '/metrics');
  const none = await fetch(url);
  expect(none.status).toBe(401);
  expect(await none.text()).toBe('/metrics needs Authorization: Bearer <token>\n');
  expect((await fetch(url, { headers: { authorization: 'Bearer not-a-token-of-this-scheduler' } })).status).toBe(401);
  // The agent's token is not an API token of the scheduler.
  expect((await fetch(url, { headers: { authorization: `Bearer ${AGENT_TOKEN}` } })).status).toBe(401);
  const ok = await fetch(url, { headers: { authorization: `Bearer ${API_TOKEN}` } });
  expect(ok.status).toBe(200);
  expect(ok.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  const text = await ok.text();
  for (const line of [
    '# TYPE ferry_migrations_total counter',
    '# TYPE ferry_migration_duration_seconds histogram',
    '# TYPE ferry_migration_downtime_seconds histogram',
    'ferry_migration_bytes_total{kind="disk"} 0',
    'ferry_migration_bytes_total{kind="ram"} 0',
    'ferry_scheduler_queue_depth{host="A"} 0',
    'ferry_scheduler_in_flight{host="A",direction="out"} 0',
    'ferry_scheduler_lease_takeovers_total 0',
    'ferry_scheduler_stale_calls_refused_total 0',
  ]) expect(text.split('\n')).toContain(line);
  expect(text).toMatch(/^ferry_scheduler_process_resident_memory_bytes \d+/m);

  expect(svc.metricsUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
  const own = await fetch(svc.metricsUrl!);
  expect(own.status).toBe(200);
  expect(await own.text()).toContain('ferry_scheduler_queue_depth{host="A"} 0');
  // That address serves /metrics and nothing else: not the page, not the API.
  expect((await fetch(svc.metricsUrl!.replace('/metrics', '/'))).status).toBe(404);
});

test('the agent: /metrics refused without a token, counts its VMs and refused requests', async () => {
  const url = httpUrl(agent.url, '/metrics');
  expect((await fetch(url)).status).toBe(401);
  expect((await fetch(url, { headers: { authorization: `Bearer ${API_TOKEN}` } })).status).toBe(401);
  const c = await AgentClient.connect(agent.url, AGENT_TOKEN);
  await expect(c.call('vm.get', { name: 'ghost' })).rejects.toMatchObject({ code: 'VM_NOT_FOUND' });
  c.close();
  const text = await (await fetch(url, { headers: { authorization: `Bearer ${AGENT_TOKEN}` } })).text();
  expect(text.split('\n')).toContain('ferry_agent_vms{role="vm",state="running"} 0');
  expect(text.split('\n')).toContain('ferry_agent_requests_refused_total{method="vm.get",code="VM_NOT_FOUND"} 1');
  expect(text).toContain('# TYPE ferry_agent_qmp_errors_total counter');
  expect(text).toContain('# TYPE ferry_agent_stale_calls_refused_total counter');
  expect((await fetch(agent.metricsUrl!)).status).toBe(200);
});

test('the web view: its files are served; its WebSocket takes the token from the subprotocol offer, and refuses another origin', async () => {
  const page = await fetch(httpUrl(svc.url, '/'));
  expect(page.status).toBe(200);
  expect(page.headers.get('content-type')).toBe('text/html; charset=utf-8');
  expect(page.headers.get('content-security-policy')).toContain("default-src 'self'");
  expect(await page.text()).toContain('<script type="module" src="app.js"></script>');
  expect((await fetch(httpUrl(svc.url, '/app.js'))).headers.get('content-type')).toBe('text/javascript; charset=utf-8');
  expect((await fetch(httpUrl(svc.url, '/../package.json'))).status).toBe(426);

  const offer = (token: string): string[] => ['ferry.v1', `ferry.bearer.${Buffer.from(token).toString('base64url')}`];
  const open = (protocols: string[], headers: Record<string, string> = {}): Promise<{ ws: WebSocket; protocol: string } | { status: number }> =>
    new Promise((resolve, reject) => {
      const ws = new WebSocket(`${svc.url}/v1`, protocols, { headers });
      ws.once('open', () => resolve({ ws, protocol: ws.protocol }));
      ws.once('unexpected-response', (_req, res) => resolve({ status: res.statusCode ?? 0 }));
      ws.once('error', reject);
    });
  const host = new URL(svc.url).host;
  const good = await open(offer(API_TOKEN), { origin: `http://${host}` });
  expect(good).toMatchObject({ protocol: 'ferry.v1' }); // the token is never echoed back
  if ('ws' in good) {
    const reply = new Promise<string>((r) => good.ws.once('message', (d: Buffer) => r(d.toString())));
    good.ws.send(JSON.stringify({ v: 1, id: 1, method: 'hosts', params: {} }));
    expect(JSON.parse(await reply)).toMatchObject({ id: 1, ok: true, result: [{ name: 'A', reachable: true, queued: 0 }] });
    good.ws.close();
  }
  expect(await open(offer('not-a-token-of-this-scheduler'))).toEqual({ status: 401 });
  expect(await open(offer(API_TOKEN), { origin: 'http://evil.example' })).toEqual({ status: 403 });
});

test('an agent with mutual TLS: /metrics needs the client certificate and then the token', async () => {
  const pki = await makePki(await makeTempDir('ferry-metrics-pki-'));
  const tlsAgent = await startAgent({ name: 'T', listenPort: 0, storageRoot: await makeTempDir('ferry-metrics-T-'), tokens: { [AGENT_TOKEN]: 'scheduler' }, tls: { ...pki.agent, ca: pki.ca } });
  try {
    const get = async (opts: { cert?: boolean; token?: boolean }): Promise<number | string> => {
      const [ca, cert, key] = await Promise.all([readFile(pki.ca), readFile(pki.client.cert), readFile(pki.client.key)]);
      return new Promise((resolve) => {
        const req = request(
          { host: '127.0.0.1', port: tlsAgent.port, path: '/metrics', ca, ...(opts.cert ? { cert, key } : {}), headers: opts.token ? { authorization: `Bearer ${AGENT_TOKEN}` } : {} },
          (res) => {
            res.resume();
            resolve(res.statusCode ?? 0);
          },
        );
        req.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
        req.end();
      });
    };
    expect(await get({ token: true })).toMatch(/^(ECONNRESET|ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED|EPIPE)$/);
    expect(await get({ cert: true })).toBe(401);
    expect(await get({ cert: true, token: true })).toBe(200);
  } finally {
    await tlsAgent.close();
  }
});
