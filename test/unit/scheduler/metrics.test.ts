import { describe, expect, test } from 'vitest';
import { MigrationError } from '../../../src/engine/types.js';
import { SchedulerMetrics } from '../../../src/scheduler/metrics.js';
import { Scheduler } from '../../../src/scheduler/scheduler.js';
import { SqliteStore } from '../../../src/scheduler/sqlite-store.js';
import { FakeInventory, FakeReconciler, FakeRunner, tick } from './fakes.js';

/** The value of one series in Prometheus' text format, or undefined when it is absent. */
function value(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

describe('scheduler metrics', () => {
  test('outcomes, durations, downtime, bytes, queue depth, in flight and phase age follow a drain', async () => {
    const store = new SqliteStore(':memory:');
    const runner = new FakeRunner();
    const scheduler = new Scheduler({ store, inventory: new FakeInventory(['a', 'b', 'c'], [['v1', 'a'], ['v2', 'a'], ['v3', 'a']]), runner, reconciler: new FakeReconciler(), limits: { outgoingPerHost: 2 }, retry: { maxAttempts: 1 } });
    const metrics = new SchedulerMetrics(scheduler, { queued: () => store.inState('queued'), running: () => store.inState('running') }, ['a', 'b', 'c']);
    await scheduler.start();
    try {
      let text = (await metrics.render()).body;
      expect(value(text, 'ferry_scheduler_queue_depth{host="a"}')).toBe(0);
      expect(value(text, 'ferry_scheduler_lease_takeovers_total')).toBe(0);
      expect(value(text, 'ferry_scheduler_stale_calls_refused_total')).toBe(0);
      expect(value(text, 'ferry_migration_bytes_total{kind="disk"}')).toBe(0);

      await scheduler.drain('a');
      await runner.until(2);
      const [first] = [...runner.running.values()];
      await first!.ctx.onPhase('mirror');
      text = (await metrics.render()).body;
      expect(value(text, 'ferry_scheduler_queue_depth{host="a"}')).toBe(1);
      expect(value(text, 'ferry_scheduler_in_flight{host="a",direction="out"}')).toBe(2);
      expect(value(text, 'ferry_scheduler_in_flight{host="a",direction="in"}')).toBe(0);
      const phase = text.split('\n').filter((l) => l.startsWith('ferry_migration_phase_seconds{'));
      expect(phase).toHaveLength(2);
      expect(phase.join('\n')).toContain(`id="${first!.job.id}",vm="${first!.job.vm}",from="a",to="${first!.job.to}",phase="mirror"`);

      first!.finish();
      // The second fails before the engine touched anything, and is not retried (maxAttempts 1).
      [...runner.running.values()][0]!.fail(new MigrationError('PREFLIGHT', 'no room', { phase: 'preflight', outcome: 'rolledBack' }));
      await runner.until(1);
      runner.finishAll();
      for (let i = 0; i < 100 && (await store.inState('succeeded')).length + (await store.inState('failed')).length < 3; i++) await tick(5);
      text = (await metrics.render()).body;
      expect(value(text, 'ferry_migrations_total{outcome="succeeded",mode="precopy"}')).toBe(2);
      expect(value(text, 'ferry_migrations_total{outcome="failed",mode="precopy"}')).toBe(1);
      expect(value(text, 'ferry_migration_duration_seconds_count{outcome="succeeded",mode="precopy"}')).toBe(2);
      expect(value(text, 'ferry_migration_downtime_seconds_count{mode="precopy"}')).toBe(2);
      expect(value(text, 'ferry_migration_downtime_seconds_sum{mode="precopy"}')).toBeCloseTo(0.084);
      expect(value(text, 'ferry_migration_bytes_total{kind="disk"}')).toBe(2000);
      expect(value(text, 'ferry_migration_bytes_total{kind="ram"}')).toBe(1000);
      expect(value(text, 'ferry_migration_failures_total{code="PREFLIGHT",phase="preflight"}')).toBe(1);
      expect(value(text, 'ferry_scheduler_queue_depth{host="a"}')).toBe(0);
      expect(value(text, 'ferry_scheduler_in_flight{host="a",direction="out"}')).toBe(0);
      expect(text).not.toMatch(/^ferry_migration_phase_seconds\{/m);

      metrics.recordLeaseTakeover();
      metrics.recordStaleCallRefused(2);
      text = (await metrics.render()).body;
      expect(value(text, 'ferry_scheduler_lease_takeovers_total')).toBe(1);
      expect(value(text, 'ferry_scheduler_stale_calls_refused_total')).toBe(2);
    } finally {
      metrics.close();
      await scheduler.stop(0);
      store.close();
    }
  });
});
