/**
 * The pause a guest lived through, measured on the host: the guest prints `tick <n>` at a fixed
 * interval and the host timestamps each line as it arrives. The guest's own clock cannot tell, as
 * it stops with the vCPUs. Lines from several consoles (the source's, then the destination's)
 * merge by arrival time.
 */
export interface TimedLine {
  text: string;
  /** Host time of arrival, ms (performance.now()). */
  at: number;
}

export interface TickerGap {
  /** Largest interval between two consecutive ticks, ms. */
  maxGapMs: number;
  /** When the largest gap began (host time of the tick before it). */
  gapStart: number;
  /** Ticks seen in the window. */
  ticks: number;
}

const TICK = /^tick (\d+)\s*$/;

export function tickerGap(lines: readonly TimedLine[], window: { from?: number; to?: number } = {}): TickerGap {
  const from = window.from ?? -Infinity;
  const to = window.to ?? Infinity;
  const ticks = lines
    .filter((l) => l.at >= from && l.at <= to && TICK.test(l.text))
    .sort((a, b) => a.at - b.at);
  let maxGapMs = 0;
  let gapStart = ticks[0]?.at ?? 0;
  for (let i = 1; i < ticks.length; i++) {
    const gap = ticks[i]!.at - ticks[i - 1]!.at;
    if (gap > maxGapMs) {
      maxGapMs = gap;
      gapStart = ticks[i - 1]!.at;
    }
  }
  return { maxGapMs, gapStart, ticks: ticks.length };
}
