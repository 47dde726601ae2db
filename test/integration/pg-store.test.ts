/**
 * The PostgreSQL store alone, on a real throwaway cluster (test/helpers/postgres.ts): what the
 * replicas rely on, without QEMU. Two stores on one database stand for two replicas.
 */
import { afterAll, beforeAll, beforeEach, expect, test } from 'vitest';
import pg from 'pg';
import { PostgresStore } from '../../src/scheduler/pg-store.js';
import type { ClaimLimits } from '../../src/scheduler/store.js';
import { startPostgres, type TestPostgres } from '../helpers/postgres.js';

let server: TestPostgres;
let one: PostgresStore;
let two: PostgresStore;
const limits: ClaimLimits = { outgoingPerHost: 1, incomingPerHost: 5, cluster: 3, bandwidth: () => null };
const req = (vm: string, from = 'a', to = 'b') => ({ vm, from, to, reason: 'drain' as const, priority: 20, memoryMiB: 1, diskBytes: 1 });

beforeAll(async () => {
  server = await startPostgres();
}, 60_000);

afterAll(async () => {
  await one?.close();
  await two?.close();
  await server?.stop();
});

beforeEach(async () => {
  await one?.close();
  await two?.close();
  const c = new pg.Client({ connectionString: server.url });
  await c.connect();
  await c.query('DROP TABLE IF EXISTS leases, protection_leases, journal, migrations, protections, recoveries, ferry_schema; DROP SEQUENCE IF EXISTS migration_seq, fencing_epoch');
  await c.end();
  // Both at once: the schema is made once, under its advisory lock.
  [one, two] = await Promise.all([PostgresStore.open(server.url), PostgresStore.open(server.url)]);
});

test('claims from two replicas together never pass the limits, and each migration is claimed once', async () => {
  await one.enqueue([req('v1', 'a'), req('v2', 'a'), req('v3', 'c'), req('v4', 'd'), req('v5', 'e')]);
  const claims = (await Promise.all([0, 1, 2, 3, 4, 5].map((i) => (i % 2 ? one : two).claimQueued('r', 10_000, limits)))).filter((c) => c !== undefined);
  // One out of a at a time, three in the cluster.
  expect(claims).toHaveLength(3);
  expect(new Set(claims.map((c) => c.job.id)).size).toBe(3);
  expect(claims.filter((c) => c.job.from === 'a')).toHaveLength(1);
  expect(new Set(claims.map((c) => c.claim.epoch)).size).toBe(3);
});

test('an expired lease is taken over with a larger epoch; the old claim can no longer write', async () => {
  await one.enqueue([req('v1')]);
  const mine = (await one.claimQueued('one', 300, limits))!;
  await one.phase(mine.job.id, 'mirror', mine.claim);
  expect(await two.claimExpired('two', 10_000, 5)).toEqual([]); // not yet
  expect(await one.renew([{ id: mine.job.id, claim: mine.claim }], 300)).toEqual([{ id: mine.job.id, cancelRequested: false }]);
  await new Promise((r) => setTimeout(r, 400));
  const taken = await two.claimExpired('two', 10_000, 5);
  expect(taken).toHaveLength(1);
  expect(taken[0]!.job).toMatchObject({ id: mine.job.id, state: 'running', phase: 'mirror' });
  expect(taken[0]!.claim.epoch).toBeGreaterThan(mine.claim.epoch);
  expect(await one.renew([{ id: mine.job.id, claim: mine.claim }], 300)).toEqual([]);
  await expect(one.phase(mine.job.id, 'ram', mine.claim)).rejects.toMatchObject({ code: 'LEASE_LOST' });
  await expect(one.transition(mine.job.id, 'succeeded', {}, mine.claim)).rejects.toMatchObject({ code: 'LEASE_LOST' });
  await two.transition(mine.job.id, 'queued', { detail: 'rolled back' }, taken[0]!.claim);
  expect((await two.journal(mine.job.id)).map((e) => [e.state, e.detail?.replace(/epoch \d+/, 'epoch N') ?? null])).toEqual([
    ['queued', 'drain: a -> b'],
    ['running', 'claimed by one, epoch N'],
    ['running', null],
    ['running', 'taken over by two, epoch N: the lease of one expired'],
    ['queued', 'rolled back'],
  ]);
});

test('two replicas queueing the same VM at once: one migration, the other answer is it', async () => {
  const [a, b] = await Promise.all([one.enqueue([req('v1')]), two.enqueue([req('v1', 'a', 'c')])]);
  expect(a[0]!.job.id).toBe(b[0]!.job.id);
  expect([a[0]!.existing, b[0]!.existing].sort()).toEqual([false, true]);
});

test('a cancel asked of any replica reaches the lease of the one that runs it', async () => {
  await one.enqueue([req('v1')]);
  const c = (await one.claimQueued('one', 10_000, limits))!;
  await two.requestCancel(c.job.id);
  expect(await one.renew([{ id: c.job.id, claim: c.claim }], 10_000)).toEqual([{ id: c.job.id, cancelRequested: true }]);
});
