/** ferry-agent on loopback: refusals, and a real migration into an agent's storage root. */
import { mkdir, readdir, readFile, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { WebSocket } from 'ws';
import { AgentCallError, AgentClient, AgentDestination, AgentSource } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { loadGuestImage } from '../../src/guest/image.js';
import { highestAcks, workloadAppend } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { QmpCommandError } from '../../src/qmp/index.js';
import { bootWorkloadGuest, cleanupAll, makeDisk, makeTempDir } from '../helpers/guest.js';

const TOKEN_A = 'token-of-alice-0123456789';
const TOKEN_B = 'token-of-bob-0123456789ab';
let agent: RunningAgent;
let root: string;
const started: number[] = [];

beforeEach(async () => {
  root = await makeTempDir('ferry-agent-root-');
  agent = await startAgent({ name: 'hostB', listenPort: 0, storageRoot: root, tokens: { [TOKEN_A]: 'alice', [TOKEN_B]: 'bob' } });
});

afterEach(async () => {
  await agent.close();
  // VMs the agent released outlive it by design; in a test, nothing may.
  for (const pid of started.splice(0)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  await cleanupAll();
});

/** Sends one raw frame on an authenticated session and returns the first reply or the close code. */
async function raw(frame: string | Buffer): Promise<{ reply?: Record<string, unknown>; closeCode?: number }> {
  const ws = new WebSocket(`${agent.url}/v1`, { headers: { authorization: `Bearer ${TOKEN_A}` } });
  await new Promise((r) => ws.once('open', r));
  return new Promise((resolve) => {
    ws.once('message', (d: Buffer) => {
      resolve({ reply: JSON.parse(d.toString()) as Record<string, unknown> });
      ws.close();
    });
    ws.once('close', (code) => resolve({ closeCode: code }));
    ws.send(frame);
  });
}

describe('ferry-agent refuses', () => {
  test('a missing or wrong token, at the upgrade', async () => {
    await expect(AgentClient.connect(agent.url, 'wrong-token-0123456789')).rejects.toThrow(/HTTP 401/);
    const ws = new WebSocket(`${agent.url}/v1`);
    const status = await new Promise<number>((r) => ws.once('unexpected-response', (_q, res) => r(res.statusCode ?? 0)));
    expect(status).toBe(401);
  });

  test('malformed, unknown, extra-field and oversized messages', async () => {
    expect((await raw('{not json')).reply).toMatchObject({ ok: false, error: { code: 'BAD_MESSAGE' } });
    expect((await raw(JSON.stringify({ v: 1, id: 1, method: 'vm.explode', params: {} }))).reply).toMatchObject({
      ok: false,
      id: 1,
      error: { code: 'UNKNOWN_METHOD', message: "unknown method 'vm.explode'" },
    });
    expect((await raw(JSON.stringify({ v: 1, id: 2, method: 'vm.list', params: {}, sneaky: true }))).reply).toMatchObject({ ok: false, error: { code: 'BAD_MESSAGE' } });
    expect((await raw(JSON.stringify({ v: 2, id: 3, method: 'vm.list' }))).reply).toMatchObject({ ok: false, error: { code: 'BAD_MESSAGE' } });
    expect((await raw(JSON.stringify({ v: 1, id: 4, method: 'vm.list', params: { all: true } }))).reply).toMatchObject({ ok: false, error: { code: 'BAD_PARAMS' } });
    expect((await raw(Buffer.alloc(2 * 1024 * 1024, 0x20).toString())).closeCode).toBe(1009);
  });

  test('disk paths that escape the storage root', async () => {
    const c = await AgentClient.connect(agent.url, TOKEN_A);
    await mkdir(join(root, 'vm'));
    await symlink('/etc', join(root, 'vm', 'out'));
    for (const path of ['/var/tmp/x.raw', join(root, '..', 'x.raw'), join(root, 'vm', 'out', 'x.raw')]) {
      const err = await c.call('dest.createDisk', { path, format: 'raw', virtualSize: 1 << 20 }).catch((e: unknown) => e);
      expect(err, path).toBeInstanceOf(AgentCallError);
      expect(err).toMatchObject({ code: 'PATH_REFUSED' });
      expect((err as Error).message).toMatch(/outside the allowed roots/);
    }
    await c.call('dest.createDisk', { path: join(root, 'vm', 'ok.raw'), format: 'raw', virtualSize: 1 << 20 });
    c.close();
  });

  test("QMP outside the allowlist, and another principal's VM", async () => {
    const image = await loadGuestImage();
    const alice = await AgentClient.connect(agent.url, TOKEN_A);
    const bob = await AgentClient.connect(agent.url, TOKEN_B);
    const disk = join(root, 'v', 'd0.raw');
    await alice.call('dest.createDisk', { path: disk, format: 'raw', virtualSize: 1 << 20 });
    const spec = { name: 'v', memoryMiB: 64, disks: [{ id: 'd0', path: disk, format: 'raw' }], boot: { kernel: image.kernel, initrd: image.initrd }, runDir: join(root, 'v', 'run') };
    const { vmId, pid } = (await alice.call('dest.start', { spec })) as { vmId: string; pid: number };
    started.push(pid);
    const qmp = await alice.openQmp(vmId);
    expect((await qmp.execute('query-status')).status).toBe('inmigrate');
    for (const cmd of ['human-monitor-command', 'quit', 'device_add']) {
      const err = await qmp.executeRaw(cmd, cmd === 'human-monitor-command' ? { 'command-line': 'info status' } : {}).catch((e: unknown) => e);
      expect(err, cmd).toBeInstanceOf(QmpCommandError);
      expect((err as Error).message).toMatch(new RegExp(`does not allow '${cmd}'`));
    }
    expect((await qmp.execute('query-status')).status).toBe('inmigrate');
    await expect(bob.call('dest.kill', { vmId })).rejects.toMatchObject({ code: 'VM_NOT_FOUND' });
    await expect(bob.openQmp(vmId)).rejects.toThrow(/HTTP 404/);
    expect(await bob.call('vm.list')).toEqual([]);
    expect(await alice.call('vm.list')).toEqual([{ vmId, name: 'v', role: 'incoming', pid, running: true }]);
    await qmp.close();
    await alice.call('dest.kill', { vmId });
    alice.close();
    bob.close();
  });
});

test('a writing guest migrates from a local source into an agent: no acknowledged write lost', async () => {
  const { vm, spec } = await bootWorkloadGuest({
    disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 8 }],
    workload: { write: { rate: 50 }, tickMs: 50 },
  });
  await vm.serial.waitForLine((l) => /^ack data \d{2,}$/.test(l.text), { timeoutMs: 30_000, what: 'acks' });
  const dest = await AgentDestination.connect(agent.url, TOKEN_A);
  const result = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }), destination: dest });
  expect(result.plan.destination).toBe('hostB (agent)');
  await vm.exited;
  const client = await AgentClient.connect(agent.url, TOKEN_A);
  const [listed] = (await client.call('vm.list')) as { vmId: string; pid: number; running: boolean }[];
  expect(listed).toMatchObject({ vmId: dest.vmId, running: true });
  started.push(listed!.pid);
  const qmp = await client.openQmp(dest.vmId!);
  expect((await qmp.execute('query-status')).status).toBe('running');
  await qmp.close();
  await client.call('dest.kill', { vmId: dest.vmId! });
  const acked = highestAcks(vm.serial.history()).get('data')!;
  const report = await verifyDisk(join(root, spec.name, 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: acked });
  expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  client.close();
  dest.close();
  expect(await readdir(root)).toEqual([spec.name]);
});

test('two agents: a writing guest that agent A runs moves to agent B, no acknowledged write lost', async () => {
  const rootA = await makeTempDir('ferry-agent-a-');
  const agentA = await startAgent({ name: 'hostA', listenPort: 0, storageRoot: rootA, tokens: { [TOKEN_A]: 'alice' } });
  try {
    const image = await loadGuestImage();
    const dir = join(rootA, 'web1');
    await mkdir(dir);
    await makeDisk(join(dir, 'data.qcow2'), { id: 'data', format: 'qcow2', size: 64 << 20 });
    const a = await AgentClient.connect(agentA.url, TOKEN_A);
    const { pid } = (await a.call('vm.start', {
      spec: {
        name: 'web1',
        memoryMiB: 256,
        disks: [{ id: 'data', path: join(dir, 'data.qcow2'), format: 'qcow2' }],
        boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend({ write: { rate: 50 }, tickMs: 50, disks: 1 })}` },
        runDir: join(dir, 'run'),
      },
    })) as { pid: number };
    started.push(pid);
    const serialLog = join(dir, 'run', 'serial.log');
    const acksInLog = async (): Promise<number> => highestAcks((await readFile(serialLog, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
    for (let i = 0; i < 300 && (await acksInLog()) < 20; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await acksInLog()).toBeGreaterThanOrEqual(20);

    const source = await AgentSource.connect(agentA.url, TOKEN_A, 'web1');
    const destination = await AgentDestination.connect(agent.url, TOKEN_A);
    const result = await migrate({ spec: source.spec, source, destination });
    expect(result.plan).toMatchObject({ source: 'hostA (agent)', destination: 'hostB (agent)' });
    expect(result.diskBytes).toBeGreaterThan(0);
    expect(() => process.kill(pid, 0)).toThrow(); // the source QEMU is gone
    const b = await AgentClient.connect(agent.url, TOKEN_A);
    const [moved] = (await b.call('vm.list')) as { vmId: string; pid: number; running: boolean }[];
    started.push(moved!.pid);
    const qmp = await b.openQmp(moved!.vmId);
    expect((await qmp.execute('query-status')).status).toBe('running');
    await qmp.close();
    await b.call('dest.kill', { vmId: moved!.vmId });
    const report = await verifyDisk(join(root, 'web1', 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: await acksInLog() });
    expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
    for (const c of [a, b, source, destination]) c.close();
  } finally {
    await agentA.close();
  }
});
