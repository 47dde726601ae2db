import { expect, test } from 'vitest';
import { tickerGap } from '../../../src/measure/ticker.js';

test('finds the largest gap between ticks across consoles, ignoring other lines', () => {
  const lines = [
    { text: 'tick 1', at: 0 },
    { text: 'ack d0 3', at: 5 },
    { text: 'tick 2', at: 20 },
    { text: 'tick 3', at: 40 },
    // the destination's console, after a 300 ms pause
    { text: 'tick 4', at: 340 },
    { text: 'tick 5', at: 360 },
  ];
  expect(tickerGap(lines)).toEqual({ maxGapMs: 300, gapStart: 40, ticks: 5 });
});

test('a window limits which ticks count', () => {
  const lines = [0, 500, 520, 540].map((at, i) => ({ text: `tick ${i + 1}`, at }));
  expect(tickerGap(lines, { from: 100 }).maxGapMs).toBe(20);
  expect(tickerGap([], {}).maxGapMs).toBe(0);
});
