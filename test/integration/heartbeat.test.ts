/**
 * Half-open connections, both directions, on real sockets: a real agent and a real scheduler,
 * reached through a TCP proxy that stops forwarding (blackhole-proxy.ts), and a scheduler
 * process frozen with SIGSTOP. Each side must notice within its heartbeat bound (2 x interval)
 * and fail every pending call with a clear error, instead of waiting for the call's deadline.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { WebSocket } from 'ws';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { FerryError } from '../../src/errors.js';
import { DEFAULT_HEARTBEAT_MS } from '../../src/rpc/heartbeat.js';
import { openSocket, RpcSession, type PeerLabel } from '../../src/rpc/ws-client.js';
import { SchedulerClient } from '../../src/scheduler/client.js';
import { startSchedulerService, type RunningScheduler } from '../../src/scheduler/service.js';
import { startBlackholeProxy, type BlackholeProxy } from '../helpers/blackhole-proxy.js';
import { cleanupAll, makeTempDir } from '../helpers/guest.js';

const REPO = resolve(import.meta.dirname, '../..');
const AGENT_TOKEN = 'agent-token-for-heartbeats-0123';
const API_TOKEN = 'operator-token-heartbeats-0123';
/** Slack on top of the 2 x interval bound, for a loaded 2-core machine. */
const SLACK_MS = 1_500;

let agent: RunningAgent | undefined;
let scheduler: RunningScheduler | undefined;
let proxy: BlackholeProxy | undefined;
const children: ChildProcess[] = [];
const closers: (() => void)[] = [];

afterEach(async () => {
  for (const c of closers.splice(0)) c();
  for (const child of children.splice(0)) {
    if (child.exitCode !== null || child.signalCode !== null) continue;
    // A frozen process cannot die of SIGTERM: SIGKILL works on a stopped one too, CONT for good measure.
    child.kill('SIGKILL');
    child.kill('SIGCONT');
    await new Promise((r) => child.once('exit', r));
  }
  await proxy?.close();
  proxy = undefined;
  await scheduler?.close();
  scheduler = undefined;
  await agent?.close();
  agent = undefined;
  await cleanupAll();
});

async function startPair(schedulerHeartbeatMs: number): Promise<{ agent: RunningAgent; scheduler: RunningScheduler }> {
  const root = await makeTempDir('ferry-heartbeat-');
  agent = await startAgent({ name: 'A', listenPort: 0, storageRoot: root, tokens: { [AGENT_TOKEN]: 'scheduler' } });
  scheduler = await startSchedulerService({
    listenPort: 0,
    database: join(root, 'scheduler.db'),
    hosts: [{ name: 'A', url: agent.url }],
    agentToken: AGENT_TOKEN,
    tokens: { [API_TOKEN]: 'operator' },
    heartbeatMs: schedulerHeartbeatMs,
  });
  return { agent, scheduler };
}

const portOf = (url: string): number => Number(new URL(url).port);

async function expectDropped(calls: Promise<unknown>[], from: number, boundMs: number, code: string): Promise<void> {
  const results = await Promise.allSettled(calls);
  const elapsed = performance.now() - from;
  for (const r of results) {
    expect(r.status).toBe('rejected');
    const err = (r as PromiseRejectedResult).reason as unknown;
    expect(err).toBeInstanceOf(FerryError);
    expect(err).toMatchObject({ code, message: expect.stringMatching(/answered no ping for \d+ ms: the connection was dropped/) });
  }
  expect(elapsed).toBeLessThan(boundMs + SLACK_MS);
}

describe('the caller pings its peer', () => {
  test('a scheduler behind a silent link: every pending call fails within 2 x heartbeat', async () => {
    const { scheduler: svc } = await startPair(600_000);
    proxy = await startBlackholeProxy({ host: '127.0.0.1', port: portOf(svc.url) });
    const client = await SchedulerClient.connect(`ws://127.0.0.1:${proxy.port}`, API_TOKEN, 10_000, { heartbeatMs: 300 });
    closers.push(() => client.close());
    expect(await client.call('hosts')).toHaveLength(1);
    // Long enough for several pings to have crossed: a live link is not dropped.
    await new Promise((r) => setTimeout(r, 1_000));
    expect(await client.call('queue')).toEqual([]);

    proxy.blackhole();
    const t0 = performance.now();
    const pending = [client.call('hosts', {}, 60_000), client.call('queue', { all: true }, 60_000), client.call('vms', {}, 60_000)];
    await expectDropped(pending, t0, 2 * 300, 'SCHEDULER_DISCONNECTED');
    await client.closed;
    // And a call after the drop fails at once, not at its deadline.
    await expect(client.call('hosts', {}, 60_000)).rejects.toMatchObject({ code: 'SCHEDULER_DISCONNECTED' });
  });

  test('an agent behind a silent link: the same, through the shared RpcSession', async () => {
    const { agent: a } = await startPair(600_000);
    proxy = await startBlackholeProxy({ host: '127.0.0.1', port: a.port });
    const peer: PeerLabel = { who: `agent via proxy`, code: 'AGENT', error: (code, message, opts) => new FerryError(code, message, opts) };
    const session = await openSocket(`ws://127.0.0.1:${proxy.port}/v1`, { token: AGENT_TOKEN, timeoutMs: 10_000, peer, heartbeatMs: 300 }, (ws) => new RpcSession(ws, { version: 1, peer, onEvent: () => undefined }));
    closers.push(() => session.close());
    expect(await session.call('vm.list', {}, 10_000)).toEqual([]);

    proxy.blackhole();
    const t0 = performance.now();
    await expectDropped([session.call('vm.list', {}, 60_000), session.call('vm.list', {}, 60_000)], t0, 2 * 300, 'AGENT_DISCONNECTED');
  });

  test('a scheduler process frozen with SIGSTOP: pending calls fail within the bound', async () => {
    const root = await makeTempDir('ferry-heartbeat-stop-');
    agent = await startAgent({ name: 'A', listenPort: 0, storageRoot: root, tokens: { [AGENT_TOKEN]: 'scheduler' } });
    const config = join(root, 'scheduler.json');
    await writeFile(config, JSON.stringify({ listenPort: 0, database: join(root, 'scheduler.db'), hosts: [{ name: 'A', url: agent.url }], agentToken: AGENT_TOKEN, tokens: { [API_TOKEN]: 'operator' } }));
    const child = spawn(process.execPath, ['bin/ferry-scheduler.mjs', '--config', config], { cwd: REPO, env: { ...process.env, FERRY_LOG_LEVEL: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
    const url = await new Promise<string>((ready, fail) => {
      const timer = setTimeout(() => fail(new Error(`the scheduler did not start: ${stderr}`)), 30_000);
      child.stdout!.on('data', (d: Buffer) => {
        const m = /listening on (ws:\/\/\S+)/.exec(d.toString());
        if (m) {
          clearTimeout(timer);
          ready(m[1]!);
        }
      });
    });
    const client = await SchedulerClient.connect(url, API_TOKEN, 10_000, { heartbeatMs: 300 });
    closers.push(() => client.close());
    expect(await client.call('hosts')).toHaveLength(1);

    // The kernel still ACKs for a stopped process: to TCP the connection is fine.
    process.kill(child.pid!, 'SIGSTOP');
    const t0 = performance.now();
    try {
      await expectDropped([client.call('hosts', {}, 60_000), client.call('queue', {}, 60_000)], t0, 2 * 300, 'SCHEDULER_DISCONNECTED');
    } finally {
      process.kill(child.pid!, 'SIGCONT');
    }
  });
});

describe('the server pings its callers', () => {
  test('the scheduler drops a caller behind a silent link within 2 x its heartbeat', async () => {
    const { scheduler: svc } = await startPair(300);
    proxy = await startBlackholeProxy({ host: '127.0.0.1', port: portOf(svc.url) });
    // The client itself would wait a minute: only the scheduler's pings can find the silence.
    const client = await SchedulerClient.connect(`ws://127.0.0.1:${proxy.port}`, API_TOKEN, 10_000, { heartbeatMs: 60_000 });
    closers.push(() => client.close());
    // A watching caller is one listener on the scheduler's event stream.
    const own = svc.events.listenerCount('event');
    await client.watch(() => undefined);
    await new Promise((r) => setTimeout(r, 1_000));
    expect(proxy.links[0]!.upstreamClosedAt).toBeUndefined();
    expect(svc.events.listenerCount('event')).toBe(own + 1);

    proxy.blackhole();
    const t0 = performance.now();
    const at = await proxy.closed('upstream', 2 * 300 + SLACK_MS);
    expect(at - t0).toBeLessThan(2 * 300 + SLACK_MS);
    // The dead caller's watch stream is gone with it.
    await expect.poll(() => svc.events.listenerCount('event')).toBe(own);
  });

  test(`the agent drops a caller behind a silent link within 2 x ${DEFAULT_HEARTBEAT_MS} ms (its default)`, async () => {
    const root = await makeTempDir('ferry-heartbeat-agent-');
    // One session per principal: the dead caller's session holds the only one until it is dropped.
    const a = (agent = await startAgent({ name: 'A', listenPort: 0, storageRoot: root, tokens: { [AGENT_TOKEN]: 'scheduler' }, limits: { sessionsPerPrincipal: 1 } }));
    proxy = await startBlackholeProxy({ host: '127.0.0.1', port: a.port });
    // A raw ws client that never pings: only the agent's pings can find the silence.
    const ws = new WebSocket(`ws://127.0.0.1:${proxy.port}/v1`, { headers: { authorization: `Bearer ${AGENT_TOKEN}` } });
    closers.push(() => ws.terminate());
    await new Promise((r, j) => ws.once('open', r).once('error', j));
    const peer: PeerLabel = { who: 'agent', code: 'AGENT', error: (code, message, opts) => new FerryError(code, message, opts) };
    const open = (): Promise<RpcSession> => openSocket(`${a.url}/v1`, { token: AGENT_TOKEN, timeoutMs: 5_000, peer }, (w) => new RpcSession(w, { version: 1, peer, onEvent: () => undefined }));
    await expect(open()).rejects.toThrow(/HTTP 429/);

    proxy.blackhole();
    const t0 = performance.now();
    const at = await proxy.closed('upstream', 2 * DEFAULT_HEARTBEAT_MS + SLACK_MS);
    expect(at - t0).toBeLessThan(2 * DEFAULT_HEARTBEAT_MS + SLACK_MS);
    expect(at - t0).toBeGreaterThan(DEFAULT_HEARTBEAT_MS / 2);
    // The slot is free again: a new session of the same principal is let in.
    await expect.poll(async () => {
      const s = await open().catch((e: unknown) => e);
      if (!(s instanceof RpcSession)) return s;
      const listed = await s.call('vm.list', {}, 5_000);
      s.close();
      return listed;
    }).toEqual([]);
  }, 2 * DEFAULT_HEARTBEAT_MS + 15_000);
});
