/** ferry-agent on loopback: refusals, and a real migration into an agent's storage root. */
import { mkdir, readdir, readFile, stat, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { WebSocket } from 'ws';
import { AgentCallError, AgentClient, AgentDestination, AgentSource } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { IMAGE_DIR, loadGuestImage } from '../../src/guest/image.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { QmpCommandError } from '../../src/qmp/index.js';
import { agentGuestSpec, bootWorkloadGuest, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';

const TOKEN_A = 'token-of-alice-0123456789';
const TOKEN_B = 'token-of-bob-0123456789ab';
let agent: RunningAgent;
let root: string;
const started: number[] = [];

beforeEach(async () => {
  root = await makeTempDir('ferry-agent-root-');
  agent = await startAgent({ name: 'hostB', listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [TOKEN_A]: 'alice', [TOKEN_B]: 'bob' } });
});

afterEach(async () => {
  await agent.close();
  // VMs the agent released outlive it by design; in a test, nothing may.
  killPids(started);
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
    expect((await raw(JSON.stringify({ v: 1, id: 4, method: 'vm.list', params: { bogus: true } }))).reply).toMatchObject({ ok: false, error: { code: 'BAD_PARAMS' } });
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
      expect((err as Error).message).toMatch(/outside the allowed roots|goes through a symbolic link/);
    }
    await c.call('dest.createDisk', { path: join(root, 'vm', 'ok.raw'), format: 'raw', virtualSize: 1 << 20 });
    c.close();
  });

  test('a spec error keeps its own code across the wire, also when no path is involved', async () => {
    const c = await AgentClient.connect(agent.url, TOKEN_A);
    const spec = { name: 'tiny', memoryMiB: 1, disks: [{ id: 'd0', path: join(root, 'tiny', 'd0.raw'), format: 'raw' }], boot: { disk: 'd0' }, runDir: join(root, 'tiny', 'run') };
    for (const method of ['vm.create', 'dest.check', 'dest.start'] as const) {
      const err = await c.call(method, { spec }).catch((e: unknown) => e);
      expect(err, method).toBeInstanceOf(AgentCallError);
      expect(err, method).toMatchObject({ code: 'SPEC_INVALID', message: expect.stringMatching(/memoryMiB: must be at least 16 MiB/) });
    }
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
    expect(await alice.call('vm.list')).toEqual([{ vmId, name: 'v', role: 'incoming', state: 'running', pid, running: true, memoryMiB: expect.any(Number), diskBytes: expect.any(Number) }]);
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
  expect((await readdir(root)).sort()).toEqual(['.ferry-agent', spec.name]);
});

test('two agents: a writing guest that agent A runs moves to agent B, no acknowledged write lost', async () => {
  const rootA = await makeTempDir('ferry-agent-a-');
  const agentA = await startAgent({ name: 'hostA', listenPort: 0, storageRoot: rootA, bootRoots: [IMAGE_DIR], tokens: { [TOKEN_A]: 'alice' } });
  try {
    const dir = join(rootA, 'web1');
    const { spec } = await agentGuestSpec(rootA, 'web1');
    const a = await AgentClient.connect(agentA.url, TOKEN_A);
    await a.call('vm.create', { spec });
    const { pid } = (await a.call('vm.start', { name: 'web1' })) as { pid: number };
    started.push(pid);
    const serialLog = join(dir, 'run', 'serial.log');
    const acksInLog = async (): Promise<number> => highestAcks((await readFile(serialLog, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
    for (let i = 0; i < 300 && (await acksInLog()) < 20; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await acksInLog()).toBeGreaterThanOrEqual(20);

    const source = await AgentSource.connect(agentA.url, TOKEN_A, 'web1');
    const destination = await AgentDestination.connect(agent.url, TOKEN_A);
    let acked = -1;
    const result = await migrate({
      spec: source.spec,
      source,
      destination,
      // The source's serial log goes with its run dir when it retires: read the acks at switchover.
      onEvent: (e) => {
        if (e.event === 'point-of-no-return') void acksInLog().then((n) => (acked = Math.max(acked, n)));
      },
    });
    acked = Math.max(acked, await acksInLog().catch(() => -1));
    expect(acked).toBeGreaterThanOrEqual(20);
    expect(result.plan).toMatchObject({ source: 'hostA (agent)', destination: 'hostB (agent)' });
    expect(result.diskBytes).toBeGreaterThan(0);
    expect(() => process.kill(pid, 0)).toThrow(); // the source QEMU is gone
    // A's serial log went with its run dir: keep the acks read just before.
    expect(await a.call('vm.list')).toEqual([]);
    await expect(stat(join(dir, 'data.qcow2'))).rejects.toMatchObject({ code: 'ENOENT' }); // stale source disk removed
    const b = await AgentClient.connect(agent.url, TOKEN_A);
    const [moved] = (await b.call('vm.list')) as { vmId: string; pid: number; running: boolean }[];
    expect(moved).toMatchObject({ name: 'web1', role: 'vm', state: 'running' });
    started.push(moved!.pid);
    const qmp = await b.openQmp(moved!.vmId);
    expect((await qmp.execute('query-status')).status).toBe('running');
    await qmp.close();
    // The guest goes on writing on B (given time on a loaded machine): its acks there count too.
    const runB = (await readdir(join(root, 'web1'))).find((f) => f.startsWith('run-'))!;
    const ackedOnB = async (): Promise<number> => highestAcks((await readFile(join(root, 'web1', runB, 'serial.log'), 'utf8')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
    for (let i = 0; i < 100 && (await ackedOnB()) <= acked; i++) await new Promise((r) => setTimeout(r, 100));
    await b.call('vm.stop', { name: 'web1' });
    const fromB = await ackedOnB();
    expect(fromB).toBeGreaterThan(acked);
    acked = fromB;
    const report = await verifyDisk(join(root, 'web1', 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: acked });
    expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
    for (const c of [a, b, source, destination]) c.close();
  } finally {
    await agentA.close();
  }
});

describe('an agent restart', () => {
  /** A VM created and started on `agent`, booted to userland. */
  async function startedVm(client: AgentClient, name: string): Promise<{ vmId: string; pid: number }> {
    const image = await loadGuestImage();
    const disk = join(root, name, 'd0.raw');
    await client.call('dest.createDisk', { path: disk, format: 'raw', virtualSize: 8 << 20 });
    await client.call('vm.create', {
      spec: { name, memoryMiB: 128, disks: [{ id: 'd0', path: disk, format: 'raw' }], boot: { kernel: image.kernel, initrd: image.initrd }, runDir: join(root, name, 'run') },
    });
    const r = (await client.call('vm.start', { name })) as { vmId: string; pid: number };
    started.push(r.pid);
    return r;
  }

  test('re-attaches to a VM that kept running, and the VM is still under its control', async () => {
    let c = await AgentClient.connect(agent.url, TOKEN_A);
    const { vmId, pid } = await startedVm(c, 'keeper');
    c.close();
    await agent.close();
    agent = await startAgent({ name: 'hostB', listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [TOKEN_A]: 'alice' } });
    c = await AgentClient.connect(agent.url, TOKEN_A);
    expect(await c.call('vm.list')).toEqual([{ vmId, name: 'keeper', role: 'vm', state: 'running', pid, running: true, memoryMiB: expect.any(Number), diskBytes: expect.any(Number) }]);
    const events: string[] = [];
    await c.onEvent((e) => events.push(e.type === 'vm.qmp' ? e.event : `${e.type}:${e.type === 'vm.state' ? e.vm.state : ''}`));
    // stop goes through the monitor the new agent re-attached to.
    expect(await c.call('vm.stop', { name: 'keeper', timeoutMs: 10_000 })).toMatchObject({ state: 'stopped', running: false });
    expect(() => process.kill(pid, 0)).toThrow();
    expect(events).toContain('vm.state:stopped');
    expect(events).toContain('SHUTDOWN');
    // Started again, it is the same VM with a new process.
    const again = (await c.call('vm.start', { name: 'keeper' })) as { vmId: string; pid: number };
    started.push(again.pid);
    expect(again.vmId).toBe(vmId);
    c.close();
  });

  test('reports a VM that died while the agent was down', async () => {
    let c = await AgentClient.connect(agent.url, TOKEN_A);
    const { vmId, pid } = await startedVm(c, 'goner');
    c.close();
    await agent.close();
    process.kill(pid, 'SIGKILL');
    for (let i = 0; i < 100; i++) {
      try {
        process.kill(pid, 0);
        await new Promise((r) => setTimeout(r, 50));
      } catch {
        break;
      }
    }
    agent = await startAgent({ name: 'hostB', listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [TOKEN_A]: 'alice' } });
    c = await AgentClient.connect(agent.url, TOKEN_A);
    expect(await c.call('vm.list')).toEqual([{ vmId, name: 'goner', role: 'vm', state: 'died', pid: null, running: false, memoryMiB: expect.any(Number), diskBytes: expect.any(Number) }]);
    c.close();
  });

  test('refuses to retire a VM that has not migrated, and leaves its disks alone', async () => {
    const c = await AgentClient.connect(agent.url, TOKEN_A);
    const { vmId } = await startedVm(c, 'stay');
    await expect(c.call('vm.retire', { vmId, timeoutMs: 5_000, removeDisks: true })).rejects.toMatchObject({ code: 'NOT_MIGRATED', message: expect.stringMatching(/is running, not postmigrate/) });
    expect(await c.call('vm.get', { name: 'stay' })).toMatchObject({ state: 'running' });
    await expect(stat(join(root, 'stay', 'd0.raw'))).resolves.toBeTruthy();
    await expect(c.call('vm.delete', { name: 'stay', removeDisks: true })).rejects.toMatchObject({ code: 'VM_RUNNING' });
    await c.call('vm.stop', { name: 'stay' });
    await c.call('vm.delete', { name: 'stay', removeDisks: true });
    await expect(stat(join(root, 'stay', 'd0.raw'))).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await c.call('vm.list')).toEqual([]);
    c.close();
  });
});

describe('ferry-agent limits', () => {
  test("a spec that points into the agent's own state is refused", async () => {
    const c = await AgentClient.connect(agent.url, TOKEN_A);
    const err = await c.call('dest.createDisk', { path: join(root, '.ferry-agent', 'vms', 'x.json'), format: 'raw', virtualSize: 1 << 20 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'PATH_REFUSED', message: expect.stringMatching(/inside the agent's state directory/) });
    c.close();
  });

  test('requests over the rate limit are refused, sessions over the limit too', async () => {
    const limited = await startAgent({
      name: 'slow',
      listenPort: 0,
      storageRoot: await makeTempDir('ferry-agent-limits-'), bootRoots: [IMAGE_DIR],
      tokens: { [TOKEN_A]: 'alice' },
      limits: { requestsPerSecond: 1, burst: 3, sessionsPerPrincipal: 2 },
    });
    try {
      const c = await AgentClient.connect(limited.url, TOKEN_A);
      const results = await Promise.allSettled([1, 2, 3, 4, 5].map(() => c.call('vm.list')));
      expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(3);
      const refused = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
      expect(refused).toHaveLength(2);
      expect(refused[0]!.reason).toMatchObject({ code: 'RATE_LIMITED' });
      const second = await AgentClient.connect(limited.url, TOKEN_A);
      await expect(AgentClient.connect(limited.url, TOKEN_A)).rejects.toThrow(/HTTP 429/);
      c.close();
      second.close();
    } finally {
      await limited.close();
    }
  });
});

test('two agents, lazy mode: the destination agent runs the guest at once and hydrates it from the source agent', async () => {
  const rootA = await makeTempDir('ferry-agent-lazy-a-');
  const agentA = await startAgent({ name: 'hostA', listenPort: 0, storageRoot: rootA, bootRoots: [IMAGE_DIR], tokens: { [TOKEN_A]: 'alice' }, portRange: [31000, 31999] });
  try {
    const { spec, serialLog } = await agentGuestSpec(rootA, 'web2', { diskMiB: 256, fillMiB: 16 });
    const a = await AgentClient.connect(agentA.url, TOKEN_A);
    await a.call('vm.create', { spec });
    started.push(((await a.call('vm.start', { name: 'web2' })) as { pid: number }).pid);
    const acksOnA = async (): Promise<number> => highestAcks((await readFile(serialLog, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
    for (let i = 0; i < 300 && (await acksOnA()) < 10; i++) await new Promise((r) => setTimeout(r, 100));
    let acked = -1;
    const source = await AgentSource.connect(agentA.url, TOKEN_A, 'web2');
    const destination = await AgentDestination.connect(agent.url, TOKEN_A);
    const result = await migrate({
      spec: source.spec,
      source,
      destination,
      options: { mode: 'lazy' },
      onEvent: (e) => {
        if (e.event === 'point-of-no-return') void acksOnA().then((n) => (acked = Math.max(acked, n)));
      },
    });
    expect(result.lazy!.hydratedWireBytes).toBeGreaterThan(8 << 20); // measured by agent A, through its API
    expect(await a.call('vm.list')).toEqual([]);
    const b = await AgentClient.connect(agent.url, TOKEN_A);
    const [moved] = (await b.call('vm.list')) as { pid: number; name: string }[];
    expect(moved).toMatchObject({ name: 'web2', role: 'vm', state: 'running' });
    started.push(moved!.pid);
    await b.call('vm.stop', { name: 'web2' });
    const report = await verifyDisk(join(root, 'web2', 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: acked });
    expect(acked).toBeGreaterThanOrEqual(10);
    expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
    for (const c of [a, b, source, destination]) c.close();
  } finally {
    await agentA.close();
  }
}, 90_000);
