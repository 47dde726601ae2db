import { describe, expect, test } from 'vitest';
import { decideConvergence, MAX_FORCED_DOWNTIME_MS, startConvergence, type ConvergencePolicy, type ConvergenceState } from '../../../src/engine/convergence.js';

const policy: ConvergencePolicy = { maxDowntimeLimitMs: 2_000, onDeadline: 'abort', deadlineMs: 60_000 };
const sample = (dirtySyncCount: number, extra: { pastDeadline?: boolean; remainingBytes?: number; mbps?: number } = {}) => ({
  dirtySyncCount,
  remainingBytes: extra.remainingBytes ?? 0,
  mbps: extra.mbps,
  pastDeadline: extra.pastDeadline ?? false,
});

/** Feeds the syncs one poll each; returns the downtime limits asked for. */
function run(syncs: number[], p = policy, start: ConvergenceState = startConvergence(300)): { limits: number[]; state: ConvergenceState } {
  let state = start;
  const limits: number[] = [];
  for (const s of syncs) {
    const r = decideConvergence(state, sample(s), p);
    state = r.state;
    for (const a of r.actions) limits.push(a.downtimeLimitMs);
  }
  return { limits, state };
}

describe('convergence policy', () => {
  test('the first syncs change nothing; from the 4th, every second new sync steps the limit up by half', () => {
    expect(run([1, 2, 3]).limits).toEqual([]);
    expect(run([1, 2, 3, 4, 5]).limits).toEqual([450]);
    expect(run([1, 2, 3, 4, 5, 6, 7, 8, 9]).limits).toEqual([450, 675, 1013]);
  });

  test('a poll without a new sync counts nothing', () => {
    expect(run([1, 2, 3, 4, 4, 4, 4, 4]).limits).toEqual([]);
  });

  test('the limit never passes the maximum, and stops stepping there', () => {
    const { limits, state } = run(Array.from({ length: 40 }, (_, i) => i + 1));
    expect(limits.at(-1)).toBe(2_000);
    expect(limits.filter((l) => l === 2_000)).toHaveLength(1);
    expect(state).toMatchObject({ downtimeLimitMs: 2_000, steps: limits.length, forced: false });
  });

  test('past the deadline with policy abort: one abort action, nothing forced', () => {
    const r = decideConvergence(startConvergence(300), sample(2, { pastDeadline: true }), policy);
    expect(r.actions).toEqual([{ action: 'deadline-abort', downtimeLimitMs: 300, detail: 'deadline of 60000 ms passed' }]);
    expect(r.state.forced).toBe(false);
  });

  test('past the deadline with policy force: a limit for what remains, once', () => {
    const force = { ...policy, onDeadline: 'force' as const };
    // 100 MB at 800 Mbit/s (100 kB/ms) is 1000 ms; twice that, but at least the max limit.
    const r = decideConvergence(startConvergence(300), sample(2, { pastDeadline: true, remainingBytes: 100e6, mbps: 800 }), force);
    expect(r.actions).toEqual([{ action: 'deadline-force', downtimeLimitMs: 2_000, detail: 'deadline of 60000 ms passed' }]);
    expect(r.state).toMatchObject({ forced: true, downtimeLimitMs: 2_000, steps: 1 });
    const big = decideConvergence(startConvergence(300), sample(2, { pastDeadline: true, remainingBytes: 10e9, mbps: 80 }), force);
    expect(big.actions[0]!.downtimeLimitMs).toBe(MAX_FORCED_DOWNTIME_MS);
    expect(decideConvergence(r.state, sample(3, { pastDeadline: true }), force).actions).toEqual([]);
  });

  test('a QEMU without a rate yet is taken at 100 Mbit/s', () => {
    const r = decideConvergence(startConvergence(300), sample(1, { pastDeadline: true, remainingBytes: 50e6 }), { ...policy, onDeadline: 'force', maxDowntimeLimitMs: 100 });
    expect(r.actions[0]!.downtimeLimitMs).toBe(8_000); // 50 MB at 12.5 kB/ms = 4000 ms, twice
  });
});
