/** The scheduler acts on the engine's outcome: a failure past the point of no return is never retried. */
import { describe, expect, test } from 'vitest';
import { MigrationError } from '../../../src/engine/types.js';
import { Scheduler } from '../../../src/scheduler/scheduler.js';
import { SchedulerStore } from '../../../src/scheduler/store.js';
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
    expect(store.get(j.id)).toMatchObject({ state: 'needs-source', error: expect.stringMatching(/runs on b .*needs the source a/) });
    await scheduler.stop(10);
  });
});
