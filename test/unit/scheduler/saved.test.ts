/** Defect 5: the source's saved settings are persisted with the journal and handed to recovery. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import type { SavedSourceSettings } from '../../../src/engine/types.js';
import { Scheduler } from '../../../src/scheduler/scheduler.js';
import { SqliteStore as SchedulerStore } from '../../../src/scheduler/sqlite-store.js';
import type { MigrationJob } from '../../../src/scheduler/types.js';
import { FakeInventory, FakeRunner, tick } from './fakes.js';

test('the saved settings reported by the engine survive a restart and reach the reconciler with the last phase', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ferry-saved-'));
  try {
    const path = join(dir, 'state.db');
    const saved: SavedSourceSettings = { wasRunning: false, capabilities: [{ capability: 'pause-before-switchover', state: false }], parameters: { 'downtime-limit': 300 } };
    const st1 = new SchedulerStore(path);
    const r1 = new FakeRunner();
    const s1 = new Scheduler({ store: st1, inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]), runner: r1, reconciler: { settle: async () => ({ runsOn: 'from', detail: '' }) } });
    await s1.start();
    const j = (await s1.migrate('v1', { to: 'b' })).job;
    await r1.until(1);
    const ctx = r1.running.get(j.id)!.ctx;
    await ctx.onPhase('ram');
    await ctx.onSourceSaved!(saved);
    expect((await st1.journal(j.id)).at(-1)).toMatchObject({ state: 'running', phase: 'ram', detail: expect.stringMatching(/source saved: paused/) });
    await st1.close(); // the scheduler dies here

    const st2 = new SchedulerStore(path);
    const asked: { job: MigrationJob; saved: SavedSourceSettings | undefined }[] = [];
    const s2 = new Scheduler({
      store: st2,
      inventory: new FakeInventory(['a', 'b'], [['v1', 'a']]),
      runner: new FakeRunner(),
      reconciler: {
        settle: async (job, s) => {
          asked.push({ job, saved: s });
          return { runsOn: 'unknown', detail: 'look' };
        },
      },
    });
    await s2.start();
    await tick(10);
    expect(asked).toEqual([{ job: expect.objectContaining({ id: j.id, phase: 'ram' }), saved }]);
    await st2.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
