/**
 * The shared WebSocket RPC on a real loopback socket: errors keep their codes across the wire,
 * and a call's AbortSignal ends its wait (and only its own).
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, beforeEach, expect, test } from 'vitest';
import { WebSocketServer } from 'ws';
import { z } from 'zod';
import { FerryError } from '../../../src/errors.js';
import { silentLogger } from '../../../src/log.js';
import { SpecError } from '../../../src/qemu/spec.js';
import { openSocket, RpcSession, type PeerLabel } from '../../../src/rpc/ws-client.js';
import { serveRpc } from '../../../src/rpc/ws-rpc.js';

const TOKEN = 'unit-test-token-0123456789';
const peer: PeerLabel = { who: 'the test server', code: 'PEER', error: (code, message, opts) => new FerryError(code, message, opts) };

let http: Server;
let url: string;
/** Requests the server saw, by method. */
let seen: string[];
/** Answers held back by `hold`, released by the test. */
let held: (() => void)[];
const sessions: RpcSession[] = [];

const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown): void => void unhandled.push(reason);

beforeEach(async () => {
  unhandled.length = 0;
  process.on('unhandledRejection', onUnhandled);
  seen = [];
  held = [];
  http = createServer();
  const wss = new WebSocketServer({ noServer: true });
  http.on('upgrade', (req, socket, head) =>
    wss.handleUpgrade(req, socket, head, (ws) =>
      serveRpc(ws, {
        version: 1,
        methods: { echo: z.object({ x: z.number() }).strict(), hold: z.object({}).strict(), spec: z.object({}).strict(), own: z.object({}).strict(), plain: z.object({}).strict() },
        handle: async (method, params) => {
          seen.push(method);
          if (method === 'echo') return params;
          if (method === 'hold') return new Promise((r) => held.push(() => r({ late: true })));
          if (method === 'spec') throw new SpecError('memoryMiB', 'must be at least 16 MiB');
          if (method === 'own') throw new FerryError('NO_SUCH_MIGRATION', "no migration 'm-1'", { userError: true });
          throw new Error('a bug');
        },
        log: silentLogger,
      }),
    ),
  );
  await new Promise<void>((r) => http.listen(0, '127.0.0.1', r));
  url = `ws://127.0.0.1:${(http.address() as AddressInfo).port}`;
});

afterEach(async () => {
  for (const s of sessions.splice(0)) s.close();
  await new Promise<void>((r) => http.close(() => r()));
  http.closeAllConnections();
  await new Promise((r) => setTimeout(r, 10));
  process.off('unhandledRejection', onUnhandled);
  expect(unhandled).toEqual([]);
});

async function connect(): Promise<RpcSession> {
  const s = await openSocket(url, { token: TOKEN, timeoutMs: 5_000, peer }, (ws) => new RpcSession(ws, { version: 1, peer, onEvent: () => undefined }));
  sessions.push(s);
  return s;
}

test('every error keeps its own code on the wire; a bug is INTERNAL', async () => {
  const s = await connect();
  await expect(s.call('spec', {}, 5_000)).rejects.toMatchObject({ code: 'SPEC_INVALID', message: 'invalid VM spec: memoryMiB: must be at least 16 MiB' });
  await expect(s.call('own', {}, 5_000)).rejects.toMatchObject({ code: 'NO_SUCH_MIGRATION' });
  await expect(s.call('plain', {}, 5_000)).rejects.toMatchObject({ code: 'INTERNAL', message: 'a bug' });
  expect(await s.call('echo', { x: 1 }, 5_000)).toEqual({ x: 1 });
});

test('an abort ends the wait of its own call, at once; a late answer is dropped', async () => {
  const s = await connect();
  const ac = new AbortController();
  const t0 = performance.now();
  const aborted = s.call('hold', {}, 60_000, ac.signal);
  const other = s.call('hold', {}, 60_000);
  await expect.poll(() => seen.length).toBe(2);
  ac.abort(new FerryError('CANCELLED', 'cancelled by SIGINT'));
  const err = await aborted.catch((e: unknown) => e);
  expect(err).toMatchObject({ code: 'PEER_CANCELLED', message: 'hold to the test server was cancelled: cancelled by SIGINT' });
  expect((err as Error).cause).toMatchObject({ code: 'CANCELLED' });
  expect(performance.now() - t0).toBeLessThan(2_000);
  // The other call is still waiting, and gets its answer; the aborted one's answer goes nowhere.
  for (const release of held) release();
  expect(await other).toEqual({ late: true });
  expect(await s.call('echo', { x: 2 }, 5_000)).toEqual({ x: 2 });
});

test('an already aborted signal sends nothing; a closed session refuses at once', async () => {
  const s = await connect();
  const ac = new AbortController();
  ac.abort(new Error('stop'));
  await expect(s.call('echo', { x: 1 }, 60_000, ac.signal)).rejects.toMatchObject({ code: 'PEER_CANCELLED' });
  s.close();
  await s.closed;
  const t0 = performance.now();
  await expect(s.call('echo', { x: 1 }, 60_000)).rejects.toMatchObject({ code: 'PEER_DISCONNECTED', message: 'the test server closed the session' });
  expect(performance.now() - t0).toBeLessThan(1_000);
  expect(seen).toEqual([]);
});
