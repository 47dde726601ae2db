/**
 * The operator's CLI against a scheduler that answers nonsense (a fake on a real loopback
 * WebSocket, speaking the real framing): every malformed reply is one clear error naming the
 * method and the field, exit 1; a malformed event of the watch stream is skipped, not a crash.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { WebSocketServer, type WebSocket } from 'ws';
import { silentLogger } from '../../../src/log.js';
import { serveRpc } from '../../../src/rpc/ws-rpc.js';
import { main as ferry } from '../../../src/scheduler/cli.js';
import { SchedulerClient } from '../../../src/scheduler/client.js';
import { SCHEDULER_PROTOCOL_VERSION, schedulerMethods } from '../../../src/scheduler/protocol.js';

const TOKEN = 'operator-token-replies-0123';
const job = { id: 'm-1', vm: 'web1', from: 'A', to: 'B', reason: 'manual', priority: 10, mode: 'precopy', state: 'running', attempts: 1, phase: 'mirror', error: null, bandwidthBytesPerSec: null, memoryMiB: 128, diskBytes: 1 << 20, notBefore: 0, createdAt: 1, updatedAt: 2, seq: 1 };

let http: Server;
let url: string;
/** What the fake answers, by method. */
let answers: Record<string, unknown>;
let sockets: WebSocket[];

const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown): void => void unhandled.push(reason);

beforeEach(async () => {
  unhandled.length = 0;
  process.on('unhandledRejection', onUnhandled);
  process.on('uncaughtException', onUnhandled);
  answers = {};
  sockets = [];
  http = createServer();
  const wss = new WebSocketServer({ noServer: true });
  http.on('upgrade', (req, socket, head) =>
    wss.handleUpgrade(req, socket, head, (ws) => {
      sockets.push(ws);
      serveRpc(ws, { version: SCHEDULER_PROTOCOL_VERSION, methods: schedulerMethods, handle: async (method) => answers[method] ?? {}, log: silentLogger });
    }),
  );
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  url = `ws://127.0.0.1:${(http.address() as AddressInfo).port}`;
});

afterEach(async () => {
  for (const ws of sockets) ws.terminate();
  await new Promise<void>((r) => http.close(() => r()));
  await new Promise((r) => setTimeout(r, 20));
  process.off('unhandledRejection', onUnhandled);
  process.off('uncaughtException', onUnhandled);
  expect(unhandled).toEqual([]);
});

async function run(...argv: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const sink = (f: (s: string) => void): NodeJS.WritableStream => Object.assign(Object.create(null) as object, { write: (s: string) => (f(s), true) }) as NodeJS.WritableStream;
  const code = await ferry(['--scheduler', url, ...argv], { stdout: sink((x) => (out += x)), stderr: sink((x) => (err += x)) }, { FERRY_SCHEDULER_TOKEN: TOKEN });
  return { code, out, err };
}

test.each([
  [['hosts'], { hosts: null }, /answered hosts with something this client cannot read: \(reply\): /],
  [['hosts'], { hosts: [{ name: 'A', url: 'ws://a:1', reachable: 'yes', freeMemoryMiB: 1, freeDiskBytes: 1, vms: 0, outgoing: 0, incoming: 0 }] }, /answered hosts .*: 0\.reachable: /],
  [['vms'], { vms: [{ name: 'web1' }] }, /answered vms .*: 0\.host: /],
  [['queue'], { queue: [{ ...job, state: 'exploded' }] }, /answered queue .*: 0\.state: /],
  [['migrate', 'web1'], { migrate: { job: { ...job, id: 7 }, existing: false } }, /answered migrate .*: job\.id: /],
  [['drain', 'A'], { drain: {} }, /answered drain .*: \(reply\): /],
  [['cancel', 'm-1'], { cancel: 'ok' }, /answered cancel .*: \(reply\): /],
  [['show', 'm-1'], { get: job, journal: {} }, /answered journal .*: \(reply\): /],
])('ferry %j against a malformed reply: one clear line, exit 1', async (argv, given, message) => {
  answers = given;
  const r = await run(...argv);
  expect(r.err).toMatch(message);
  expect(r.err).toMatch(/^ferry: the scheduler at ws:\/\/127\.0\.0\.1:\d+ answered/);
  expect(r.err.trim().split('\n'), r.err).toHaveLength(1);
  expect(r.code).toBe(1);
  expect(r.out).toBe('');
});

test('well-formed replies still print, with fields this client does not know kept in --json', async () => {
  answers = { queue: [{ ...job, newerField: 1 }] };
  expect(await run('queue')).toMatchObject({ code: 0, out: expect.stringMatching(/^ID +VM +FROM.*\nm-1 +web1 +A +B +running +mirror +1/) });
  expect(JSON.parse((await run('--json', 'queue')).out)).toEqual([{ ...job, newerField: 1 }]);
});

test('watch: a malformed event is skipped, the next one printed', async () => {
  answers = { hosts: [] };
  const c = await SchedulerClient.connect(url, TOKEN);
  const seen: string[] = [];
  await c.watch((e) => seen.push(e.type === 'phase' ? `${e.vm} ${e.phase}` : e.type));
  const push = (event: unknown): void => {
    for (const ws of sockets) ws.send(JSON.stringify({ v: SCHEDULER_PROTOCOL_VERSION, event }));
  };
  push({ type: 'job', job: { id: 'm-1' } });
  push({ type: 'progress', id: 'm-1', vm: 'web1', phase: 'mirror', doneBytes: 'lots', totalBytes: 1, bytesPerSec: 1, etaMs: null });
  push({ type: 'phase', id: 'm-1', vm: 'web1', phase: 'ram' });
  await expect.poll(() => seen).toEqual(['web1 ram']);
  expect(c.skippedEvents).toBe(2);
  c.close();

  // The CLI's watch: the same stream, then the scheduler goes away and watch ends.
  const watching = run('watch');
  await expect.poll(() => sockets.length).toBe(2);
  await new Promise((r) => setTimeout(r, 100));
  push({ type: 'job', job: { id: 'm-1' } });
  push({ type: 'job', job });
  await new Promise((r) => setTimeout(r, 100));
  sockets[1]!.close();
  const r = await watching;
  expect(r.code, r.err).toBe(0);
  expect(r.out).toMatch(/^\S+ {2}m-1 web1 A -> B: running\n$/);
});
