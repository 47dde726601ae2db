import { describe, expect, test } from 'vitest';
import { allowTransition, PhaseClock } from '../../../src/engine/phase.js';
import type { Phase } from '../../../src/engine/types.js';

describe('migration phases only move forward', () => {
  test('the exact sequences of pre-copy and lazy are allowed, in order', () => {
    for (const seq of [
      ['preflight', 'prepare-destination', 'mirror', 'ram', 'switchover', 'confirm', 'cleanup', 'done'],
      ['preflight', 'prepare-destination', 'ram', 'switchover', 'confirm', 'hydrate', 'cleanup', 'done'],
      ['preflight', 'prepare-destination', 'mirror', 'rollback', 'failed'],
      ['preflight', 'failed'],
      ['preflight', 'prepare-destination', 'ram', 'switchover', 'confirm', 'hydrate', 'failed'],
    ] as Phase[][]) {
      const seen: Phase[] = [];
      const clock = new PhaseClock((p) => seen.push(p));
      for (const p of seq) clock.enter(p);
      expect(seen).toEqual(seq);
    }
  });

  test.each([
    ['ram', 'mirror'],
    ['confirm', 'switchover'],
    ['hydrate', 'confirm'],
    ['mirror', 'mirror'],
    ['done', 'failed'],
    ['done', 'rollback'],
    ['failed', 'rollback'],
    ['rollback', 'ram'],
    ['mirror', 'done'],
  ] as [Phase, Phase][])('%s → %s is refused', (from, to) => {
    expect(() => allowTransition(from, to)).toThrow(expect.objectContaining({ code: 'PHASE_BACKWARDS' }));
  });

  test('a migration starts in preflight, nowhere else', () => {
    expect(() => allowTransition(undefined, 'mirror')).toThrow(/from phase \(start\) to mirror/);
    const clock = new PhaseClock(() => undefined);
    clock.enter('preflight');
    clock.enter('ram');
    expect(() => clock.enter('prepare-destination')).toThrow(/cannot go from phase ram to prepare-destination/);
    expect(clock.phase).toBe('ram');
  });
});
