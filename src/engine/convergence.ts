/**
 * The convergence policy of the RAM phase, pure: given what QEMU reported at one poll, what to do.
 * No QMP, no clock: the caller samples and acts (migrate.ts), the unit tests drive it directly.
 *
 *   - Each new dirty sync that did not end the iteration counts; from the 4th sync on, every two
 *     of them step the downtime limit up by half, up to `maxDowntimeLimitMs`.
 *   - Past the deadline, once: `abort` gives up (the guest stays on the source), `force` sets a
 *     downtime limit large enough for what remains (twice its transfer time at the current rate,
 *     at least the max limit, at most 10 minutes) so QEMU stops and switches over at the next
 *     iteration.
 */
export interface ConvergencePolicy {
  maxDowntimeLimitMs: number;
  onDeadline: 'abort' | 'force';
  deadlineMs: number;
}

export interface ConvergenceState {
  downtimeLimitMs: number;
  steps: number;
  forced: boolean;
  lastSync: number;
  syncsAtLimit: number;
}

export interface ConvergenceSample {
  dirtySyncCount: number;
  remainingBytes: number;
  /** QEMU's measured rate, Mbit/s; undefined before it has one. */
  mbps: number | undefined;
  pastDeadline: boolean;
}

export type ConvergenceAction =
  | { action: 'downtime-step'; downtimeLimitMs: number; detail: string }
  | { action: 'deadline-abort'; downtimeLimitMs: number; detail: string }
  | { action: 'deadline-force'; downtimeLimitMs: number; detail: string };

/** The longest pause a forced switchover may ask for, ms. */
export const MAX_FORCED_DOWNTIME_MS = 600_000;

export function startConvergence(downtimeLimitMs: number): ConvergenceState {
  return { downtimeLimitMs, steps: 0, forced: false, lastSync: 0, syncsAtLimit: 0 };
}

/** The next state and the actions (in order) for one poll. */
export function decideConvergence(state: ConvergenceState, sample: ConvergenceSample, policy: ConvergencePolicy): { state: ConvergenceState; actions: ConvergenceAction[] } {
  let next = { ...state };
  const actions: ConvergenceAction[] = [];
  const sync = sample.dirtySyncCount;
  if (sync > next.lastSync) {
    if (next.lastSync > 0 && sync >= 4) next.syncsAtLimit++;
    next.lastSync = sync;
    if (next.syncsAtLimit >= 2 && next.downtimeLimitMs < policy.maxDowntimeLimitMs) {
      const limit = Math.min(policy.maxDowntimeLimitMs, Math.ceil(next.downtimeLimitMs * 1.5));
      next = { ...next, syncsAtLimit: 0, downtimeLimitMs: limit, steps: next.steps + 1 };
      actions.push({ action: 'downtime-step', downtimeLimitMs: limit, detail: `RAM not converging after ${sync} dirty syncs` });
    }
  }
  if (sample.pastDeadline && !next.forced) {
    const detail = `deadline of ${policy.deadlineMs} ms passed`;
    if (policy.onDeadline === 'abort') {
      actions.push({ action: 'deadline-abort', downtimeLimitMs: next.downtimeLimitMs, detail });
      return { state: next, actions };
    }
    const bytesPerMs = Math.max(1, (sample.mbps ?? 100) * 125);
    const needed = Math.min(MAX_FORCED_DOWNTIME_MS, Math.max(policy.maxDowntimeLimitMs, Math.ceil((sample.remainingBytes / bytesPerMs) * 2)));
    next = { ...next, forced: true, downtimeLimitMs: needed, steps: next.steps + 1 };
    actions.push({ action: 'deadline-force', downtimeLimitMs: needed, detail });
  }
  return { state: next, actions };
}
