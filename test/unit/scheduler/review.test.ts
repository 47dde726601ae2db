/** Defects a review of the scheduler found, each pinned by the test that showed it. */
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { Scheduler } from '../../../src/scheduler/scheduler.js';
import { SqliteStore as SchedulerStore } from '../../../src/scheduler/sqlite-store.js';
import type { MigrationJob } from '../../../src/scheduler/types.js';
import { tempDir } from '../../helpers/tmp.js';
import { FakeInventory, FakeReconciler, FakeRunner, migrated, tick } from './fakes.js';

const within = <T>(p: Promise<T>, ms: number): Promise<T | 'TIMEOUT'> => Promise.race([p, new Promise<'TIMEOUT'>((r) => setTimeout(r, ms, 'TIMEOUT'))]);

describe('scheduler review', () => {
  test('A: stop() returns while migrations are still queued behind the limits', async () => {
    const store = new SchedulerStore(':memory:');
    const runner = new FakeRunner();
    const s = new Scheduler({ store, inventory: new FakeInventory(['a', 'b'], [['v1', 'a'], ['v2', 'a']]), runner, reconciler: new FakeReconciler(), limits: { outgoingPerHost: 1 } });
    await s.start();
    await s.migrate('v1', { to: 'b' });
    await s.migrate('v2', { to: 'b' });
    await runner.until(1);
    expect(await within(s.stop(50), 1_000)).not.toBe('TIMEOUT');
  });

  test('B: a job to a free destination is not stuck behind jobs waiting for a full destination', async () => {
    const store = new SchedulerStore(':memory:');
    const runner = new FakeRunner();
    const s = new Scheduler({ store, inventory: new FakeInventory(['a', 'b', 'e'], [['v1', 'a'], ['v2', 'a'], ['v3', 'a']]), runner, reconciler: new FakeReconciler(), limits: { outgoingPerHost: 2, incomingPerHost: 1 } });
    await s.start();
    await s.migrate('v1', { to: 'e' });
    await runner.until(1);
    await s.migrate('v2', { to: 'e' });
    await s.migrate('v3', { to: 'b' });
    await tick(50);
    expect(runner.started.map((j) => j.vm)).toEqual(['v1', 'v3']);
  });

  test('C: start() does not hang forever on a reconciler that never answers', async () => {
    const path = join(await tempDir('ferry-probe-'), 'state.db');
    const st1 = new SchedulerStore(path);
    const r1 = new FakeRunner();
    const s1 = new Scheduler({ store: st1, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner: r1, reconciler: new FakeReconciler() });
    await s1.start();
    await s1.migrate('v1', { to: 'b' });
    await r1.until(1);
    await st1.close();
    const st2 = new SchedulerStore(path);
    const s2 = new Scheduler({ store: st2, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner: new FakeRunner(), reconciler: { settle: () => new Promise<never>(() => {}) }, settleTimeoutMs: 200 });
    expect(await within(s2.start(), 3_000)).not.toBe('TIMEOUT');
    expect((await st2.inState('failed'))[0]).toMatchObject({ vm: 'v1', error: expect.stringMatching(/^needs operator: settling .* took more than 200 ms/) });
  });

  test('D: recovery does not run again a migration that already used all its attempts', async () => {
    const path = join(await tempDir('ferry-probe-d-'), 'state.db');
    const st1 = new SchedulerStore(path);
    const r1 = new FakeRunner();
    const s1 = new Scheduler({ store: st1, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner: r1, reconciler: new FakeReconciler(), retry: { maxAttempts: 1 } });
    await s1.start();
    const j = (await s1.migrate('v1', { to: 'b' })).job;
    await r1.until(1);
    await st1.close();
    const st2 = new SchedulerStore(path);
    const r2 = new FakeRunner();
    r2.auto = 'finish';
    const s2 = new Scheduler({ store: st2, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner: r2, reconciler: new FakeReconciler(), retry: { maxAttempts: 1 } });
    await s2.start();
    await tick(30);
    expect({ runs: r2.started.length, state: (await st2.get(j.id))!.state, attempts: (await st2.get(j.id))!.attempts }).toEqual({ runs: 0, state: 'failed', attempts: 1 });
  });

  test('E: a phase reported after the migration ended does not journal "running" after a terminal state', async () => {
    const store = new SchedulerStore(':memory:');
    let ctxOf: ((p: string) => Promise<void> | void) | undefined;
    const s = new Scheduler({ store, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), reconciler: new FakeReconciler(), runner: { run: async (j: MigrationJob, ctx) => { ctxOf = ctx.onPhase; return migrated(j); } } });
    await s.start();
    const j = (await s.migrate('v1', { to: 'b' })).job;
    await tick(20);
    await ctxOf!('late-phase');
    expect((await store.journal(j.id)).map((e) => e.state)).toEqual(['queued', 'running', 'succeeded']);
  });
});

test('F: the next seq and the recent list use an index, not a walk over all history', async () => {
  const { default: Database } = await import('better-sqlite3');
  const path = join(await tempDir('ferry-review-f-'), 'state.db');
  await new SchedulerStore(path).close();
  const db = new Database(path, { readonly: true });
  const plan = (sql: string): string => (db.prepare(`EXPLAIN QUERY PLAN ${sql}`).all() as { detail: string }[]).map((r) => r.detail).join('; ');
  expect(db.pragma('user_version', { simple: true })).toBeGreaterThanOrEqual(2);
  expect(plan('SELECT COALESCE(MAX(seq), 0) + 1 FROM migrations')).toMatch(/migrations_by_seq/);
  expect(plan('SELECT * FROM migrations ORDER BY seq DESC LIMIT 100')).toMatch(/migrations_by_seq/);
  db.close();
});
