/**
 * `npm run bench:migrate -- --suite data-tls [--runs 5]`: TLS on the data path beside plain text,
 * in the same run: the idle guest (1 GiB qcow2 holding 200 MiB) and a guest writing as fast as it
 * can, each migrated N times in plain text and N times over TLS, interleaved (plain, TLS, plain,
 * ...) so that the machine's drift lands on both. Reports median and spread of total time and
 * downtime, and the ratios TLS/plain of the medians (issue 16's goal: <= 1.15x total, <= +20 ms
 * downtime). JSON on stdout, a table on stderr.
 */
import { loadGuestImage } from '../src/guest/image.js';
import { GiB, runScenario, type Row, type Scenario } from './scenario.js';

const base: Scenario[] = [
  { name: 'idle', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20 } },
  { name: 'writer', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20, write: { rate: 0 } } },
];

interface Spread {
  median: number;
  min: number;
  max: number;
}

function spread(xs: number[]): Spread {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
  return { median: Math.round(mid), min: Math.round(s[0] ?? 0), max: Math.round(s.at(-1) ?? 0) };
}

export async function dataTlsSuite(argv: string[] = process.argv.slice(2)): Promise<void> {
  const runsAt = argv.indexOf('--runs');
  const runs = runsAt >= 0 ? Number(argv[runsAt + 1]) : 5;
  if (!Number.isInteger(runs) || runs < 1 || runs > 50) throw new Error(`--runs: a whole number from 1 to 50, got '${argv[runsAt + 1] ?? ''}'`);
  const image = await loadGuestImage();
  const rows: (Row & { tls: boolean; run: number })[] = [];
  for (let run = 0; run < runs; run++) {
    for (const s of base) {
      for (const tls of [false, true]) {
        process.stderr.write(`bench data-tls: ${s.name} ${tls ? 'tls' : 'plain'} run ${run + 1}/${runs}...\n`);
        // No NBD baseline here: the ratio that matters is TLS against plain, measured side by side.
        rows.push({ ...(await runScenario({ ...s, name: `${s.name}-${tls ? 'tls' : 'plain'}`, tls }, image, 1)), tls, run });
      }
    }
  }
  const summary = base.map((s) => {
    const of = (tls: boolean): Row[] => rows.filter((r) => r.ok && r.tls === tls && r.scenario === `${s.name}-${tls ? 'tls' : 'plain'}`);
    const pick = (tls: boolean, f: (r: Row) => number | undefined): Spread => spread(of(tls).map(f).filter((x): x is number => x !== undefined));
    const plain = { totalMs: pick(false, (r) => r.totalMs), downtimeMs: pick(false, (r) => r.downtimeMs), qemuDowntimeMs: pick(false, (r) => r.qemuDowntimeMs) };
    const tls = { totalMs: pick(true, (r) => r.totalMs), downtimeMs: pick(true, (r) => r.downtimeMs), qemuDowntimeMs: pick(true, (r) => r.qemuDowntimeMs) };
    return {
      scenario: s.name,
      runs: { plain: of(false).length, tls: of(true).length, encrypted: of(true).every((r) => r.encrypted === true) },
      plain,
      tls,
      totalRatio: Number((tls.totalMs.median / Math.max(1, plain.totalMs.median)).toFixed(2)),
      addedDowntimeMs: tls.downtimeMs.median - plain.downtimeMs.median,
      addedQemuDowntimeMs: tls.qemuDowntimeMs.median - plain.qemuDowntimeMs.median,
    };
  });
  process.stdout.write(`${JSON.stringify({ bench: 'data-tls', runs, summary, rows }, null, 2)}\n`);
  const fmt = (x: Spread): string => `${x.median} [${x.min}..${x.max}]`;
  process.stderr.write(`\n${['scenario', 'plain total ms', 'TLS total ms', 'x', 'plain downtime', 'TLS downtime', '+ms', 'QEMU dt plain/TLS'].join(' | ')}\n`);
  for (const r of summary) {
    process.stderr.write(`${[r.scenario, fmt(r.plain.totalMs), fmt(r.tls.totalMs), r.totalRatio, fmt(r.plain.downtimeMs), fmt(r.tls.downtimeMs), r.addedDowntimeMs, `${r.plain.qemuDowntimeMs.median}/${r.tls.qemuDowntimeMs.median}`].join(' | ')}\n`);
  }
  if (rows.some((r) => !r.ok)) process.exitCode = 1;
}
