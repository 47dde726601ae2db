/** The fault matrix's table: the CI subset covers it, --cells parses, docs/faults.md agrees with it. */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import { allCells, CI_CELLS, EXPECTED, FAULTS, OPEN_FINDINGS, PHASES, rng, selectCells } from '../../faults/cells.js';

test('the CI subset: at least 24 cells of the matrix, every phase and every fault kind at least once', () => {
  const ci = selectCells(CI_CELLS.join(','));
  expect(ci.length).toBe(CI_CELLS.length);
  expect(ci.length).toBeGreaterThanOrEqual(24);
  for (const p of PHASES) expect(ci.some((c) => c.phase === p), p).toBe(true);
  for (const f of FAULTS) expect(ci.some((c) => c.fault === f), f).toBe(true);
  for (const id of Object.keys(OPEN_FINDINGS)) expect(CI_CELLS, id).toContain(id);
});

test('--cells: exact cells, a phase, a fault across phases; a name outside the matrix is one clear error', () => {
  expect(selectCells('mirror/disk-full').map((c) => `${c.phase}/${c.fault}`)).toEqual(['mirror/disk-full']);
  expect(selectCells('hydrate').every((c) => c.phase === 'hydrate')).toBe(true);
  expect(selectCells('*/slow-link').map((c) => c.phase)).toEqual(['mirror', 'ram']);
  expect(selectCells(undefined)).toEqual(allCells());
  expect(() => selectCells('mirror/typo')).toThrow(/'mirror\/typo' names no cell/);
});

test('a seed replays: the same offsets for the same seed and cell, others for another', () => {
  const a = rng(7, 'ram/kill-orchestrator');
  const b = rng(7, 'ram/kill-orchestrator');
  const c = rng(8, 'ram/kill-orchestrator');
  const xs = [a(), a(), a()];
  expect([b(), b(), b()]).toEqual(xs);
  expect([c(), c(), c()]).not.toEqual(xs);
});

test("docs/faults.md's recovery table says what EXPECTED says, cell by cell", async () => {
  const doc = await readFile(join(import.meta.dirname, '../../../docs/faults.md'), 'utf8');
  const start = doc.indexOf('<!-- expected:begin');
  const end = doc.indexOf('<!-- expected:end -->');
  expect(start).toBeGreaterThan(0);
  const rows = doc.slice(start, end).split('\n').filter((l) => l.startsWith('| ') && !l.startsWith('| fault') && !l.startsWith('| ---'));
  const header = doc.slice(start, end).split('\n').find((l) => l.startsWith('| fault'))!;
  const phases = header.split('|').slice(2, -1).map((s) => s.trim());
  expect(phases).toEqual([...PHASES]);
  expect(rows.map((r) => r.split('|')[1]!.trim().replace(/`/g, ''))).toEqual([...FAULTS]);
  for (const row of rows) {
    const cols = row.split('|').slice(1, -1).map((s) => s.trim());
    const fault = cols[0]!.replace(/`/g, '') as (typeof FAULTS)[number];
    phases.forEach((p, i) => {
      const want = EXPECTED[fault][p as (typeof PHASES)[number]];
      const got = cols[i + 1] === '' || cols[i + 1] === '-' ? undefined : cols[i + 1]!.split(/\s*(?:\/|or)\s*/);
      expect(got, `${p}/${fault}`).toEqual(want ? [...want] : undefined);
    });
  }
});
