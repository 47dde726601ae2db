/**
 * The one verifier every cell goes through. It gets what the harness saw (the sampler, the exit
 * code, the settled state of both sides) and says pass or fail with the reasons:
 *   - exactly one running copy at every instant (no sample with both running, no tick twice);
 *   - the outcome the exit code claims is true, and it is one the matrix expects for the phase;
 *   - no acknowledged write lost (verifyDisk on the disks of the side the guest ended on);
 *   - no debris (what the rig lists: QEMUs, jobs, nodes, exports, migrations, files, mounts).
 */
import type { Outcome } from './cells.js';
import type { Sampler } from './sampler.js';

/** What an exit code of migrate-vm claims about where the guest is. */
export function claimOf(code: number | null): Outcome | 'refused' | 'no-exit' {
  switch (code) {
    case 0:
      return 'destination';
    case 1:
    case 130:
      return 'source';
    case 2:
      return 'refused';
    case 3:
      return 'uncertain';
    case 4:
      return 'needs-source';
    case 5:
      return 'nowhere';
    default:
      return 'no-exit';
  }
}

export interface Settled {
  /** The source QEMU's state once settled ('gone' when it exited). */
  source: string;
  /** The destination QEMU's state ('gone' when none is left). */
  destination: string;
  /** Lazy: a destination overlay still has its backing (the source's export), read from its header. */
  overlaysBacked?: boolean;
}

/** Where the guest really is, from the settled state of both sides (a QEMU left over is debris, judged apart). */
export function actualOutcome(s: Settled, ranOnDestination: boolean, lazy = false): Outcome {
  // Lazy, an overlay that still names its backing lacks blocks only the source's disks hold,
  // whether or not the source QEMU is alive to serve them.
  // Pre-copy, a running destination beside a paused source is the state an unanswered `cont` that
  // did arrive leaves (exit 3): the guest is there, the source waits for someone who looked.
  if (s.destination === 'running') return s.source === 'gone' && !s.overlaysBacked ? 'destination' : s.source === 'running' || !lazy ? 'uncertain' : 'needs-source';
  // A destination that ran and now stands still (QEMU stopped it on a disk error): the guest is
  // there; lazy, it waits on reads only the source can serve.
  if (ranOnDestination && s.destination !== 'gone' && s.source !== 'running') return lazy ? 'needs-source' : s.source === 'gone' ? 'destination' : 'uncertain';
  if (s.source === 'running') return 'source';
  if (ranOnDestination) return 'killed';
  return s.source === 'gone' ? 'nowhere' : 'uncertain';
}

export function judge(input: {
  sampler: Sampler;
  claimed: Outcome | 'refused' | 'no-exit';
  actual: Outcome;
  expected: readonly Outcome[];
  /** A killed orchestrator claims nothing: then only `actual` counts (after the watchdog / recover). */
  orchestratorKilled: boolean;
  writes: { ok: boolean; detail: string };
  debris: string[];
}): string[] {
  const problems: string[] = [];
  const both = input.sampler.bothRunning();
  if (both) problems.push(`two copies ran at once: source and destination both 'running' at ${Math.round(both.at)} ms`);
  const twice = input.sampler.doubleTicks();
  if (twice.length) problems.push(`the guest ran twice: tick(s) ${twice.join(', ')} printed on both consoles`);
  if (!input.orchestratorKilled) {
    // A destination killed by the fault after the exit said "destination" is the claim, made true
    // then; a refusal (exit 2) claims only that ferry changed nothing: the guest is where it was.
    const claimed = input.claimed;
    const claimHolds =
      claimed === input.actual ||
      (claimed === 'destination' && input.actual === 'killed') ||
      (claimed === 'refused' && (input.actual === 'source' || input.actual === 'nowhere'));
    if (!claimHolds) problems.push(`exit code says '${input.claimed}' but the guest is '${input.actual}'`);
  }
  if (!input.expected.includes(input.actual)) problems.push(`outcome '${input.actual}', the matrix expects ${input.expected.map((e) => `'${e}'`).join(' or ')}`);
  if (!input.writes.ok) problems.push(`acknowledged writes lost: ${input.writes.detail}`);
  for (const d of input.debris) problems.push(`debris: ${d}`);
  return problems;
}
