/**
 * `npm run faults [-- --cells a/b,c/* --seed N --json FILE]`: runs the fault matrix (every cell by
 * default), one cell at a time, a progress line per cell on stderr; then the table (phase x fault:
 * pass/FAIL, outcome, seconds) on stdout and every result as JSON in bench/results/. A failed cell
 * prints its seed and the command that replays it. Exit 1 when any cell failed.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { cellId, FAULTS, PHASES, rigOf, selectCells, type Cell } from './cells.js';
import { runLocalCell, type CellResult } from './local-rig.js';
import { REPO } from './orchestrator.js';
import { NetnsRig } from './netns-rig.js';
import { StandbyRig } from './standby-rig.js';

export async function runCells(cells: Cell[], seed: number, log: (line: string) => void, stop: AbortSignal = new AbortController().signal): Promise<CellResult[]> {
  const results: CellResult[] = [];
  let netns: NetnsRig | undefined;
  let standby: StandbyRig | undefined;
  try {
    for (const [i, cell] of cells.entries()) {
      if (stop.aborted) break;
      log(`[${i + 1}/${cells.length}] ${cellId(cell)} (seed ${seed}) ...`);
      let r: CellResult;
      const rig = rigOf(cell);
      if (rig === 'netns') {
        await standby?.close();
        standby = undefined;
        netns ??= await NetnsRig.create();
        r = await netns.runCell(cell, seed);
      } else if (rig === 'standby') {
        // Its own namespaces (the same names as the netns rig's): one rig's pair at a time.
        await netns?.close();
        netns = undefined;
        standby ??= await StandbyRig.create();
        r = await standby.runCell(cell, seed);
      } else {
        r = await runLocalCell(cell, seed);
      }
      results.push(r);
      log(`[${i + 1}/${cells.length}] ${r.id}: ${r.pass ? 'pass' : 'FAIL'} (${r.outcome}, exit ${r.exit}, hit ${r.hitPhase ?? '-'} +${r.offsetMs} ms, ${r.seconds} s)${r.notes.length ? ` [${r.notes.join('; ')}]` : ''}`);
      if (!r.pass) log(`    ${r.problems.join('\n    ')}\n    replay: ${r.replay}`);
    }
  } finally {
    await netns?.close();
    await standby?.close();
  }
  return results;
}

export function renderTable(results: CellResult[]): string {
  const faults = FAULTS.filter((f) => results.some((r) => r.fault === f));
  const phases = PHASES.filter((p) => results.some((r) => r.phase === p));
  const head = `| phase | ${faults.join(' | ')} |\n| --- |${faults.map(() => ' --- |').join('')}`;
  const rows = phases.map((p) => {
    const cells = faults.map((f) => {
      const r = results.find((x) => x.phase === p && x.fault === f);
      return r ? `${r.pass ? 'pass' : '**FAIL**'} ${r.outcome} ${r.seconds}s` : '';
    });
    return `| ${p} | ${cells.join(' | ')} |`;
  });
  return [head, ...rows].join('\n');
}

async function main(): Promise<number> {
  const { values } = parseArgs({ options: { cells: { type: 'string' }, seed: { type: 'string' }, out: { type: 'string' } }, strict: true });
  const seed = values.seed === undefined ? Math.floor(Math.random() * 1_000_000) : Number(values.seed);
  if (!Number.isInteger(seed) || seed < 0) throw new Error(`--seed: '${values.seed}' is not a non-negative integer`);
  const cells = selectCells(values.cells);
  process.stderr.write(`fault matrix: ${cells.length} cell(s), seed ${seed}\n`);
  const t0 = performance.now();
  // Ctrl-C: the cell under way ends (and cleans up after itself), no other starts; twice: now.
  const stop = new AbortController();
  const onSignal = (): void => {
    if (stop.signal.aborted) process.exit(130);
    stop.abort();
    process.stderr.write('faults: stopping after this cell (again to quit at once, leaving its QEMUs, mounts and namespaces)\n');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const results = await runCells(cells, seed, (l) => process.stderr.write(`${l}\n`), stop.signal);
  const failed = results.filter((r) => !r.pass);
  process.stdout.write(`\n${renderTable(results)}\n\n${results.length - failed.length}/${results.length} passed, seed ${seed}, ${Math.round((performance.now() - t0) / 1000)} s\n`);
  for (const f of failed) process.stdout.write(`FAIL ${f.id} (seed ${f.seed}): ${f.problems.join('; ')}\n  replay: ${f.replay}\n`);
  const out = values.out ?? join(REPO, 'bench', 'results', `faults-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  await mkdir(join(out, '..'), { recursive: true });
  await writeFile(out, `${JSON.stringify({ seed, startedAt: new Date().toISOString(), results }, null, 2)}\n`);
  process.stdout.write(`results: ${out}\n`);
  return failed.length ? 1 : 0;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`faults: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exit(2);
    },
  );
}
