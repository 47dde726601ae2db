/**
 * The QMP tunnel's argument policy, two ways:
 *   - examples: every command as the engine sends it passes; the probed holes are refused;
 *   - a fuzz run through the real tunnel (a real WebSocket, a recording QMP endpoint on a unix
 *     socket behind it): each allowed command with random argument shapes, and an oracle written
 *     independently of the policy checks that nothing outside it ever reached "QEMU".
 * Seed: FERRY_FUZZ_SEED, else random; printed, so a failure can be replayed.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { WebSocket, WebSocketServer } from 'ws';
import { peerMatcher, QmpPolicy, type QmpPolicyContext, type TunnelRole } from '../../../src/agent/qmp-policy.js';
import { tunnelQmp } from '../../../src/agent/qmp-tunnel.js';
import { silentLogger } from '../../../src/log.js';

const HOST = '10.9.0.1';
const PEER = '10.9.0.2';
const RANGE: [number, number] = [20000, 20099];
/** A destination's run dir socket, behind the agent's NBD relay. */
const RELAY_SOCK = '/srv/ferry/run-vm-0a1b2c3d/nbd.sock';
const ctx = (role: TunnelRole): QmpPolicyContext => ({
  role,
  diskIds: ['root', 'data'],
  migrationHost: HOST,
  portRange: RANGE,
  peerAllowed: peerMatcher({ peers: [`${PEER}/32`], migrationHost: HOST }),
  ...(role === 'destination' ? { nbdRelaySocket: RELAY_SOCK } : {}),
});

/** What the engine sends, per role: each must pass, re-serialised unchanged. */
const ENGINE: Record<TunnelRole, [string, Record<string, unknown> | undefined][]> = {
  source: [
    ['qmp_capabilities', undefined],
    ['query-status', undefined],
    ['query-named-block-nodes', { flat: true }],
    ['blockdev-add', { driver: 'nbd', 'node-name': 'ferry-nbd-root', server: { type: 'inet', host: PEER, port: '20001' }, export: 'ferry-0a1b2c3d-root' }],
    ['blockdev-mirror', { 'job-id': 'ferry-mirror-root', device: 'disk-root', target: 'ferry-nbd-root', sync: 'top', 'copy-mode': 'background', 'auto-dismiss': false, speed: 1000 }],
    ['block-job-change', { id: 'ferry-mirror-root', type: 'mirror', 'copy-mode': 'write-blocking' }],
    ['migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'pause-before-switchover', state: true }] }],
    ['migrate-set-parameters', { 'max-bandwidth': 2 ** 40, 'downtime-limit': 300 }],
    // RAM over multifd channels (multifdChannels): the capability and the count, on both sides.
    ['migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'multifd', state: true }] }],
    ['migrate-set-parameters', { 'max-bandwidth': 2 ** 40, 'downtime-limit': 300, 'multifd-channels': 2 }],
    ['migrate', { uri: `tcp:${PEER}:20002` }],
    ['migrate-continue', { state: 'pre-switchover' }],
    ['block-job-cancel', { device: 'ferry-mirror-data' }],
    ['job-dismiss', { id: 'ferry-mirror-data' }],
    ['nbd-server-start', { addr: { type: 'inet', data: { host: HOST, port: '20050' } } }],
    ['block-export-add', { type: 'nbd', id: 'ferry-0a1b2c3d-data', 'node-name': 'disk-data', name: 'ferry-0a1b2c3d-data', writable: false }],
    ['block-export-add', { type: 'nbd', id: 'ferry-0a1b2c3d-data', 'node-name': 'disk-data', name: 'ferry-0a1b2c3d-data', writable: false, 'allow-inactive': true }],
    ['block-export-del', { id: 'ferry-0a1b2c3d-data', mode: 'hard' }],
    ['blockdev-del', { 'node-name': 'ferry-nbd-root' }],
    ['query-machines', undefined],
    ['qom-get', { path: '/machine', property: 'type' }],
    ['blockdev-set-active', { 'node-name': 'disk-data', active: true }],
    ['query-yank', undefined],
    ['yank', { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-root' }, { type: 'migration' }] }],
    ['yank', { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-data' }] }],
    ['quit', undefined],
  ],
  destination: [
    ['qmp_capabilities', undefined],
    ['nbd-server-start', { addr: { type: 'inet', data: { host: HOST, port: '20003' } } }],
    ['nbd-server-start', { addr: { type: 'unix', data: { path: RELAY_SOCK } } }],
    ['block-export-add', { type: 'nbd', id: 'ferry-0a1b2c3d-root', 'node-name': 'disk-root', name: 'ferry-0a1b2c3d-root', writable: true }],
    ['migrate-set-capabilities', { capabilities: [{ capability: 'late-block-activate', state: true }] }],
    ['migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'multifd', state: true }] }],
    ['migrate-set-parameters', { 'multifd-channels': 2 }],
    ['migrate-incoming', { uri: `tcp:${HOST}:20004` }],
    ['cont', undefined],
    ['block-stream', { 'job-id': 'ferry-stream-root', device: 'disk-root', 'auto-finalize': false, 'auto-dismiss': false, speed: 5 }],
    ['block-job-set-speed', { device: 'ferry-stream-root', speed: 10 }],
    ['job-finalize', { id: 'ferry-stream-root' }],
  ],
};

describe('out-of-band', () => {
  test('a source allows OOB to be negotiated and exactly yank out-of-band, forwarded as exec-oob', () => {
    const p = new QmpPolicy(ctx('source'));
    expect(p.judge(JSON.stringify({ execute: 'qmp_capabilities', arguments: { enable: ['oob'] }, id: 1 }))).toMatchObject({ ok: true });
    const msg = { 'exec-oob': 'yank', arguments: { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-root' }] }, id: 'y1' };
    const v = p.judge(JSON.stringify(msg));
    expect(v).toMatchObject({ ok: true, command: 'yank', id: 'y1' });
    if (v.ok) expect(JSON.parse(v.line)).toEqual(msg);
  });

  test.each([
    ['source', { 'exec-oob': 'migrate-pause', id: 1 }],
    ['source', { 'exec-oob': 'query-status', id: 1 }],
    // QMP requires an id out-of-band
    ['source', { 'exec-oob': 'yank', arguments: { instances: [{ type: 'migration' }] } }],
    ['source', { 'exec-oob': 'yank', arguments: { instances: [{ type: 'chardev', id: 'serial0' }] }, id: 1 }],
    ['source', { 'exec-oob': 'yank', execute: 'yank', arguments: { instances: [{ type: 'migration' }] }, id: 1 }],
    ['source', { execute: 'qmp_capabilities', arguments: { enable: ['oob', 'other'] } }],
    ['destination', { 'exec-oob': 'yank', arguments: { instances: [{ type: 'migration' }] }, id: 1 }],
  ] as const)('%s refuses %j', (role, msg) => {
    expect(new QmpPolicy(ctx(role)).judge(JSON.stringify(msg))).toMatchObject({ ok: false });
  });
});

describe('the policy on examples', () => {
  test.each(['source', 'destination'] as const)('%s: what the engine sends passes unchanged', (role) => {
    const p = new QmpPolicy(ctx(role));
    for (const [execute, args] of ENGINE[role]) {
      const msg = { execute, ...(args ? { arguments: args } : {}), id: 7 };
      const v = p.judge(JSON.stringify(msg));
      expect(v, execute).toMatchObject({ ok: true });
      if (v.ok) expect(JSON.parse(v.line)).toEqual(msg);
    }
  });

  test.each([
    ['source', { execute: 'migrate', arguments: { uri: 'exec:id > /tmp/x' } }],
    ['source', { execute: 'migrate', arguments: { uri: `tcp:127.0.0.1:22` } }],
    ['source', { execute: 'migrate', arguments: { uri: `tcp:${PEER}:20002`, resume: true } }],
    ['source', { execute: 'blockdev-add', arguments: { driver: 'file', 'node-name': 'ferry-nbd-root', filename: '/etc/shadow' } }],
    ['source', { execute: 'block-export-add', arguments: { type: 'nbd', id: 'ferry-1-root', 'node-name': 'disk-root', name: 'ferry-1-root', writable: true } }],
    ['source', { execute: 'blockdev-mirror', arguments: { 'job-id': 'ferry-mirror-root', device: 'disk-root', target: 'disk-data', sync: 'full' } }],
    ['source', { execute: 'blockdev-del', arguments: { 'node-name': 'disk-root' } }],
    ['source', { 'exec-oob': 'migrate-pause' }],
    ['source', { execute: 'qom-get', arguments: { path: '/objects/sec0', property: 'data' } }],
    ['source', { execute: 'qom-get', arguments: { path: '/machine', property: 'type', extra: 1 } }],
    ['source', { execute: 'blockdev-set-active', arguments: { 'node-name': 'disk-root', active: false } }],
    ['source', { execute: 'blockdev-set-active', arguments: { active: true } }],
    ['source', { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: RELAY_SOCK } } } }],
    // yank: only this VM's ferry NBD client nodes and the migration, never a chardev or a disk
    ['source', { execute: 'yank', arguments: { instances: [{ type: 'chardev', id: 'serial0' }] } }],
    ['source', { execute: 'yank', arguments: { instances: [{ type: 'block-node', 'node-name': 'disk-root' }] } }],
    ['source', { execute: 'yank', arguments: { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-other' }] } }],
    ['source', { execute: 'yank', arguments: { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-root', extra: 1 }] } }],
    ['source', { execute: 'yank', arguments: { instances: [] } }],
    ['source', { execute: 'yank' }],
    ['destination', { execute: 'yank', arguments: { instances: [{ type: 'migration' }] } }],
    ['destination', { execute: 'query-yank' }],
    ['destination', { execute: 'qom-get', arguments: { path: '/machine', property: 'type' } }],
    ['destination', { execute: 'block-export-add', arguments: { type: 'nbd', id: 'ferry-1-root', 'node-name': 'disk-root', name: 'ferry-1-root', writable: true, 'allow-inactive': true } }],
    ['destination', { execute: 'migrate-incoming', arguments: { uri: 'unix:/run/x' } }],
    ['destination', { execute: 'nbd-server-start', arguments: { addr: { type: 'inet', data: { host: '0.0.0.0', port: '20003' } } } }],
    ['destination', { execute: 'nbd-server-start', arguments: { addr: { type: 'inet', data: { host: HOST, port: '10809' } } } }],
    ['destination', { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: '/tmp/elsewhere/nbd.sock' } } } }],
    ['destination', { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: `${RELAY_SOCK}/../../x.sock` } } } }],
    ['destination', { execute: 'nbd-server-start', arguments: { addr: { type: 'unix', data: { path: RELAY_SOCK, abstract: true } } } }],
    ['destination', { execute: 'quit' }],
    ['destination', { execute: 'human-monitor-command', arguments: { 'command-line': 'info status' } }],
    ['destination', { execute: 'cont', arguments: {}, control: 1 }],
    // multifd: a count, no more than 8 connections; none of the channel's other knobs.
    ['destination', { execute: 'migrate-set-parameters', arguments: { 'multifd-channels': 0 } }],
    ['destination', { execute: 'migrate-set-parameters', arguments: { 'multifd-channels': 64 } }],
    ['source', { execute: 'migrate-set-parameters', arguments: { 'multifd-compression': 'zstd' } }],
    ['source', { execute: 'migrate-set-capabilities', arguments: { capabilities: [{ capability: 'postcopy-ram', state: true }] } }],
  ] as const)('%s refuses %j', (role, msg) => {
    const v = new QmpPolicy(ctx(role)).judge(JSON.stringify(msg));
    expect(v.ok).toBe(false);
  });

  test('a duplicate key is read once and forwarded as what was checked', () => {
    const v = new QmpPolicy(ctx('source')).judge(`{"execute":"migrate","arguments":{"uri":"exec:x","uri":"tcp:${PEER}:20002"}}`);
    expect(v).toMatchObject({ ok: true });
    if (v.ok) expect(v.line).toBe(`{"execute":"migrate","arguments":{"uri":"tcp:${PEER}:20002"}}`);
  });

  test('peers: CIDRs, and loopback only for a loopback agent', () => {
    const m = peerMatcher({ peers: ['10.1.0.0/16', 'fd00::/8'], migrationHost: '10.1.0.5' });
    expect([m('10.1.200.3'), m('10.2.0.1'), m('fd12::1'), m('fe80::1'), m('127.0.0.1')]).toEqual([true, false, true, false, false]);
    const d = peerMatcher({ migrationHost: '10.1.0.5' });
    expect([d('10.7.0.1'), d('127.0.0.1'), d('::1'), d('localhost')]).toEqual([true, false, false, false]);
    expect(peerMatcher({ migrationHost: '127.0.0.1' })('127.0.0.1')).toBe(true);
  });
});

// ------------------------------------------------------------------ fuzz through the real tunnel

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const NASTY: unknown[] = [
  'exec:id > /tmp/ferry-fuzz-pwned', 'unix:/tmp/x.sock', 'fd:3', 'file:/etc/passwd', 'rdma:1.2.3.4:5', 'tcp:localhost:1', `tcp:${PEER}:0`, `tcp:127.0.0.1:20001`,
  '/etc/shadow', 'file', 'host_device', 'raw', 'qcow2', '0.0.0.0', '127.0.0.1', '::', PEER, HOST, '10809', '20001', '99999', '-1',
  'disk-root', 'file-root', 'disk-other', 'ferry-nbd-root', 'ferry-nbd-../x', 'ferry-mirror-root', 'ferry-stream-root', 'ferry-0a1b2c3d-root',
  'unix', 'inet', 'fd', 'vsock', 'write-blocking', 'pre-switchover', true, false, 0, -5, 1.5, 2 ** 60, null, {}, [], [{}], 'x'.repeat(300),
  { type: 'unix', path: '/tmp/x' }, { type: 'inet', host: '127.0.0.1', port: '1' }, { driver: 'file', filename: '/etc/shadow' },
];
const EXTRA_KEYS = ['filename', 'driver', 'file', 'tls-creds', 'backing', 'x-dirty-bitmap', 'blk', 'inc', 'resume', 'detach', 'channels', 'uri', 'fd', 'path', 'node-name', 'qom-type', 'props'];
const DANGEROUS = ['human-monitor-command', 'object-add', 'chardev-add', 'getfd', 'add-fd', 'device_add', 'blockdev-create', 'dump-guest-memory', 'screendump', 'migrate-pause', 'x-exit-preconfig', 'blockdev-reopen', 'drive-mirror', 'drive-backup', 'netdev_add', 'qom-set'];

function mutate(v: unknown, rnd: () => number, depth = 0): unknown {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  if (depth > 3 || rnd() < 0.25) return rnd() < 0.5 ? v : structuredClone(pick(NASTY));
  if (Array.isArray(v)) return v.map((x) => mutate(x, rnd, depth + 1));
  if (typeof v === 'object' && v !== null) {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) {
      const r = rnd();
      if (r < 0.08) continue; // drop a key
      out[k] = r < 0.5 ? x : mutate(x, rnd, depth + 1);
    }
    if (rnd() < 0.2) out[pick(EXTRA_KEYS)] = structuredClone(pick(NASTY));
    return out;
  }
  return rnd() < 0.5 ? v : structuredClone(pick(NASTY));
}

function randomMessage(role: TunnelRole, rnd: () => number, id: number): Record<string, unknown> {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const [execute, args] = pick(ENGINE[role]);
  const r = rnd();
  const command = r < 0.08 ? pick(DANGEROUS) : r < 0.12 ? pick(ENGINE[role === 'source' ? 'destination' : 'source'])[0] : execute;
  const msg: Record<string, unknown> = { execute: command, id };
  const a = rnd() < 0.15 ? structuredClone(pick(NASTY)) : rnd() < 0.2 ? args : mutate(args ?? {}, rnd);
  if (a !== undefined) msg.arguments = a;
  return msg;
}

/**
 * The oracle, written from the threat (not from the policy's schemas): what a forwarded line may
 * never contain. A violation names what leaked.
 */
function violations(role: TunnelRole, line: string): string[] {
  const out: string[] = [];
  const msg = JSON.parse(line) as { execute: string; arguments?: unknown };
  // QOM reads anything (a secret object's data among them): only the machine's type.
  if (msg.execute === 'qom-get' && JSON.stringify(msg.arguments) !== '{"path":"/machine","property":"type"}') return [`qom-get ${JSON.stringify(msg.arguments)}`];
  if (msg.execute === 'qom-get') return role === 'source' ? [] : ['qom-get on a destination'];
  // Reads, and steps that change nothing outside this VM's own migration, on either side.
  const harmless = ['query-version', 'query-qmp-schema', 'query-status', 'query-migrate', 'query-migrate-capabilities', 'query-migrate-parameters', 'query-named-block-nodes', 'query-block-jobs', 'query-jobs', 'query-block-exports', 'nbd-server-stop', 'migrate-set-parameters', 'migrate-set-capabilities', 'cont', 'block-job-cancel', 'job-dismiss', 'block-export-del'];
  const allowed = new Set(ENGINE[role].map(([c]) => c).concat(harmless, role === 'source' ? ['migrate_cancel', 'query-memory-size-summary'] : []));
  if (!allowed.has(msg.execute)) out.push(`command ${msg.execute}`);
  const walk = (v: unknown, key: string): void => {
    if (typeof v === 'string') {
      if (/^(exec|unix|fd|file|rdma|vsock):/.test(v)) out.push(`${key}=${v}`);
      if (key === 'uri' && !(role === 'source' ? new RegExp(`^tcp:${PEER}:\\d+$`) : new RegExp(`^tcp:${HOST}:200\\d\\d$`)).test(v)) out.push(`uri ${v}`);
      if (key === 'host' && v !== (role === 'source' && msg.execute === 'blockdev-add' ? PEER : HOST)) out.push(`host ${v}`);
      if (key === 'driver' && v !== 'nbd') out.push(`driver ${v}`);
      if (['device', 'node-name', 'target', 'job-id', 'id'].includes(key) && !/^(disk|ferry)-/.test(v)) out.push(`${key} ${v}`);
      // The one unix address: a destination's NBD server on its own run dir's relay socket.
      const relaySocket = role === 'destination' && msg.execute === 'nbd-server-start';
      // yank cuts connections: only the source's own NBD client nodes and its migration.
      const yank = role === 'source' && msg.execute === 'yank';
      if (key === 'type' && !['inet', 'nbd', 'mirror', ...(relaySocket ? ['unix'] : []), ...(yank ? ['block-node', 'migration'] : [])].includes(v)) out.push(`type ${v}`);
      if (msg.execute === 'yank' && key === 'node-name' && !/^ferry-nbd-(root|data)$/.test(v)) out.push(`yank of node ${v}`);
      if (key === 'path' && !(relaySocket && v === RELAY_SOCK)) out.push(`path ${v}`);
      if (key === 'port' && msg.execute === 'nbd-server-start' && !(Number(v) >= RANGE[0] && Number(v) <= RANGE[1])) out.push(`port ${v}`);
      return;
    }
    if (key === 'writable' && v === true && role === 'source') out.push('writable source export');
    if (Array.isArray(v)) v.forEach((x) => walk(x, key));
    else if (typeof v === 'object' && v !== null) {
      for (const [k, x] of Object.entries(v)) {
        if (['filename', 'file', 'backing', 'tls-creds', 'fd', ...(role === 'destination' && msg.execute === 'nbd-server-start' ? [] : ['path']), 'qom-type', 'props', 'channels', 'blk', 'inc', 'resume', 'detach'].includes(k)) out.push(`key ${k}`);
        walk(x, k);
      }
    }
  };
  walk(msg.arguments, '');
  return out;
}

describe('fuzz: random argument shapes through the real tunnel', () => {
  const seed = Number(process.env.FERRY_FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31));
  let dir: string;
  let wss: WebSocketServer;
  let fake: Server;
  const received: string[] = [];
  let role: TunnelRole = 'source';

  beforeAll(async () => {
    console.log(`qmp-policy fuzz seed ${seed} (replay: FERRY_FUZZ_SEED=${seed} npx vitest run test/unit/agent/qmp-policy.test.ts)`);
    dir = await mkdtemp(join(tmpdir(), 'ferry-fuzz-'));
    // The recording "QEMU": greets, records every line, answers each with an empty return.
    fake = createServer((s: Socket) => {
      s.write(`${JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: [] } })}\n`);
      let buf = '';
      s.on('data', (d: Buffer) => {
        buf += d.toString('utf8');
        for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          received.push(line);
          const id = (JSON.parse(line) as { id?: unknown }).id;
          s.write(`${JSON.stringify({ return: {}, id })}\n`);
        }
      });
    });
    await new Promise<void>((r) => fake.listen(join(dir, 'qmp.sock'), r));
    wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise((r) => wss.once('listening', r));
    wss.on('connection', (ws) => tunnelQmp(ws, join(dir, 'qmp.sock'), ctx(role), silentLogger));
  });

  afterAll(async () => {
    await new Promise((r) => wss.close(r));
    await new Promise((r) => fake.close(r));
    await rm(dir, { recursive: true, force: true });
  });

  test.each(['source', 'destination'] as const)('%s: 1,500 random messages, none outside the policy reaches QEMU', async (which) => {
    role = which;
    received.length = 0;
    const rnd = mulberry32(seed + (which === 'source' ? 0 : 1));
    const port = (wss.address() as { port: number }).port;
    const ws = new WebSocket(`ws://127.0.0.1:${port}`);
    const replies = new Map<number, Record<string, unknown>>();
    let greeted = false;
    let pending = '';
    ws.on('message', (d: Buffer) => {
      pending += d.toString('utf8');
      for (let i = pending.indexOf('\n'); i >= 0; i = pending.indexOf('\n')) {
        const m = JSON.parse(pending.slice(0, i)) as Record<string, unknown>;
        pending = pending.slice(i + 1);
        if ('QMP' in m) greeted = true;
        else if (typeof m.id === 'number') replies.set(m.id, m);
      }
    });
    await new Promise((r) => ws.once('open', r));
    const N = 1500;
    for (let id = 0; id < N; id++) ws.send(`${JSON.stringify(randomMessage(which, rnd, id))}\n`);
    const deadline = Date.now() + 20_000;
    while (replies.size < N && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    ws.close();
    expect(greeted).toBe(true);
    expect(replies.size, 'every message answered, by the tunnel or by QEMU').toBe(N);
    const leaks = received.flatMap((line) => violations(which, line).map((v) => `${v} in ${line}`));
    expect(leaks, `seed ${seed}`).toEqual([]);
    // Not vacuous: a fair share both passed and was refused.
    expect(received.length).toBeGreaterThan(N * 0.05);
    expect(received.length).toBeLessThan(N * 0.9);
  });
});

describe('data-path TLS in the policy', () => {
  const withTls = (required: boolean, active: boolean, role: TunnelRole = 'source'): QmpPolicy => new QmpPolicy({ ...ctx(role), dataTls: { required, active: () => active } });
  const add = (tls: boolean): string =>
    JSON.stringify({ execute: 'blockdev-add', arguments: { driver: 'nbd', 'node-name': 'ferry-nbd-root', server: { type: 'inet', host: PEER, port: '20001' }, export: 'ferry-0a1b2c3d-root', ...(tls ? { 'tls-creds': 'ferry-tls-client', 'tls-hostname': PEER } : {}) } });
  const serve = (tls: boolean): string => JSON.stringify({ execute: 'nbd-server-start', arguments: { addr: { type: 'inet', data: { host: HOST, port: '20010' } }, ...(tls ? { 'tls-creds': 'ferry-tls-server', 'tls-authz': 'ferry-tls-authz' } : {}) } });
  const migrate = JSON.stringify({ execute: 'migrate', arguments: { uri: `tcp:${PEER}:20002` } });

  test('required: nothing plain, and nothing before the agent set TLS up', () => {
    expect(withTls(true, false).judge(add(true))).toMatchObject({ ok: false, reason: expect.stringMatching(/before the agent made them/) });
    expect(withTls(true, true).judge(add(false))).toMatchObject({ ok: false, reason: expect.stringMatching(/requires TLS/) });
    expect(withTls(true, true).judge(add(true)).ok).toBe(true);
    expect(withTls(true, false).judge(migrate).ok).toBe(false);
    expect(withTls(true, true).judge(migrate).ok).toBe(true);
    expect(withTls(true, true, 'destination').judge(serve(false)).ok).toBe(false);
    expect(withTls(true, true, 'destination').judge(serve(true)).ok).toBe(true);
  });

  test('preferred/off: plain allowed, TLS only once set up; the stream parameters are never the caller\'s', () => {
    expect(withTls(false, false).judge(add(false)).ok).toBe(true);
    expect(withTls(false, false).judge(add(true)).ok).toBe(false);
    expect(withTls(false, true).judge(add(true)).ok).toBe(true);
    const half = JSON.stringify({ execute: 'nbd-server-start', arguments: { addr: { type: 'inet', data: { host: HOST, port: '20010' } }, 'tls-creds': 'ferry-tls-server' } });
    expect(withTls(false, true, 'destination').judge(half)).toMatchObject({ ok: false, reason: expect.stringMatching(/go together/) });
    for (const p of [{ 'tls-creds': '' }, { 'tls-authz': 'other' }, { 'tls-hostname': 'x' }]) {
      expect(withTls(true, true).judge(JSON.stringify({ execute: 'migrate-set-parameters', arguments: p })).ok).toBe(false);
    }
  });
});

describe('evacuation by delta in the policy (issue 12)', () => {
  const policy = new QmpPolicy(ctx('source'));
  const tx = (actions: unknown[]): string => JSON.stringify({ execute: 'transaction', arguments: { actions } });
  const add = (data: Record<string, unknown>) => ({ type: 'block-dirty-bitmap-add', data: { node: 'disk-data', name: 'ferry-delta-2', persistent: false, ...data } });
  const backup = (data: Record<string, unknown>) => ({
    type: 'blockdev-backup',
    data: { 'job-id': 'ferry-delta-data', device: 'disk-data', target: 'ferry-nbd-data', sync: 'bitmap', bitmap: 'ferry-replica-7', 'bitmap-mode': 'never', ...data },
  });
  test("the passes' transaction, bitmap removal and cancel pass", () => {
    expect(policy.judge(tx([add({}), backup({})])).ok).toBe(true);
    expect(policy.judge(JSON.stringify({ execute: 'block-dirty-bitmap-remove', arguments: { node: 'disk-data', name: 'ferry-delta-2' } })).ok).toBe(true);
    expect(policy.judge(JSON.stringify({ execute: 'block-job-cancel', arguments: { device: 'ferry-delta-data', force: true } })).ok).toBe(true);
  });
  test('anything else in a transaction is refused', () => {
    expect(policy.judge(tx([add({ persistent: true })])).ok).toBe(false);
    expect(policy.judge(tx([add({ name: 'backup0' })])).ok).toBe(false);
    expect(policy.judge(tx([backup({ target: 'disk-root' })])).ok).toBe(false);
    expect(policy.judge(tx([backup({ sync: 'full' })])).ok).toBe(false);
    expect(policy.judge(tx([backup({ 'bitmap-mode': 'always' })])).ok).toBe(false);
    expect(policy.judge(tx([{ type: 'blockdev-snapshot-sync', data: { device: 'disk-data', 'snapshot-file': '/etc/x' } }])).ok).toBe(false);
    expect(policy.judge(tx([])).ok).toBe(false);
    // The replica's own bitmap is the source agent's (vm.replica*): never removed through the tunnel.
    expect(policy.judge(JSON.stringify({ execute: 'block-dirty-bitmap-remove', arguments: { node: 'disk-data', name: 'ferry-replica-7' } })).ok).toBe(false);
  });
});
