/**
 * Three ferry-scheduler replicas (separate processes) on one real PostgreSQL (a throwaway cluster
 * run as nobody, unix socket only), three real agents on loopback, three writing guests. Three
 * drains, each with a failure in the middle:
 *   1. PostgreSQL restarted mid-drain: the replicas reconnect and carry on.
 *   2. a replica SIGSTOPped past its lease, then SIGCONTed: another took its migration over, and
 *      the woken replica's calls are refused by the agents (STALE_EPOCH, counted); nothing twice.
 *   3. a replica killed -9 mid-drain: the others take its migration over (the time is measured)
 *      and finish.
 * After each: every VM runs on exactly one host; at the end every acknowledged write is on disk.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import { fenceStatusSchema, vmSummarySchema } from '../../src/agent/protocol.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { main as ferryMain } from '../../src/scheduler/cli.js';
import { SchedulerClient, type SchedulerEvent } from '../../src/scheduler/client.js';
import type { MigrationJob } from '../../src/scheduler/types.js';
import { agentGuestSpec, cleanupAll, makeTempDir } from '../helpers/guest.js';
import { startPostgres, type TestPostgres } from '../helpers/postgres.js';

const REPO = resolve(import.meta.dirname, '../..');
const AGENT_TOKEN = 'agent-token-for-the-replicas-0123';
const API_TOKEN = 'operator-token-replicas-0123456789';
const HOSTS = ['A', 'B', 'C'];
const VMS = ['rv1', 'rv2', 'rv3'];
const LEASE_MS = 3_000;
const agents: Record<string, RunningAgent> = {};
const roots: Record<string, string> = {};
const pids: number[] = [];
const replicas: { child: ChildProcess; url: string; log: () => string }[] = [];
/** Highest ack each guest printed on any host, read continually (a retired run dir goes away). */
const acked = new Map<string, number>();
let poll: NodeJS.Timeout | undefined;
let postgres: TestPostgres | undefined;
let db: pg.Client | undefined;
let configPath = '';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const acksIn = async (path: string): Promise<number> =>
  highestAcks((await readFile(path, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;

async function waitFor<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    await sleep(100);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${String(last)})` : ''}\n${replicas.map((r, i) => `replica ${i}: ${r.log()}`).join('\n')}`);
}

async function startReplica(): Promise<{ child: ChildProcess; url: string; log: () => string }> {
  const child = spawn('node', ['bin/ferry-scheduler.mjs', '--config', configPath], { cwd: REPO, env: { ...process.env, FERRY_LOG_LEVEL: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-3000)));
  const url = await new Promise<string>((ready, fail) => {
    const timer = setTimeout(() => fail(new Error(`replica did not start: ${err}`)), 30_000);
    child.stdout!.on('data', (d: Buffer) => {
      const m = /listening on (ws:\/\/\S+)/.exec(d.toString());
      if (m) {
        clearTimeout(timer);
        ready(m[1]!);
      }
    });
    child.once('exit', (code) => fail(new Error(`replica exited (${code}): ${err}`)));
  });
  const r = { child, url, log: () => err };
  replicas.push(r);
  return r;
}

/** Running migrations with their lease, read from the database itself. */
async function runningLeases(): Promise<{ id: string; vm: string; owner: string; epoch: number; phase: string | null }[]> {
  const res = await db!.query("SELECT m.id, m.vm, m.phase, l.owner, l.epoch FROM migrations m JOIN leases l ON l.migration_id = m.id WHERE m.state = 'running'");
  return res.rows.map((r: { id: string; vm: string; phase: string | null; owner: string; epoch: string }) => ({ id: r.id, vm: r.vm, phase: r.phase, owner: r.owner, epoch: Number(r.epoch) }));
}

/** The replica process whose lease `owner` names (owner = host:pid:random). */
function replicaOf(owner: string): { child: ChildProcess; url: string } {
  const pid = Number(owner.split(':')[1]);
  const r = replicas.find((x) => x.child.pid === pid);
  if (!r) throw new Error(`no replica with pid ${pid} (owner ${owner})`);
  return r;
}

/** VM name -> hosts where it runs as an ordinary VM; incoming QEMUs are paused and not counted. */
async function placement(): Promise<Map<string, string[]>> {
  const out = new Map<string, string[]>();
  for (const h of HOSTS) {
    const c = await AgentClient.connect(agents[h]!.url, AGENT_TOKEN);
    try {
      for (const v of (await c.call('vm.list')) as unknown[]) {
        const s = vmSummarySchema.parse(v);
        if (s.role === 'vm' && s.running) out.set(s.name, [...(out.get(s.name) ?? []), h]);
      }
    } finally {
      c.close();
    }
  }
  return out;
}

async function staleRefusals(): Promise<number> {
  let n = 0;
  for (const h of HOSTS) {
    const c = await AgentClient.connect(agents[h]!.url, AGENT_TOKEN);
    n += fenceStatusSchema.parse(await c.call('fence.status')).staleRefused;
    c.close();
  }
  return n;
}

/** Drains `host` through `via`, runs `during` once a migration is in flight, waits for the end. */
async function drain(
  host: string,
  via: string,
  during: (lease: Awaited<ReturnType<typeof runningLeases>>[number]) => Promise<void>,
  phases = ['preflight', 'prepare-destination', 'mirror', 'ram'],
): Promise<{ id: string; vm: string; state: string }[]> {
  const c = await SchedulerClient.connect(via, API_TOKEN);
  try {
    const planned = ((await c.call('drain', { host })) as { job: MigrationJob }[]).map((p) => p.job);
    expect(planned.length).toBeGreaterThan(0);
    const lease = await waitFor('a migration in flight', 60_000, async () => (await runningLeases()).find((l) => phases.includes(l.phase ?? '')));
    c.close();
    await during(lease);
    // Read from the database: the replica asked may be the one `during` killed.
    return await waitFor(`the drain of ${host} to end`, 150_000, async () => {
      const res = await db!.query('SELECT id, vm, state FROM migrations WHERE id = ANY($1)', [planned.map((j) => j.id)]);
      const jobs = res.rows as { id: string; vm: string; state: string }[];
      return jobs.length === planned.length && jobs.every((j) => j.state !== 'queued' && j.state !== 'running') ? jobs : undefined;
    });
  } finally {
    c.close();
  }
}

async function expectEachVmOnce(): Promise<Map<string, string>> {
  const where = await placement();
  expect([...where.keys()].sort()).toEqual(VMS);
  for (const [vm, hosts] of where) expect(hosts, `${vm} runs on exactly one host`).toHaveLength(1);
  return new Map([...where].map(([vm, hosts]) => [vm, hosts[0]!]));
}

beforeAll(async () => {
  postgres = await startPostgres();
  db = new pg.Client({ connectionString: postgres.url });
  db.on('error', () => undefined); // the restart below cuts this connection too
  for (const [i, h] of HOSTS.entries()) {
    roots[h] = await makeTempDir(`ferry-repl-${h}-`);
    agents[h] = await startAgent({ name: h, listenPort: 0, storageRoot: roots[h], bootRoots: [IMAGE_DIR], tokens: { [AGENT_TOKEN]: 'scheduler' }, portRange: [25000 + 1000 * i, 25999 + 1000 * i] });
  }
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  for (const vm of VMS) {
    const { spec } = await agentGuestSpec(roots.A!, vm, { memoryMiB: 128, diskMiB: 32, fillMiB: 4, rate: 20, tickMs: 100 });
    await a.call('vm.create', { spec });
    pids.push(((await a.call('vm.start', { name: vm })) as { pid: number }).pid);
  }
  a.close();
  poll = setInterval(() => {
    for (const vm of VMS) {
      for (const h of HOSTS) {
        void readdir(join(roots[h]!, vm))
          .then((files) => Promise.all(files.filter((f) => f === 'run' || f.startsWith('run-')).map((f) => acksIn(join(roots[h]!, vm, f, 'serial.log')))))
          .then((ns) => acked.set(vm, Math.max(acked.get(vm) ?? -1, ...ns)))
          .catch(() => undefined);
      }
    }
  }, 100);
  await waitFor('the guests to write', 60_000, async () => (VMS.every((vm) => (acked.get(vm) ?? -1) >= 5) ? true : undefined));
  const dir = await makeTempDir('ferry-repl-cfg-');
  configPath = join(dir, 'scheduler.json');
  await writeFile(
    configPath,
    JSON.stringify({
      listenPort: 0,
      database: postgres.url,
      hosts: HOSTS.map((name) => ({ name, url: agents[name]!.url })),
      agentToken: AGENT_TOKEN,
      tokens: { [API_TOKEN]: 'ops' },
      limits: { outgoingPerHost: 2 },
      retry: { baseDelayMs: 300 },
      replica: { leaseMs: LEASE_MS, pollMs: 300 },
    }),
  );
  for (let i = 0; i < 3; i++) await startReplica();
  await db.connect();
}, 120_000);

afterAll(async () => {
  clearInterval(poll);
  for (const r of replicas) {
    if (r.child.exitCode !== null || r.child.signalCode !== null) continue;
    r.child.kill('SIGCONT');
    r.child.kill('SIGKILL');
  }
  await db?.end().catch(() => undefined);
  for (const a of Object.values(agents)) await a.close();
  for (const h of Object.keys(roots)) {
    for (const f of await readdir(join(roots[h]!, '.ferry-agent', 'vms')).catch(() => [] as string[])) {
      const rec = JSON.parse(await readFile(join(roots[h]!, '.ferry-agent', 'vms', f), 'utf8').catch(() => '{}')) as { pid?: number };
      if (rec.pid) pids.push(rec.pid);
    }
  }
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  await postgres?.stop();
  await cleanupAll();
}, 60_000);

test('three replicas on PostgreSQL: a database restart, a replica paused past its lease, a replica killed -9; every VM lands once, every write is there', async () => {
  const started = performance.now();
  // A watcher on every replica: each must see every migration, whichever replica runs it.
  const watchers = await Promise.all(
    replicas.map(async (r) => {
      const c = await SchedulerClient.connect(r.url, API_TOKEN);
      const seen: SchedulerEvent[] = [];
      await c.watch((e) => seen.push(e));
      return { replica: r, client: c, seen };
    }),
  );
  // 1. The drain is asked of one replica and seen by the others; PostgreSQL restarts under it.
  const first = await drain('A', replicas[0]!.url, async () => {
    for (const r of replicas.slice(1)) {
      const c = await SchedulerClient.connect(r.url, API_TOKEN);
      const queue = (await c.call('queue', {})) as MigrationJob[];
      c.close();
      expect(queue.map((j) => j.vm).sort()).toEqual(VMS);
    }
    // The operator's CLI, against the third replica.
    let out = '';
    const sink = { write: (x: string) => ((out += x), true) } as unknown as NodeJS.WritableStream;
    expect(await ferryMain(['--scheduler', replicas[2]!.url, '--json', 'queue'], { stdout: sink, stderr: sink }, { FERRY_SCHEDULER_TOKEN: API_TOKEN })).toBe(0);
    expect((JSON.parse(out) as MigrationJob[]).map((j) => j.vm).sort()).toEqual(VMS);
    await postgres!.restart({ downMs: 500 });
    await db!.end().catch(() => undefined);
    db = new pg.Client({ connectionString: postgres!.url });
    db.on('error', () => undefined);
    await db.connect();
  });
  expect(first.map((j) => [j.vm, j.state]).sort()).toEqual(VMS.map((vm) => [vm, 'succeeded']));
  let where = await expectEachVmOnce();

  // 2. A replica stops (SIGSTOP) holding a migration, past its lease; another takes it over.
  const busiest = (): string => {
    const count = (h: string): number => [...where.values()].filter((x) => x === h).length;
    return HOSTS.filter((h) => count(h) > 0).sort((x, y) => count(y) - count(x))[0]!;
  };
  const refusedBefore = await staleRefusals();
  let stale: { id: string; epoch: number } | undefined;
  const second = await drain(busiest(), replicas[1]!.url, async (lease) => {
    const owner = replicaOf(lease.owner);
    owner.child.kill('SIGSTOP');
    stale = { id: lease.id, epoch: lease.epoch };
    try {
      // Taken over (a new epoch) and settled (no longer the phase the paused replica left).
      await waitFor('a takeover of the paused replica\'s migration', 20_000, async () => {
        const res = await db!.query('SELECT m.state, l.epoch FROM migrations m LEFT JOIN leases l ON l.migration_id = m.id WHERE m.id = $1', [lease.id]);
        const row = res.rows[0] as { state: string; epoch: string | null } | undefined;
        return row && (row.state !== 'running' || Number(row.epoch) > lease.epoch) ? true : undefined;
      });
      const journal = await db!.query("SELECT detail FROM journal WHERE migration_id = $1 AND detail LIKE 'taken over after its lease expired%'", [lease.id]);
      if (journal.rows.length === 0) await waitFor('the takeover to settle', 15_000, async () => ((await db!.query("SELECT 1 FROM journal WHERE migration_id = $1 AND detail LIKE 'taken over after its lease expired%'", [lease.id])).rows.length > 0 ? true : undefined));
    } finally {
      owner.child.kill('SIGCONT');
    }
    // With mirrors running (a destination QEMU, jobs on the source), the woken engine has things
    // to undo: each of its calls must now be refused.
  }, ['mirror', 'ram']);
  expect(stale).toBeDefined();
  expect(second.every((j) => j.state === 'succeeded')).toBe(true);
  // The woken replica acted on a migration it no longer held: the agents refused it.
  const refused = (await waitFor('the woken replica\'s calls to be refused', 20_000, async () => {
    const n = await staleRefusals();
    return n > refusedBefore ? n : undefined;
  })) - refusedBefore;
  expect(refused).toBeGreaterThan(0);
  // Ran once: one succeeded end per migration, and the paused one ended by its new claim only.
  const ends = await db!.query("SELECT migration_id, count(*)::int AS n FROM journal WHERE state = 'succeeded' GROUP BY migration_id");
  for (const r of ends.rows as { n: number }[]) expect(r.n).toBe(1);
  where = await expectEachVmOnce();

  // 3. A replica is killed -9 holding a migration; the others take it over and finish.
  const alive = replicas.filter((r) => r.child.exitCode === null && r.child.signalCode === null);
  let takeoverMs = -1;
  const third = await drain(busiest(), alive[0]!.url, async (lease) => {
    const owner = replicaOf(lease.owner);
    const killedAt = Date.now();
    owner.child.kill('SIGKILL');
    await new Promise((r) => owner.child.once('exit', r));
    const row = await waitFor('another replica to take the killed one\'s migration', 30_000, async () => {
      const res = await db!.query("SELECT at FROM journal WHERE migration_id = $1 AND detail LIKE 'taken over by %' ORDER BY entry DESC LIMIT 1", [lease.id]);
      return (res.rows[0] as { at: string } | undefined)?.at;
    });
    takeoverMs = Number(row) - killedAt;
  });
  expect(third.every((j) => j.state === 'succeeded')).toBe(true);
  // The replicas still alive saw every migration of this drain from its mirror to its end, also those
  // another replica ran (published over NOTIFY, after the database restart of drain 1).
  const survivors = watchers.filter((w) => w.replica.child.exitCode === null && w.replica.child.signalCode === null);
  expect(survivors.length).toBeGreaterThanOrEqual(2);
  for (const w of survivors) {
    for (const j of third) {
      await waitFor(`replica ${replicas.indexOf(w.replica)}'s watcher to see ${j.vm} succeed`, 10_000, async () => (w.seen.some((e) => e.type === 'job' && e.job.id === j.id && e.job.state === 'succeeded') ? true : undefined));
      expect(w.seen.some((e) => e.type === 'phase' && e.id === j.id && e.phase === 'mirror'), `replica ${replicas.indexOf(w.replica)} saw ${j.vm}'s mirror phase`).toBe(true);
    }
  }
  for (const w of watchers) w.client.close();
  expect(takeoverMs).toBeGreaterThan(0);
  expect(takeoverMs).toBeLessThan(LEASE_MS + 3_000);
  where = await expectEachVmOnce();

  // Every acknowledged write, on whichever host runs the guest now.
  for (const [vm, h] of where) {
    const run = (await readdir(join(roots[h]!, vm))).find((f) => f.startsWith('run-'))!;
    const serial = join(roots[h]!, vm, run, 'serial.log');
    const before = acked.get(vm)!;
    await waitFor(`${vm} to write on ${h}`, 20_000, async () => ((await acksIn(serial)) > before ? true : undefined));
    const c = await AgentClient.connect(agents[h]!.url, AGENT_TOKEN);
    await c.call('vm.stop', { name: vm });
    c.close();
    const report = await verifyDisk(join(roots[h]!, vm, 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: Math.max(acked.get(vm)!, await acksIn(serial)) });
    expect(report, vm).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  }
  console.log(`replicas: takeover after kill -9 ${takeoverMs} ms (lease ${LEASE_MS} ms); stale calls refused ${refused}; scenario ${Math.round((performance.now() - started) / 1000)} s`);
}, 400_000);
