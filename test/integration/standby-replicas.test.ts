/**
 * Standby sync loops under scheduler replicas on PostgreSQL (issues 12 and 13): each protection's
 * loop runs on the one replica holding its lease. Two replicas (processes), two real agents, a
 * writing guest protected through one of them:
 *   - exactly one loop syncs (a second would abort the first's syncs on the standby: none fail),
 *     and `protect status` on the other replica reads the standby's truth;
 *   - the holder killed -9: the other replica resumes the loop within about a lease, incrementally;
 *   - `unprotect` sent to a replica that does not hold the loop: the holder hands it over, the
 *     replica is removed, and no loop syncs any more.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import { replicaStatusSchema } from '../../src/agent/replica-protocol.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { SchedulerClient } from '../../src/scheduler/client.js';
import { agentLeftoverPids } from '../helpers/agent-leftovers.js';
import { agentGuestSpec, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';
import { startPostgres, type TestPostgres } from '../helpers/postgres.js';

const REPO = resolve(import.meta.dirname, '../..');
const AGENT_TOKEN = 'agent-token-standby-replicas-0123';
const API_TOKEN = 'operator-token-standby-replicas-01';
const LEASE_MS = 3_000;
const agents: Record<string, RunningAgent> = {};
const roots: Record<string, string> = {};
const pids: number[] = [];
const replicas: { child: ChildProcess; url: string }[] = [];
let postgres: TestPostgres | undefined;
let db: pg.Client | undefined;
let configPath = '';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function startReplica(): Promise<{ child: ChildProcess; url: string }> {
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
  const r = { child, url };
  replicas.push(r);
  return r;
}

async function api<T>(r: { url: string }, method: Parameters<SchedulerClient['call']>[0], params: Record<string, unknown> = {}): Promise<T> {
  const c = await SchedulerClient.connect(r.url, API_TOKEN);
  try {
    return (await c.call(method, params, 120_000)) as T;
  } finally {
    c.close();
  }
}

async function replicaStatus() {
  const c = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
  try {
    return replicaStatusSchema.parse(await c.call('replica.status', { vm: 'pv1' }));
  } finally {
    c.close();
  }
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(200);
  }
}

const leaseOwners = async (): Promise<string[]> => (await db!.query('SELECT owner FROM protection_leases')).rows.map((r: { owner: string }) => r.owner);
const replicaOf = (owner: string) => replicas.find((r) => r.child.pid === Number(owner.split(':')[1]))!;

beforeAll(async () => {
  postgres = await startPostgres();
  db = new pg.Client({ connectionString: postgres.url });
  await db.connect();
  for (const [i, h] of ['A', 'B'].entries()) {
    roots[h] = await makeTempDir(`ferry-sbrepl-${h}-`);
    agents[h] = await startAgent({ name: h, listenPort: 0, storageRoot: roots[h], bootRoots: [IMAGE_DIR], tokens: { [AGENT_TOKEN]: 'scheduler' }, portRange: [28000 + 500 * i, 28499 + 500 * i] });
  }
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  const { spec } = await agentGuestSpec(roots.A!, 'pv1', { memoryMiB: 128, diskMiB: 32, fillMiB: 4, rate: 30, tickMs: 100 });
  await a.call('vm.create', { spec });
  pids.push(((await a.call('vm.start', { name: 'pv1' })) as { pid: number }).pid);
  a.close();
  configPath = join(await makeTempDir('ferry-sbrepl-cfg-'), 'scheduler.json');
  await writeFile(
    configPath,
    JSON.stringify({
      listenPort: 0,
      database: postgres.url,
      hosts: ['A', 'B'].map((name) => ({ name, url: agents[name]!.url })),
      agentToken: AGENT_TOKEN,
      tokens: { [API_TOKEN]: 'ops' },
      replica: { leaseMs: LEASE_MS, pollMs: 300 },
    }),
  );
  for (let i = 0; i < 2; i++) await startReplica();
}, 120_000);

afterAll(async () => {
  for (const r of replicas) if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGKILL');
  await db?.end().catch(() => undefined);
  for (const a of Object.values(agents)) await a.close();
  pids.push(...(await agentLeftoverPids(Object.values(roots))));
  killPids(pids);
  await postgres?.stop();
  await cleanupAll();
}, 60_000);

test('standby sync loops are leased between scheduler replicas: one loop, resumed after kill -9 of its replica, handed over for an unprotect', async () => {
  await api(replicas[0]!, 'protect', { vm: 'pv1', standby: 'B', intervalMs: 1000 });
  await until('three syncs', 90_000, async () => ((await replicaStatus()).lastSync?.seq ?? 0) >= 3 || undefined);
  const [owner, ...others] = await leaseOwners();
  expect(others).toEqual([]);
  const holder = replicaOf(owner!);
  const other = replicas.find((r) => r !== holder)!;
  // One loop: a second would abort the first's syncs on the standby (prepareSync takes over).
  expect((await replicaStatus()).failedSyncs).toBe(0);
  // The replica without the loop answers protect status from the standby's own record.
  const seen = (await api<{ vm: string; syncs: number; consistentAt: number | null }[]>(other, 'protect-status'))[0]!;
  expect(seen.vm).toBe('pv1');
  expect(seen.syncs).toBeGreaterThanOrEqual(3);
  expect(seen.consistentAt).not.toBeNull();

  // kill -9 of the holder: the other replica claims the lease once it runs out and syncs on.
  const before = (await replicaStatus()).lastSync!.seq;
  const killedAt = Date.now();
  holder.child.kill('SIGKILL');
  await new Promise((r) => holder.child.once('exit', r));
  const resumed = await until('the loop to resume on the other replica', 30_000, async () => {
    const s = await replicaStatus();
    return (s.lastSync?.seq ?? 0) >= before + 2 ? s : undefined;
  });
  const resumedMs = Date.now() - killedAt;
  expect(await leaseOwners()).toEqual([expect.stringContaining(`:${other.child.pid}:`)]);
  // Incremental: the 4 MiB fill is not sent again.
  expect(resumed.lastSync!.bytes).toBeLessThan(4 << 20);

  // unprotect through a replica that does not run the loop: it is handed over, then removed.
  const third = await startReplica();
  await api(third, 'unprotect', { vm: 'pv1' });
  expect(await api<unknown[]>(other, 'protect-status')).toEqual([]);
  expect(await leaseOwners()).toEqual([]);
  await expect(replicaStatus()).rejects.toThrow();
  await sleep(2 * LEASE_MS);
  // No loop came back for it anywhere: the standby holds no replica, none was made again.
  expect(await readdir(join(roots.B!, 'replicas')).catch(() => [])).toEqual([]);
  expect(await leaseOwners()).toEqual([]);
  console.log(`standby loops under replicas: resumed ${resumedMs} ms after kill -9 of the holder (lease ${LEASE_MS} ms)`);
}, 300_000);
