import { createServer, connect, type Server, type Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { ConvergenceError } from '../../../src/engine/convergence/errors.js';
import { nbdServerNeedsRelay, startNbdRelay, type NbdRelay } from '../../../src/engine/convergence/nbd-relay.js';

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A unix-socket server standing in for QEMU's NBD server: it answers every chunk with its length. */
async function fakeQemu(): Promise<{ path: string; server: Server; received: () => number }> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-relay-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const path = join(dir, 'nbd.sock');
  let received = 0;
  const server = createServer((s) => s.on('data', (b: Buffer) => { received += b.length; s.write(`${b.length};`); }));
  await new Promise<void>((r) => server.listen(path, r));
  cleanups.push(() => new Promise((r) => server.close(r)));
  return { path, server, received: () => received };
}

async function relayTo(path: string, ports: Iterable<number> = [0]): Promise<NbdRelay> {
  const relay = await startNbdRelay({ host: '127.0.0.1', ports, unixPath: path });
  cleanups.push(() => relay.close());
  return relay;
}

function dial(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port }, () => resolve(s));
    s.once('error', reject);
    cleanups.push(async () => void s.destroy());
  });
}

function readUntil(s: Socket, pred: (text: string) => boolean): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const t = setTimeout(() => reject(new Error(`timed out; got '${text}'`)), 5_000);
    s.on('data', (b: Buffer) => {
      text += b.toString();
      if (pred(text)) {
        clearTimeout(t);
        resolve(text);
      }
    });
  });
}

test('carries bytes both ways between the TCP client and the unix socket, and counts them', async () => {
  const qemu = await fakeQemu();
  const relay = await relayTo(qemu.path);
  const c = await dial(relay.port);
  const sum = (t: string): number => t.split(';').filter(Boolean).reduce((a, n) => a + Number(n), 0);
  const echoed = readUntil(c, (t) => sum(t) === 100_000);
  c.write(Buffer.alloc(60_000, 1));
  c.write(Buffer.alloc(40_000, 2));
  const text = await echoed;
  expect(qemu.received()).toBe(100_000);
  expect(relay.bytesToServer).toBe(100_000);
  expect(relay.bytesFromServer).toBe(text.length);
  expect(relay.connections).toBe(1);
});

test('a port in use is skipped; no free port is a RELAY_NO_PORT error', async () => {
  const qemu = await fakeQemu();
  const taken = createServer();
  await new Promise<void>((r) => taken.listen({ host: '127.0.0.1', port: 0 }, r));
  cleanups.push(() => new Promise((r) => taken.close(r)));
  const busy = (taken.address() as { port: number }).port;
  const relay = await relayTo(qemu.path, [busy, 0]);
  expect(relay.port).not.toBe(busy);
  const err = await startNbdRelay({ host: '127.0.0.1', ports: [busy, busy], unixPath: qemu.path }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(ConvergenceError);
  expect(err).toMatchObject({ code: 'RELAY_NO_PORT' });
});

test('close cuts live connections and stops listening', async () => {
  const qemu = await fakeQemu();
  const relay = await relayTo(qemu.path);
  const c = await dial(relay.port);
  const closed = new Promise<void>((r) => c.once('close', () => r()));
  c.write('x');
  await readUntil(c, (t) => t.includes(';'));
  await relay.close();
  await closed;
  await expect(dial(relay.port)).rejects.toMatchObject({ code: 'ECONNREFUSED' });
});

test('when QEMU is not listening the client is cut, and the relay serves the next one', async () => {
  const qemu = await fakeQemu();
  const relay = await relayTo(join(qemu.path, '..', 'absent.sock'));
  const c = await dial(relay.port);
  await new Promise<void>((r) => c.once('close', () => r()));
  expect(relay.connections).toBe(1);
  const again = await dial(relay.port);
  await new Promise<void>((r) => again.once('close', () => r()));
  expect(relay.connections).toBe(2);
});

test('the relay is for QEMU before 8.0', () => {
  const v = (major: number) => ({ qemu: { major, minor: 2, micro: 0 }, package: '' });
  expect(nbdServerNeedsRelay(v(7))).toBe(true);
  expect(nbdServerNeedsRelay(v(8))).toBe(false);
  expect(nbdServerNeedsRelay(v(10))).toBe(false);
});
