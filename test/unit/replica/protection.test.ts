/** The sync loop's order of steps and its undo, with fakes of both sides (the real ones: test/integration/standby*.test.ts). */
import { expect, test } from 'vitest';
import { Protection, type SourceSide, type StandbySide } from '../../../src/replica/protection.js';
import { parseInterval } from '../../../src/scheduler/protect-cli.js';

function sides(fail: { sync?: boolean; complete?: boolean } = {}) {
  const calls: string[] = [];
  let consistent: { seq: number; pointAt: number } | null = { seq: 4, pointAt: 1000 };
  const standby: StandbySide = {
    consistent: async () => consistent,
    prepareSync: async (seq) => {
      calls.push(`standby.prepare ${seq}`);
      return { seq, host: '127.0.0.1', port: 1, exports: { data: `e${seq}` } };
    },
    completeSync: async (seq, f) => {
      calls.push(`standby.complete ${seq}`);
      if (fail.complete) throw new Error('standby gone');
      consistent = { seq, pointAt: f.pointAt };
    },
    abortSync: async (seq) => void calls.push(`standby.abort ${seq}`),
  };
  const source: SourceSide = {
    reconcile: async (seq) => {
      calls.push(`source.reconcile ${seq}`);
      return seq;
    },
    sync: async ({ seq, previous }) => {
      calls.push(`source.sync ${seq} from ${previous}`);
      if (fail.sync) throw new Error('link cut');
      return { seq, pointAt: 2000 + seq, pointAtMono: 0, bytes: 65536, durationMs: 5 };
    },
    commit: async (seq) => void calls.push(`source.commit ${seq}`),
    abort: async (seq) => void calls.push(`source.abort ${seq}`),
  };
  return { calls, standby, source };
}

test('a sync: reconcile once, prepare, back up from the previous bitmap, complete, then drop the older bitmap', async () => {
  const s = sides();
  const p = new Protection({ vm: 'vm1', source: s.source, standby: s.standby, intervalMs: 60_000 });
  expect(p.status().state).toBe('starting');
  await p.syncOnce();
  await p.syncOnce();
  expect(s.calls).toEqual([
    'source.reconcile 4',
    'standby.prepare 5',
    'source.sync 5 from 4',
    'standby.complete 5',
    'source.commit 5',
    'standby.prepare 6',
    'source.sync 6 from 5',
    'standby.complete 6',
    'source.commit 6',
  ]);
  const st = p.status(2006 + 500);
  expect(st).toMatchObject({ state: 'idle', consistentAt: 2006, rpoMs: 500, lastBytes: 65536, syncs: 2, failedSyncs: 0, lastError: null });
  await p.stop();
  expect(p.status().state).toBe('stopped');
});

test('a sync cut on the source: both sides undo it, the point stays, the next sync starts from the same bitmap', async () => {
  const s = sides({ sync: true });
  const p = new Protection({ vm: 'vm1', source: s.source, standby: s.standby, intervalMs: 60_000 });
  await expect(p.syncOnce()).rejects.toThrow('link cut');
  expect(s.calls).toEqual(['source.reconcile 4', 'standby.prepare 5', 'source.sync 5 from 4', 'source.abort 5', 'standby.abort 5']);
  expect(p.status(1500)).toMatchObject({ state: 'failing', consistentAt: 1000, rpoMs: 500, failedSyncs: 1, lastError: 'link cut' });
});

test('the standby failing to mark the sync consistent: undone on both sides, never the older bitmap dropped', async () => {
  const s = sides({ complete: true });
  const p = new Protection({ vm: 'vm1', source: s.source, standby: s.standby, intervalMs: 60_000 });
  await expect(p.syncOnce()).rejects.toThrow('standby gone');
  expect(s.calls).not.toContain('source.commit 5');
  expect(s.calls.slice(-2)).toEqual(['source.abort 5', 'standby.abort 5']);
});

test('--interval: durations, and one clear refusal of anything else', () => {
  expect(parseInterval('30s')).toBe(30_000);
  expect(parseInterval('2m')).toBe(120_000);
  expect(parseInterval('1500ms')).toBe(1500);
  expect(parseInterval('10000')).toBe(10_000);
  expect(() => parseInterval('fast')).toThrow(/--interval: 'fast' is not a duration/);
  expect(() => parseInterval('200ms')).toThrow(/at least 1s/);
});
