/**
 * Standby replicas through the scheduler and real agents on loopback (issue 12): protect,
 * `protect status`, recover refused while the source runs, both agents restarted while protection
 * runs (replication resumes incrementally, the replica daemon re-attached), then kill -9 of the
 * source QEMU and recover from the replica on the standby, its RPO in the record. Then a migration
 * onto the standby by delta, a drain that prefers each protected VM's standby, and a protected VM
 * moved elsewhere (its protection follows it) and then fully onto its standby (protection ends).
 *
 * Host C is given more memory than B in the scheduler's config, so the usual placement (most
 * memory left) would pick C: a drain that sends a VM to B did so because B is its standby.
 */
import { execFile } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { AgentClient, AgentDestination, AgentSource } from '../../src/agent/client.js';
import { migrate } from '../../src/engine/migrate.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { SchedulerClient } from '../../src/scheduler/client.js';
import { startSchedulerService, type RunningScheduler } from '../../src/scheduler/service.js';
import { agentLeftoverPids } from '../helpers/agent-leftovers.js';
import { agentGuestSpec, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';

const run = promisify(execFile);
const AGENT_TOKEN = 'agent-token-for-the-scheduler-0123';
const API_TOKEN = 'operator-token-0123456789abcdef';
const agents: Record<string, RunningAgent> = {};
const roots: Record<string, string> = {};
const pids: number[] = [];
/** (wall clock, highest ack) samples of the guest's serial log on A. */
const acks: { at: number; seq: number }[] = [];
let poll: NodeJS.Timeout | undefined;
let svc: RunningScheduler | undefined;
let api: SchedulerClient | undefined;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const agentConfig = (h: string) => ({
  name: h,
  listenPort: 0,
  storageRoot: roots[h]!,
  bootRoots: [IMAGE_DIR],
  tokens: { [AGENT_TOKEN]: 'scheduler' },
  portRange: [24000 + 1000 * (h.charCodeAt(0) - 65), 24999 + 1000 * (h.charCodeAt(0) - 65)],
});

beforeAll(async () => {
  for (const h of ['A', 'B', 'C']) {
    roots[h] = await makeTempDir(`ferry-standby-${h}-`);
    agents[h] = await startAgent(agentConfig(h));
  }
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  const { spec, serialLog } = await agentGuestSpec(roots.A!, 'vm1', { memoryMiB: 128, diskMiB: 32, rate: 30, tickMs: 100 });
  await a.call('vm.create', { spec });
  pids.push(((await a.call('vm.start', { name: 'vm1' })) as { pid: number }).pid);
  a.close();
  poll = setInterval(() => {
    const at = Date.now();
    void readFile(serialLog, 'utf8').then(
      (t) => acks.push({ at, seq: highestAcks(t.split('\n').map((text) => ({ text }))).get('data') ?? -1 }),
      () => undefined,
    );
  }, 100);
  for (let i = 0; i < 300 && (acks.at(-1)?.seq ?? -1) < 5; i++) await sleep(100);
}, 90_000);

afterAll(async () => {
  clearInterval(poll);
  api?.close();
  await svc?.close();
  for (const a of Object.values(agents)) await a.close();
  pids.push(...(await agentLeftoverPids(Object.values(roots))));
  killPids(pids);
  await cleanupAll();
}, 60_000);

async function status() {
  const rows = await api!.call('protect-status', {});
  return rows.find((r) => r.vm === 'vm1')!;
}

async function waitSyncs(n: number, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await status();
    if (s.syncs >= n) return s;
    if (Date.now() > deadline) throw new Error(`waited ${timeoutMs} ms for ${n} syncs; last status ${JSON.stringify(s)}`);
    await sleep(200);
  }
}

let dbPath = '';
async function startScheduler(db: string): Promise<void> {
  dbPath = db;
  const memoryMiB: Record<string, number> = { A: 8192, B: 4096, C: 8192 };
  svc = await startSchedulerService({ listenPort: 0, database: db, hosts: ['A', 'B', 'C'].map((h) => ({ name: h, url: agents[h]!.url, memoryMiB: memoryMiB[h]! })), agentToken: AGENT_TOKEN, tokens: { [API_TOKEN]: 'operator' } });
  api = await SchedulerClient.connect(svc.url, API_TOKEN);
}

test('protect through the scheduler; recover refused while the source runs; both agents restarted: replication resumes incrementally; kill -9 of the source, recover from the replica', async () => {
  const db = join(await makeTempDir('ferry-standby-db-'), 'state.db');
  await startScheduler(db);
  // Bad input: one clear refusal, nothing made.
  await expect(api!.call('protect', { vm: 'vm1', standby: 'A', intervalMs: 1000 })).rejects.toMatchObject({ code: 'STANDBY_IS_SOURCE' });
  await expect(api!.call('protect', { vm: 'nope', standby: 'B', intervalMs: 1000 })).rejects.toMatchObject({ code: 'VM_NOT_FOUND' });
  const row = await api!.call('protect', { vm: 'vm1', standby: 'B', intervalMs: 1000 });
  expect(row).toMatchObject({ vm: 'vm1', source: 'A', standby: 'B' });
  const first = await waitSyncs(2);
  expect(first.consistentAt).not.toBeNull();
  // These agents have no data-path certificates.
  expect(first.dataPath).toMatch(/^plain: /);
  expect(first.lastBytes!).toBeLessThan(8 << 20);

  // Test 5 through the scheduler: the source runs the guest.
  await expect(api!.call('recover', { vm: 'vm1', sourceFenced: false })).rejects.toMatchObject({ code: 'SOURCE_RUNNING' });
  expect((await status()).state).not.toBe('stopped');

  // Test 4: both agents and the scheduler restart while protection runs.
  const replicaDir = join(roots.B!, 'replicas', (await readdir(join(roots.B!, 'replicas')))[0]!);
  const daemonPid = (JSON.parse(await readFile(join(replicaDir, 'manifest.json'), 'utf8')) as { daemon: { pid: number } }).daemon.pid;
  api!.close();
  await svc!.close();
  for (const h of ['A', 'B']) await agents[h]!.close();
  for (const h of ['A', 'B']) agents[h] = await startAgent(agentConfig(h));
  await startScheduler(db);
  const resumed = await waitSyncs(1);
  // Incremental: a full resync would send the whole allocated disk again.
  expect(resumed.lastBytes!).toBeLessThan(8 << 20);
  expect((JSON.parse(await readFile(join(replicaDir, 'manifest.json'), 'utf8')) as { daemon: { pid: number } }).daemon.pid).toBe(daemonPid);

  // Test 1 through the scheduler: kill -9 of the source QEMU, recover on B.
  const s = await waitSyncs(4);
  const pointAt = s.consistentAt!;
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  const vm = (await a.call('vm.get', { name: 'vm1' })) as { pid: number };
  process.kill(vm.pid, 'SIGKILL');
  for (let i = 0; i < 100; i++) {
    const got = (await a.call('vm.get', { name: 'vm1' })) as { state: string };
    if (got.state === 'died') break;
    await sleep(100);
  }
  a.close();
  await sleep(300);
  const rec = await api!.call('recover', { vm: 'vm1', sourceFenced: false });
  expect(rec.state).toBe('succeeded');
  expect(rec.rpoMs!).toBeGreaterThanOrEqual(0);
  expect(rec.rpoMs!).toBeLessThan(60_000);
  expect(rec.pointAt!).toBeGreaterThanOrEqual(pointAt);
  const mustHave = Math.max(-1, ...acks.filter((x) => x.at < rec.pointAt! - 100).map((x) => x.seq));
  const b = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
  const onB = (await b.call('vm.get', { name: 'vm1' })) as { state: string; pid: number; spec: { disks: { path: string }[] } };
  expect(onB.state).toBe('running');
  pids.push(onB.pid);
  await b.call('vm.stop', { name: 'vm1', timeoutMs: 10_000 });
  b.close();
  const flat = join(await makeTempDir('ferry-standby-flat-'), 'data.raw');
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', onB.spec.disks[0]!.path, flat]);
  const report = await verifyDisk(flat, { format: 'raw', diskId: 'data', ackedSeq: mustHave });
  expect(report.ok, JSON.stringify(report)).toBe(true);
  expect((await api!.call('protect-status', {})).length).toBe(0);
}, 240_000);

test('ferry migrate onto the standby goes by delta: every acknowledged write arrives, protection ends', async () => {
  if (!api) await startScheduler(join(await makeTempDir('ferry-standby-db-'), 'state.db'));
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  const { spec, serialLog } = await agentGuestSpec(roots.A!, 'vm2', { memoryMiB: 128, diskMiB: 32, rate: 30, tickMs: 100 });
  await a.call('vm.create', { spec });
  pids.push(((await a.call('vm.start', { name: 'vm2' })) as { pid: number }).pid);
  a.close();
  let ackedOnA = -1;
  const tail = setInterval(() => void readFile(serialLog, 'utf8').then((t) => (ackedOnA = Math.max(ackedOnA, highestAcks(t.split('\n').map((text) => ({ text }))).get('data') ?? -1)), () => undefined), 100);
  try {
    for (let i = 0; i < 300 && ackedOnA < 5; i++) await sleep(100);
    await api!.call('protect', { vm: 'vm2', standby: 'B', intervalMs: 1000 });
    for (let i = 0; i < 300; i++) {
      const s = (await api!.call('protect-status', {})).find((r) => r.vm === 'vm2');
      if (s && s.syncs >= 2) break;
      await sleep(200);
    }
    const r = await api!.call('migrate', { vm: 'vm2', to: 'B' });
    let job = r.job;
    for (let i = 0; i < 600 && (job.state === 'queued' || job.state === 'running'); i++) {
      await sleep(200);
      job = await api!.call('get', { id: job.id });
    }
    expect(job.state, job.error ?? '').toBe('succeeded');
    expect((await api!.call('protect-status', {})).some((x) => x.vm === 'vm2')).toBe(false);
    const b = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
    const onB = (await b.call('vm.get', { name: 'vm2' })) as { state: string; pid: number; spec: { disks: { path: string }[]; runDir: string } };
    expect(onB.state).toBe('running');
    pids.push(onB.pid);
    await sleep(500);
    await b.call('vm.stop', { name: 'vm2', timeoutMs: 10_000 });
    b.close();
    // By delta: the disk on B is an overlay on the replica's chain, not a full copy.
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', onB.spec.disks[0]!.path])).stdout) as { 'backing-filename'?: string };
    expect(info['backing-filename']).toContain(join(roots.B!, 'replicas'));
    const onBLog = await readFile(join(onB.spec.runDir, 'serial.log'), 'utf8').catch(() => '');
    const acked = Math.max(ackedOnA, highestAcks(onBLog.split('\n').map((text) => ({ text }))).get('data') ?? -1);
    const flat = join(await makeTempDir('ferry-standby-flat-'), 'data.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', onB.spec.disks[0]!.path, flat]);
    const report = await verifyDisk(flat, { format: 'raw', diskId: 'data', ackedSeq: acked });
    expect(report.ok, JSON.stringify(report)).toBe(true);
  } finally {
    clearInterval(tail);
  }
}, 240_000);

async function startGuest(name: string): Promise<{ acked: () => number; stop: () => void }> {
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  const { spec, serialLog } = await agentGuestSpec(roots.A!, name, { memoryMiB: 128, diskMiB: 32, rate: 30, tickMs: 100 });
  await a.call('vm.create', { spec });
  pids.push(((await a.call('vm.start', { name })) as { pid: number }).pid);
  a.close();
  let acked = -1;
  const tail = setInterval(() => void readFile(serialLog, 'utf8').then((t) => (acked = Math.max(acked, highestAcks(t.split('\n').map((text) => ({ text }))).get('data') ?? -1)), () => undefined), 100);
  for (let i = 0; i < 300 && acked < 5; i++) await sleep(100);
  return { acked: () => acked, stop: () => clearInterval(tail) };
}

async function waitVmSyncs(vm: string, n: number, timeoutMs = 90_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = (await api!.call('protect-status', {})).find((r) => r.vm === vm);
    if (s && s.syncs >= n) return s;
    if (Date.now() > deadline) throw new Error(`waited ${timeoutMs} ms for ${n} syncs of ${vm}; last status ${JSON.stringify(s)}`);
    await sleep(200);
  }
}

async function settled(id: string) {
  let job = await api!.call('get', { id });
  for (let i = 0; i < 900 && (job.state === 'queued' || job.state === 'running'); i++) {
    await sleep(200);
    job = await api!.call('get', { id });
  }
  return job;
}

async function onHost(h: string, vm: string) {
  const c = await AgentClient.connect(agents[h]!.url, AGENT_TOKEN);
  try {
    return (await c.call('vm.get', { name: vm })) as { state: string; pid: number; spec: { disks: { path: string }[]; runDir: string } };
  } finally {
    c.close();
  }
}

async function backingOf(path: string): Promise<string | undefined> {
  return (JSON.parse((await run('qemu-img', ['info', '--output=json', '-U', path])).stdout) as { 'backing-filename'?: string })['backing-filename'];
}

test('ferry drain sends a protected VM to its standby by delta, and an unprotected one where the usual placement says', async () => {
  if (!api) await startScheduler(join(await makeTempDir('ferry-standby-db-'), 'state.db'));
  const vm3 = await startGuest('vm3');
  const vm4 = await startGuest('vm4');
  try {
    await api!.call('protect', { vm: 'vm3', standby: 'B', intervalMs: 1000 });
    await waitVmSyncs('vm3', 2);
    const jobs = await api!.call('drain', { host: 'A' });
    const byVm = new Map(jobs.map((r) => [r.job.vm, r.job]));
    // C has the most memory left: only the standby preference sends vm3 to B.
    expect(byVm.get('vm3')?.to).toBe('B');
    expect(byVm.get('vm4')?.to).toBe('C');
    const j3 = await settled(byVm.get('vm3')!.id);
    const j4 = await settled(byVm.get('vm4')!.id);
    expect(j3.state, j3.error ?? '').toBe('succeeded');
    expect(j4.state, j4.error ?? '').toBe('succeeded');
    const detail3 = (await api!.call('journal', { id: j3.id })).map((e) => e.detail ?? '').join(' | ');
    expect(detail3).toContain('by delta onto its standby replica');
    const detail4 = (await api!.call('journal', { id: j4.id })).map((e) => e.detail ?? '').join(' | ');
    expect(detail4).not.toContain('by delta');
    // Arrived on its replica: protection ends; the disk on B is an overlay on the replica's chain.
    expect((await api!.call('protect-status', {})).some((x) => x.vm === 'vm3')).toBe(false);
    const on3 = await onHost('B', 'vm3');
    expect(on3.state).toBe('running');
    pids.push(on3.pid, (await onHost('C', 'vm4')).pid);
    expect(await backingOf(on3.spec.disks[0]!.path)).toContain(join(roots.B!, 'replicas'));
    const c = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
    await c.call('vm.stop', { name: 'vm3', timeoutMs: 10_000 });
    c.close();
  } finally {
    vm3.stop();
    vm4.stop();
  }
}, 300_000);

test('a protected VM migrated to another host: its protection follows it (incrementally); migrated fully onto its standby: protection ends, stale replica removed', async () => {
  if (!api) await startScheduler(join(await makeTempDir('ferry-standby-db-'), 'state.db'));
  // vm4 runs on C after the drain; started there fresh if that test did not run.
  if ((await onHost('C', 'vm4').catch(() => undefined))?.state !== 'running') {
    await startGuest('vm4');
    const j = await settled((await api!.call('migrate', { vm: 'vm4', to: 'C' })).job.id);
    expect(j.state, j.error ?? '').toBe('succeeded');
  }
  await api!.call('protect', { vm: 'vm4', standby: 'B', intervalMs: 1000 });
  await waitVmSyncs('vm4', 2);
  const replicas = async () => (await readdir(join(roots.B!, 'replicas')).catch(() => [] as string[])).filter((d) => d.endsWith('-vm4'));
  expect((await replicas()).length).toBe(1);

  const toA = await settled((await api!.call('migrate', { vm: 'vm4', to: 'A' })).job.id);
  expect(toA.state, toA.error ?? '').toBe('succeeded');
  pids.push((await onHost('A', 'vm4')).pid);
  const row = (await api!.call('protect-status', {})).find((r) => r.vm === 'vm4');
  expect(row).toMatchObject({ source: 'A', standby: 'B' });
  // The loop starts again from A; its replica bitmap came along with the VM: incremental.
  const after = await waitVmSyncs('vm4', 2);
  expect(after.state).not.toBe('suspended');
  expect(after.lastBytes!).toBeLessThan(8 << 20);

  // Moved while the scheduler was down (the engine straight between the agents): at its start the
  // scheduler finds vm4 on C, and the protection follows it there, still incrementally.
  api!.close();
  await svc!.close();
  const source = await AgentSource.connect(agents.A!.url, AGENT_TOKEN, 'vm4');
  const destination = await AgentDestination.connect(agents.C!.url, AGENT_TOKEN);
  try {
    await migrate({ spec: source.spec, source, destination });
  } finally {
    source.close();
    destination.close();
  }
  pids.push((await onHost('C', 'vm4')).pid);
  await startScheduler(dbPath);
  expect((await api!.call('protect-status', {})).find((r) => r.vm === 'vm4')).toMatchObject({ source: 'C', standby: 'B' });
  const onC = await waitVmSyncs('vm4', 2);
  expect(onC.lastBytes!).toBeLessThan(8 << 20);

  // Lazy never goes by delta: a full migration onto the standby.
  const toB = await settled((await api!.call('migrate', { vm: 'vm4', to: 'B', mode: 'lazy' })).job.id);
  expect(toB.state, toB.error ?? '').toBe('succeeded');
  const onB = await onHost('B', 'vm4');
  pids.push(onB.pid);
  expect(onB.state).toBe('running');
  expect((await api!.call('protect-status', {})).some((x) => x.vm === 'vm4')).toBe(false);
  expect(await replicas()).toEqual([]);
  expect(await backingOf(onB.spec.disks[0]!.path).catch(() => undefined) ?? '').not.toContain(join(roots.B!, 'replicas'));
}, 300_000);
