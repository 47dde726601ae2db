/** The fault matrix's verifier on made-up observations: each rule fails a cell that breaks it. */
import { expect, test } from 'vitest';
import { Sampler } from '../../faults/sampler.js';
import { actualOutcome, claimOf, judge } from '../../faults/verdict.js';

const none = { runDirs: async () => [] as string[] };
const clean = { ok: true, detail: '' };

function sampler(lines: { source: string[]; destination: string[] }, samples: { source: string; destination: string }[] = [], exact = true): Sampler {
  const s = new Sampler(none, none, exact);
  for (const l of lines.source) s.noteLine('source', l);
  for (const l of lines.destination) s.noteLine('destination', l);
  s.samples.push(...samples.map((x, i) => ({ at: i * 100, ...x })));
  return s;
}

test('a clean switchover passes: ticks move from one console to the other, the exit code says where', () => {
  const s = sampler({ source: ['tick 1', 'tick 2', 'ack data 5'], destination: ['tick 3', 'ack data 6'] }, [{ source: 'running', destination: 'paused' }, { source: 'gone', destination: 'running' }]);
  expect(judge({ sampler: s, claimed: claimOf(0), actual: 'destination', expected: ['destination'], orchestratorKilled: false, writes: clean, debris: [] })).toEqual([]);
  expect(s.acks.get('data')).toBe(6);
});

test('the same tick on both consoles: the guest ran twice', () => {
  const s = sampler({ source: ['tick 1', 'tick 2', 'tick 3'], destination: ['tick 3', 'tick 4'] });
  expect(judge({ sampler: s, claimed: 'source', actual: 'source', expected: ['source'], orchestratorKilled: false, writes: clean, debris: [] })).toEqual([expect.stringMatching(/ran twice: tick\(s\) 3/)]);
});

test('both running in one sample fails on the local rig, and is left to the ticks on the netns rig', () => {
  const samples = [{ source: 'running', destination: 'running' }];
  const local = sampler({ source: [], destination: [] }, samples);
  expect(judge({ sampler: local, claimed: 'source', actual: 'source', expected: ['source'], orchestratorKilled: false, writes: clean, debris: [] })).toEqual([expect.stringMatching(/two copies ran at once/)]);
  const netns = sampler({ source: [], destination: [] }, samples, false);
  expect(judge({ sampler: netns, claimed: 'source', actual: 'source', expected: ['source'], orchestratorKilled: false, writes: clean, debris: [] })).toEqual([]);
});

test('an exit code that lies, an unexpected outcome, a lost write and debris each fail the cell', () => {
  const s = sampler({ source: [], destination: [] });
  const problems = judge({ sampler: s, claimed: claimOf(1), actual: 'nowhere', expected: ['source'], orchestratorKilled: false, writes: { ok: false, detail: 'missing 3' }, debris: ['host B still holds data.qcow2'] });
  expect(problems).toEqual([
    "exit code says 'source' but the guest is 'nowhere'",
    "outcome 'nowhere', the matrix expects 'source'",
    'acknowledged writes lost: missing 3',
    'debris: host B still holds data.qcow2',
  ]);
  // A refusal claims only that nothing changed; a killed orchestrator claims nothing.
  expect(judge({ sampler: s, claimed: claimOf(2), actual: 'nowhere', expected: ['nowhere'], orchestratorKilled: false, writes: clean, debris: [] })).toEqual([]);
  expect(judge({ sampler: s, claimed: 'no-exit', actual: 'source', expected: ['source'], orchestratorKilled: true, writes: clean, debris: [] })).toEqual([]);
});

test('where the guest is, from the settled run states', () => {
  expect(actualOutcome({ source: 'gone', destination: 'running' }, true)).toBe('destination');
  // lazy: the paused source still serves what the destination lacks; pre-copy: an unanswered
  // `cont` that arrived (the link cut right after it), exit 3 the truth (seed 23)
  expect(actualOutcome({ source: 'postmigrate', destination: 'running' }, true, true)).toBe('needs-source');
  expect(actualOutcome({ source: 'postmigrate', destination: 'running' }, true)).toBe('uncertain');
  expect(actualOutcome({ source: 'running', destination: 'paused' }, false)).toBe('source');
  expect(actualOutcome({ source: 'gone', destination: 'gone' }, true)).toBe('killed');
  expect(actualOutcome({ source: 'gone', destination: 'gone' }, false)).toBe('nowhere');
  expect(actualOutcome({ source: 'paused', destination: 'gone' }, false)).toBe('uncertain');
  expect(actualOutcome({ source: 'running', destination: 'running' }, true)).toBe('uncertain');
  // lazy: the source died mid-hydration, the destination stands on a read it cannot serve
  expect(actualOutcome({ source: 'gone', destination: 'io-error' }, true, true)).toBe('needs-source');
  expect(actualOutcome({ source: 'gone', destination: 'io-error' }, true)).toBe('destination');
  // Lazy, the source dead: the guest runs on B, but its overlay still reads from A's disks.
  expect(actualOutcome({ source: 'gone', destination: 'running', overlaysBacked: true }, true, true)).toBe('needs-source');
  expect(actualOutcome({ source: 'gone', destination: 'running', overlaysBacked: false }, true, true)).toBe('destination');
});
