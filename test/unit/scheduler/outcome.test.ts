/** The scheduler acts on the engine's outcome: a failure past the point of no return is never retried. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { MigrationError } from '../../../src/engine/types.js';
import { Scheduler } from '../../../src/scheduler/scheduler.js';
import { SqliteStore as SchedulerStore } from '../../../src/scheduler/sqlite-store.js';
import { FakeInventory, FakeReconciler, FakeRunner, tick } from './fakes.js';

function setup() {
  const store = new SchedulerStore(':memory:');
  const runner = new FakeRunner();
  const scheduler = new Scheduler({ store, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner, reconciler: new FakeReconciler(), retry: { baseDelayMs: 10 } });
  return { store, runner, scheduler };
}

describe('scheduler and the engine outcome', () => {
  test('defect 1: a hydration failure (guest on the destination, needs the source) is never retried and says so', async () => {
    const { store, runner, scheduler } = setup();
    await scheduler.start();
    const j = (await scheduler.migrate('v1', { to: 'b' })).job;
    await runner.until(1);
    runner.running.get(j.id)!.fail(
      new MigrationError('HYDRATION_FAILED', 'hydration failed after 3 attempts', { phase: 'hydrate', outcome: 'onDestinationNeedsSource' }),
    );
    await tick(100); // several backoffs of 10 ms: a retry would have started by now
    expect(runner.started).toHaveLength(1);
    expect((await store.get(j.id))).toMatchObject({ state: 'needs-source', error: expect.stringMatching(/runs on b .*needs the source a/) });
    await scheduler.stop(10);
  });

  test.each([
    ['to', 'succeeded'],
    ['unknown', 'needs-source'],
  ] as const)('a needs-source migration at the next start, reconciler says %s: %s', async (answer, end) => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-needs-'));
    try {
      const path = join(dir, 'state.db');
      const st1 = new SchedulerStore(path);
      const r1 = new FakeRunner();
      const s1 = new Scheduler({ store: st1, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner: r1, reconciler: new FakeReconciler() });
      await s1.start();
      const j = (await s1.migrate('v1', { to: 'b', mode: 'lazy' })).job;
      await r1.until(1);
      await r1.running.get(j.id)!.ctx.onPhase('hydrate');
      r1.running.get(j.id)!.fail(new MigrationError('HYDRATION_FAILED', 'x', { phase: 'hydrate', outcome: 'onDestinationNeedsSource' }));
      await tick(20);
      expect((await st1.get(j.id))!.state).toBe('needs-source');
      await st1.close();
      const st2 = new SchedulerStore(path);
      const reconciler = new FakeReconciler();
      reconciler.answer = answer;
      const s2 = new Scheduler({ store: st2, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner: new FakeRunner(), reconciler });
      await s2.start();
      expect(reconciler.asked).toEqual(['v1']);
      expect((await st2.get(j.id))).toMatchObject({ state: end, phase: 'hydrate' });
      await st2.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
