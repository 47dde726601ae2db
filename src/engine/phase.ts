/**
 * The phase of one migration only moves forward. `allowTransition` is the one place that says
 * which change is allowed; `PhaseClock` holds the current phase, times each one and logs every
 * change. Phases may be skipped (lazy mode has no mirror, pre-copy no hydration), never revisited.
 *
 *   preflight → prepare-destination → mirror → ram → switchover → confirm → hydrate → cleanup → done
 *   any phase before done → rollback → failed;  any phase before done → failed
 */
import { FerryError } from '../errors.js';
import { PHASES, type Phase } from './types.js';

export class PhaseError extends FerryError {
  override name = 'PhaseError';
}

const ORDER: ReadonlyMap<Phase, number> = new Map(PHASES.map((p, i) => [p, i]));

/** Throws PhaseError(PHASE_BACKWARDS) unless `from → to` moves forward. `from` undefined: the start. */
export function allowTransition(from: Phase | undefined, to: Phase): void {
  const ok = (() => {
    if (from === undefined) return to === 'preflight';
    if (from === 'done' || from === 'failed') return false;
    if (to === 'failed') return true;
    if (from === 'rollback') return false;
    if (to === 'rollback') return true;
    if (to === 'done') return from === 'cleanup';
    return ORDER.get(to)! > ORDER.get(from)!;
  })();
  if (!ok) throw new PhaseError('PHASE_BACKWARDS', `a migration cannot go from phase ${from ?? '(start)'} to ${to}`, { context: { from, to } });
}

export class PhaseClock {
  #phase: Phase | undefined;
  #since = performance.now();
  readonly #ms: Partial<Record<Phase, number>> = {};
  readonly #onChange: (phase: Phase) => void;

  constructor(onChange: (phase: Phase) => void) {
    this.#onChange = onChange;
  }

  /** The current phase ('preflight' before the first `enter`). */
  get phase(): Phase {
    return this.#phase ?? 'preflight';
  }

  enter(to: Phase): void {
    allowTransition(this.#phase, to);
    const now = performance.now();
    if (this.#phase) this.#ms[this.#phase] = (this.#ms[this.#phase] ?? 0) + (now - this.#since);
    this.#phase = to;
    this.#since = now;
    this.#onChange(to);
  }

  /** Milliseconds spent in each phase left so far, rounded. */
  durations(): Partial<Record<Phase, number>> {
    return Object.fromEntries(Object.entries(this.#ms).map(([k, v]) => [k, Math.round(v)]));
  }
}
