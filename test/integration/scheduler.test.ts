/**
 * ferry-scheduler over three real agents on loopback, four writing guests on host A.
 * Refusals and cancel through the in-process service; then the drain with the scheduler as a
 * separate process, killed with SIGKILL mid-drain and started again.
 */
import { IMAGE_DIR } from '../../src/guest/image.js';
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import type { AgentEvent } from '../../src/agent/protocol.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { main as ferryMain } from '../../src/scheduler/cli.js';
import { SchedulerClient } from '../../src/scheduler/client.js';
import { startSchedulerService } from '../../src/scheduler/service.js';
import type { MigrationJob } from '../../src/scheduler/types.js';
import { agentLeftoverPids } from '../helpers/agent-leftovers.js';
import { agentGuestSpec, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';

const REPO = resolve(import.meta.dirname, '../..');
const AGENT_TOKEN = 'agent-token-for-the-scheduler-0123';
const API_TOKEN = 'operator-token-0123456789abcdef';
const VMS = ['vm1', 'vm2', 'vm3', 'vm4'];
const agents: Record<string, RunningAgent> = {};
const roots: Record<string, string> = {};
const pids: number[] = [];
const children: ChildProcess[] = [];
/** Highest ack each VM's guest printed on A, read continually: A's run dir goes when it retires. */
const ackedOnA = new Map<string, number>();
let poll: NodeJS.Timeout | undefined;

const acksIn = async (path: string): Promise<number> =>
  highestAcks((await readFile(path, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const hostsConfig = (caps: Record<string, number> = {}) => ['A', 'B', 'C'].map((h) => ({ name: h, url: agents[h]!.url, ...(caps[h] ? { memoryMiB: caps[h] } : {}) }));

beforeAll(async () => {
  for (const h of ['A', 'B', 'C']) {
    roots[h] = await makeTempDir(`ferry-sched-${h}-`);
    agents[h] = await startAgent({ name: h, listenPort: 0, storageRoot: roots[h], bootRoots: [IMAGE_DIR], tokens: { [AGENT_TOKEN]: 'scheduler' }, portRange: [22000 + 1000 * (h.charCodeAt(0) - 65), 22999 + 1000 * (h.charCodeAt(0) - 65)] });
  }
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  for (const vm of VMS) {
    const { spec } = await agentGuestSpec(roots.A!, vm, { memoryMiB: 128, diskMiB: 32, fillMiB: 4, rate: 20, tickMs: 100 });
    await a.call('vm.create', { spec });
    pids.push(((await a.call('vm.start', { name: vm })) as { pid: number }).pid);
  }
  a.close();
  poll = setInterval(() => {
    for (const vm of VMS) void acksIn(join(roots.A!, vm, 'run', 'serial.log')).then((n) => ackedOnA.set(vm, Math.max(ackedOnA.get(vm) ?? -1, n)));
  }, 100);
  for (let i = 0; i < 300 && !VMS.every((vm) => (ackedOnA.get(vm) ?? -1) >= 5); i++) await sleep(100);
}, 90_000);

afterAll(async () => {
  clearInterval(poll);
  for (const c of children) c.kill('SIGKILL');
  for (const a of Object.values(agents)) await a.close();
  // Every QEMU of this file, wherever it migrated: the agents' records know their PIDs.
  pids.push(...(await agentLeftoverPids(Object.values(roots))));
  killPids(pids);
  await cleanupAll();
}, 60_000);

test('refusals, and cancelling a queued and a running migration through real agents', async () => {
  const db = join(await makeTempDir('ferry-sched-db-'), 'state.db');
  // B and C offer 200 MiB each: one 128 MiB VM fits on each, four do not.
  const svc = await startSchedulerService({
    listenPort: 0,
    database: db,
    hosts: hostsConfig({ B: 200, C: 200 }),
    agentToken: AGENT_TOKEN,
    tokens: { [API_TOKEN]: 'ops' },
    limits: { outgoingPerHost: 1, bandwidthPerHostBytesPerSec: 1 << 20 },
  });
  const c = await SchedulerClient.connect(svc.url, API_TOKEN);
  try {
    await expect(c.call('migrate', { vm: 'ghost' })).rejects.toMatchObject({ code: 'VM_NOT_FOUND', message: "no VM named 'ghost' on any host" });
    await expect(c.call('drain', { host: 'A' })).rejects.toMatchObject({ code: 'NO_CAPACITY', message: expect.stringMatching(/cannot drain A: no host can take vm\d \(128 MiB\), vm\d \(128 MiB\); nothing was queued/) });
    await expect(c.call('migrate', { vm: 'vm1', to: 'Z' })).rejects.toMatchObject({ code: 'HOST_NOT_FOUND' });
    await expect(c.call('frobnicate' as 'hosts')).rejects.toMatchObject({ code: 'UNKNOWN_METHOD' });
    expect(await c.call('queue', { all: true })).toEqual([]);
    // The operator's CLI against the same service: tables, JSON, and refusals with exit 2.
    const ferry = async (...argv: string[]): Promise<{ code: number; out: string; err: string }> => {
      let out = '';
      let err = '';
      const sink = (f: (s: string) => void) => ({ write: (s: string) => (f(s), true) }) as unknown as NodeJS.WritableStream;
      const code = await ferryMain(['--scheduler', svc.url, ...argv], { stdout: sink((x) => (out += x)), stderr: sink((x) => (err += x)) }, { FERRY_SCHEDULER_TOKEN: API_TOKEN });
      return { code, out, err };
    };
    expect(await ferry('hosts')).toMatchObject({ code: 0, out: expect.stringMatching(/^HOST +UP +FREE MEM.*\nA +yes .* 4 +0 +0\nB +yes +200 MiB/) });
    expect(JSON.parse((await ferry('--json', 'vms')).out)).toHaveLength(4);
    expect(await ferry('migrate', 'ghost')).toMatchObject({ code: 2, err: "ferry: no VM named 'ghost' on any host\n" });
    expect(await ferry('drain')).toMatchObject({ code: 2, err: expect.stringMatching(/^ferry: ferry drain: expected one host name\n/) });
    expect((await ferryMain(['--scheduler', svc.url, 'queue'], { stdout: process.stdout, stderr: { write: () => true } as unknown as NodeJS.WritableStream }, {}))).toBe(2); // no token

    const phases: string[] = [];
    const progress: { doneBytes: number; totalBytes: number }[] = [];
    await c.watch((e) => {
      if (e.type === 'phase') phases.push(String(e.phase));
      if (e.type === 'progress') progress.push(e as unknown as { doneBytes: number; totalBytes: number });
    });
    // 1 MiB/s: the 4 MiB mirror takes seconds, long enough to cancel it mid-copy.
    const running = ((await c.call('migrate', { vm: 'vm1', to: 'B' })) as { job: MigrationJob }).job;
    const queued = ((await c.call('migrate', { vm: 'vm2', to: 'C' })) as { job: MigrationJob }).job;
    for (let i = 0; i < 200 && !phases.includes('mirror'); i++) await sleep(50);
    expect(phases).toContain('mirror');
    for (let i = 0; i < 60 && progress.length === 0; i++) await sleep(50);
    expect(progress[0]!.totalBytes).toBeGreaterThan(4 << 20); // live progress reaches `ferry watch`
    expect(((await c.call('get', { id: queued.id })) as MigrationJob).state).toBe('queued'); // one out of A at a time
    expect(await c.call('cancel', { id: queued.id })).toMatchObject({ state: 'cancelled' });
    await c.call('cancel', { id: running.id });
    let state = '';
    for (let i = 0; i < 300 && state !== 'cancelled'; i++, await sleep(100)) state = ((await c.call('get', { id: running.id })) as MigrationJob).state;
    expect(state).toBe('cancelled');
    // The guest stayed on A, running and writing; B kept nothing.
    const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
    const b = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
    expect(await a.call('vm.get', { name: 'vm1' })).toMatchObject({ state: 'running', role: 'vm' });
    expect(await b.call('vm.list')).toEqual([]);
    expect(await readdir(roots.B!)).toEqual(['.ferry-agent']);
    const before = ackedOnA.get('vm1')!;
    for (let i = 0; i < 50 && ackedOnA.get('vm1')! <= before; i++) await sleep(100);
    expect(ackedOnA.get('vm1')!).toBeGreaterThan(before);
    a.close();
    b.close();
  } finally {
    c.close();
    await svc.close({ graceMs: 0 });
  }
}, 90_000);

/** Starts ferry-scheduler as a process and resolves with its URL. */
async function startSchedulerProcess(config: string): Promise<{ child: ChildProcess; url: string }> {
  const child = spawn('node', ['bin/ferry-scheduler.mjs', '--config', config], { cwd: REPO, env: { ...process.env, FERRY_LOG_LEVEL: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
  const url = await new Promise<string>((ready, fail) => {
    const timer = setTimeout(() => fail(new Error(`scheduler did not start: ${err}`)), 30_000);
    child.stdout!.on('data', (d: Buffer) => {
      const m = /listening on (ws:\/\/\S+)/.exec(d.toString());
      if (m) {
        clearTimeout(timer);
        ready(m[1]!);
      }
    });
    child.once('exit', (code) => fail(new Error(`scheduler exited (${code}): ${err}`)));
  });
  return { child, url };
}

test('drain A with 2 outgoing at most; the scheduler is killed -9 mid-drain and restarted; every VM lands, every write is there', async () => {
  const dir = await makeTempDir('ferry-sched-proc-');
  const config = join(dir, 'scheduler.json');
  await writeFile(
    config,
    JSON.stringify({ listenPort: 0, database: join(dir, 'state.db'), hosts: hostsConfig(), agentToken: AGENT_TOKEN, tokens: { [API_TOKEN]: 'ops' }, limits: { outgoingPerHost: 2 }, retry: { baseDelayMs: 500 } }),
  );
  // What leaves A, seen from the destinations' agents, not from the scheduler's own books.
  const inFlight = new Set<string>();
  let maxInFlight = 0;
  const watchers: AgentClient[] = [];
  for (const h of ['B', 'C']) {
    const w = await AgentClient.connect(agents[h]!.url, AGENT_TOKEN);
    watchers.push(w);
    await w.onEvent((e: AgentEvent) => {
      if (e.type !== 'vm.state') return;
      if (e.vm.role === 'incoming' && e.vm.state === 'running') inFlight.add(`${h}/${e.vm.vmId}`);
      else inFlight.delete(`${h}/${e.vm.vmId}`);
      maxInFlight = Math.max(maxInFlight, inFlight.size);
    });
  }

  let { child, url } = await startSchedulerProcess(config);
  let c = await SchedulerClient.connect(url, API_TOKEN);
  const planned = (await c.call('drain', { host: 'A' })) as { job: MigrationJob }[];
  expect(planned.map((p) => p.job.vm).sort()).toEqual(VMS);
  for (let i = 0; i < 300 && inFlight.size === 0; i++) await sleep(50);
  expect(inFlight.size).toBeGreaterThan(0);
  c.close();
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));

  ({ child, url } = await startSchedulerProcess(config));
  c = await SchedulerClient.connect(url, API_TOKEN);
  let jobs: MigrationJob[] = [];
  for (let i = 0; i < 900; i++) {
    jobs = (await c.call('queue', { all: true })) as MigrationJob[];
    if (jobs.length === 4 && jobs.every((j) => j.state !== 'queued' && j.state !== 'running')) break;
    await sleep(200);
  }
  expect(jobs.map((j) => [j.vm, j.state]).sort()).toEqual(VMS.map((vm) => [vm, 'succeeded']));
  const journals = await Promise.all(jobs.map(async (j) => (await c.call('journal', { id: j.id })) as { detail: string | null }[]));
  c.close();
  // A clean stop: SIGTERM, nothing running, exit 0.
  const exited = new Promise<number | null>((r) => child.once('exit', r));
  child.kill('SIGTERM');
  expect(await exited).toBe(0);
  for (const w of watchers) w.close();
  expect(maxInFlight).toBeLessThanOrEqual(2);
  expect(maxInFlight).toBe(2); // the limit was reached, so the bound means something
  // At least one migration was in flight at the kill, and the restart settled it.
  expect(journals.flat().some((e) => e.detail?.startsWith('recovered after a scheduler restart'))).toBe(true);

  // Every VM runs on exactly one host, not A, not paused, and its disk holds every acked write.
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  expect(await a.call('vm.list')).toEqual([]);
  a.close();
  const placed = new Map<string, string>();
  for (const h of ['B', 'C']) {
    const cl = await AgentClient.connect(agents[h]!.url, AGENT_TOKEN);
    for (const v of (await cl.call('vm.list')) as { name: string; role: string; state: string }[]) {
      expect(v).toMatchObject({ role: 'vm', state: 'running' });
      expect(placed.has(v.name)).toBe(false);
      placed.set(v.name, h);
    }
    cl.close();
  }
  expect([...placed.keys()].sort()).toEqual(VMS);
  for (const [vm, h] of placed) {
    const run = (await readdir(join(roots[h]!, vm))).find((f) => f.startsWith('run-'))!;
    const serial = join(roots[h]!, vm, run, 'serial.log');
    const first = await acksIn(serial);
    for (let i = 0; i < 50 && (await acksIn(serial)) <= first; i++) await sleep(100);
    const acked = await acksIn(serial);
    expect(acked, `${vm} writes on ${h}`).toBeGreaterThan(Math.max(first, ackedOnA.get(vm)!));
    const cl = await AgentClient.connect(agents[h]!.url, AGENT_TOKEN);
    await cl.call('vm.stop', { name: vm });
    cl.close();
    const report = await verifyDisk(join(roots[h]!, vm, 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: await acksIn(serial) });
    expect(report, vm).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  }
}, 240_000);

test('lazy mode: the scheduler killed -9 during hydration; at restart it finishes the hydration before the source goes, nothing lost', async () => {
  const dir = await makeTempDir('ferry-sched-lazy-');
  const config = join(dir, 'scheduler.json');
  await writeFile(
    config,
    // 2 MiB/s over a 16 MiB disk (QEMU 7.2 counts holes too): the stream runs for ~8 s.
    JSON.stringify({ listenPort: 0, database: join(dir, 'state.db'), hosts: hostsConfig(), agentToken: AGENT_TOKEN, tokens: { [API_TOKEN]: 'ops' }, mode: 'lazy', hydrationBytesPerSec: 2 << 20 }),
  );
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  const { spec, serialLog } = await agentGuestSpec(roots.A!, 'lz1', { memoryMiB: 128, diskMiB: 16, fillMiB: 4, rate: 20, tickMs: 100 });
  await a.call('vm.create', { spec });
  pids.push(((await a.call('vm.start', { name: 'lz1' })) as { pid: number }).pid);
  let ackedOnA = -1;
  const pollA = setInterval(() => void acksIn(serialLog).then((n) => (ackedOnA = Math.max(ackedOnA, n))), 100);
  try {
    for (let i = 0; i < 300 && ackedOnA < 5; i++) await sleep(100);
    // The stream starting on B is the moment to kill the scheduler.
    let streaming!: () => void;
    const streamRuns = new Promise<void>((r) => (streaming = r));
    const watchB = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
    await watchB.onEvent((e) => {
      if (e.type === 'vm.qmp' && e.event === 'JOB_STATUS_CHANGE' && e.data.id === 'ferry-stream-data' && e.data.status === 'running') streaming();
    });
    let { child, url } = await startSchedulerProcess(config);
    let c = await SchedulerClient.connect(url, API_TOKEN);
    const job = ((await c.call('migrate', { vm: 'lz1', to: 'B' })) as { job: MigrationJob }).job;
    expect(job.mode).toBe('lazy');
    await streamRuns;
    c.close();
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    watchB.close();

    ({ child, url } = await startSchedulerProcess(config));
    c = await SchedulerClient.connect(url, API_TOKEN);
    let state = '';
    for (let i = 0; i < 300 && state !== 'succeeded' && state !== 'failed'; i++, await sleep(200)) state = ((await c.call('get', { id: job.id })) as MigrationJob).state;
    const journal = (await c.call('journal', { id: job.id })) as { detail: string | null }[];
    c.close();
    child.kill('SIGTERM');
    expect(state).toBe('succeeded');
    expect(journal.some((e) => /recovered after a scheduler restart: .*hydrated disk-data/.test(e.detail ?? ''))).toBe(true);
  } finally {
    clearInterval(pollA);
  }
  expect(await a.call('vm.list')).not.toContainEqual(expect.objectContaining({ name: 'lz1' }));
  a.close();
  const b = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
  expect(await b.call('vm.get', { name: 'lz1' })).toMatchObject({ role: 'vm', state: 'running' });
  const runB = (await readdir(join(roots.B!, 'lz1'))).find((f) => f.startsWith('run-'))!;
  const serialB = join(roots.B!, 'lz1', runB, 'serial.log');
  for (let i = 0; i < 50 && (await acksIn(serialB)) <= ackedOnA; i++) await sleep(100);
  await b.call('vm.stop', { name: 'lz1' });
  b.close();
  const acked = await acksIn(serialB);
  expect(acked).toBeGreaterThan(ackedOnA);
  // verifyDisk refuses an image with a backing file: the overlay must stand alone.
  const report = await verifyDisk(join(roots.B!, 'lz1', 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: acked });
  expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
}, 180_000);
