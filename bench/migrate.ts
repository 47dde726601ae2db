/**
 * npm run bench:migrate — real migrations of the tiny guest under TCG, on this machine.
 *
 * Scenarios: idle (256 MiB RAM, 1 GiB qcow2 holding 200 MiB), sparse (8 GiB qcow2 holding 100 MiB),
 * writing (the idle disk, guest writing as fast as it can) in background and in write-blocking
 * copy mode, dirtying (guest dirtying 64 MiB of RAM as fast as it can); and lazy mode beside
 * pre-copy on the same guests (idle-lazy, sparse-8g-lazy, writing-lazy): time until the
 * destination runs, hydration time and bytes, and the guest's own 4 KiB read latency and acked
 * write latency (ferry.probe) on the destination during hydration, against the same figures in
 * the same window length after a pre-copy migration (probe-precopy).
 * `npx tsx bench/migrate.ts writing writing-wb` runs only the named scenarios. Each
 * reports total time, per-phase times, downtime (the engine's, QEMU's, and the guest ticker's
 * largest gap seen from the host) and bytes moved. Beside them, the bound: bytes moved divided by
 * the throughput of a plain NBD copy (qemu-img convert into qemu-nbd) measured in the same run,
 * since machines are noisy and only ratios from one run compare.
 *
 * Prints one JSON document on stdout, then a table on stderr.
 *
 * `npm run bench:migrate -- --suite data-tls [--runs 5] [--variants ...] [--qemu 10.0]`: TLS on the data path beside plain text
 * (bench/data-tls.ts).
 *
 * `npm run bench:migrate -- --suite lazy [--runs 5] [--qemu 7.2,10.0]`: lazy mode's time to
 * destination running beside its minimal-QMP floor (bench/lazy.ts, bench/floor-lazy.ts).
 *
 * `npm run bench:migrate -- --suite convergence [--runs 5] [--qemu 7.2,10.0] ...` runs issue 11's
 * copy-mode benchmark instead (bench/convergence.ts).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { loadGuestImage } from '../src/guest/image.js';
import { reapAll } from '../src/qemu/reaper.js';

import { fmtBytes, GiB, MiB, nbdBaseline, runScenario, type Row, type Scenario } from './scenario.js';
const run = promisify(execFile);

const PROBE = { tickMs: 20, probeMs: 50, write: { rate: 20 } };
const scenarios: Scenario[] = [
  { name: 'idle', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20 } },
  { name: 'idle-lazy', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20 }, options: { mode: 'lazy' } },
  { name: 'sparse-8g-lazy', diskSize: 8 * GiB, fillMiB: 100, workload: { tickMs: 20 }, options: { mode: 'lazy' } },
  // The guest's own I/O latency on the destination: while lazy hydrates at 20 MiB/s, and after precopy.
  { name: 'probe-precopy', diskSize: GiB, fillMiB: 200, workload: PROBE },
  { name: 'probe-lazy', diskSize: GiB, fillMiB: 200, workload: PROBE, options: { mode: 'lazy', hydrationBytesPerSec: 20 * MiB } },
  { name: 'sparse-8g', diskSize: 8 * GiB, fillMiB: 100, workload: { tickMs: 20 } },
  { name: 'writing', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20, write: { rate: 0 } } },
  { name: 'writing-wb', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20, write: { rate: 0 } }, options: { copyMode: 'write-blocking' } },
  { name: 'dirtying', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20, dirty: { mib: 64, mibPerSec: 0 } }, options: { deadlineBaseMs: 60_000, onDeadline: 'force' } },
];

async function main(): Promise<void> {
  const suite = process.argv.indexOf('--suite');
  if (suite >= 0 && process.argv[suite + 1] === 'data-tls') {
    // Issue 16: TLS on the data path beside plain text, N runs each, interleaved (bench/data-tls.ts).
    const { dataTlsSuite } = await import('./data-tls.js');
    return dataTlsSuite();
  }
  if (suite >= 0 && process.argv[suite + 1] === 'lazy') {
    // Issue 11: lazy mode's time to destination running beside its minimal-QMP floor (bench/lazy.ts).
    const { lazySuite } = await import('./lazy.js');
    return lazySuite();
  }
  if (suite >= 0) {
    // Issue 11's convergence benchmark: bench/convergence.ts (its own flags).
    if (process.argv[suite + 1] !== 'convergence') throw new Error(`--suite: unknown '${process.argv[suite + 1] ?? ''}'; known: convergence, data-tls, lazy`);
    const { convergenceSuite } = await import('./convergence.js');
    return convergenceSuite();
  }
  const only = process.argv.slice(2);
  const image = await loadGuestImage();
  const scratch = await mkdtemp(join(tmpdir(), 'ferry-bench-nbd-'));
  let baseline: Awaited<ReturnType<typeof nbdBaseline>>;
  try {
    baseline = await nbdBaseline(scratch, 200);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
  const rows: Row[] = [];
  for (const s of scenarios) {
    if (only.length > 0 && !only.includes(s.name)) continue;
    process.stderr.write(`bench: ${s.name}...\n`);
    rows.push(await runScenario(s, image, baseline.bytesPerSec));
  }
  const doc = {
    bench: 'migrate',
    qemu: (await run('qemu-system-x86_64', ['--version'])).stdout.split('\n')[0],
    accel: 'tcg',
    nbdBaseline: { bytes: baseline.bytes, ms: Math.round(baseline.ms), mibPerSec: Number((baseline.bytesPerSec / MiB).toFixed(1)) },
    reference: {
      note: 'libvirt 9.0 + QEMU 7.2 on this machine, from the issue: idle 256 MiB guest + 1 GiB qcow2 holding 200 MiB ~2.0 s, ~100 ms downtime; 8 GiB holding 100 MiB ~2.6 s',
      idleMs: 2000,
      sparseMs: 2600,
    },
    scenarios: rows,
  };
  process.stdout.write(`${JSON.stringify(doc, null, 2)}\n`);
  const head = ['scenario', 'total ms', 'downtime ms', 'qemu dt', 'tick gap', 'disk sent', 'allocated', 'RAM sent', 'bound ms', 'x bound'];
  const table = rows.map((r) =>
    r.ok
      ? [r.scenario, r.totalMs, r.downtimeMs, r.qemuDowntimeMs ?? '-', r.tickerGapMs, fmtBytes(r.diskBytes), fmtBytes(r.allocatedBytes), fmtBytes(r.ramBytes), r.boundMs, r.ratioToBound].map(String)
      : [r.scenario, `FAILED: ${r.error ?? ''}`],
  );
  const widths = head.map((h, i) => Math.max(h.length, ...table.map((row) => (row[i] ?? '').length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padStart(widths[i] ?? 0)).join('  ');
  process.stderr.write(`\nNBD copy baseline: ${doc.nbdBaseline.mibPerSec} MiB/s\n${line(head)}\n`);
  for (const row of table) process.stderr.write(`${line(row)}\n`);
  const lazyRows = rows.filter((r) => r.ok && (r.destinationRunningMs !== undefined || r.latency));
  if (lazyRows.length > 0) {
    process.stderr.write(`\n${['scenario', 'dest runs ms', 'hydration ms', 'hydrated', 'read p50/p99 us', 'write p50/p99 us'].join('  ')}\n`);
    for (const r of lazyRows) {
      process.stderr.write(
        `${[r.scenario, r.destinationRunningMs ?? `(precopy) ${r.totalMs}`, r.hydrationMs ?? '-', fmtBytes(r.hydratedBytes), r.latency ? `${r.latency.readP50Us}/${r.latency.readP99Us} (${r.latency.reads})` : '-', r.latency ? `${r.latency.writeP50Us}/${r.latency.writeP99Us} (${r.latency.writes})` : '-'].join('  ')}\n`,
      );
    }
  }
  if (rows.some((r) => !r.ok)) process.exitCode = 1;
}

process.on('SIGINT', () => void reapAll().finally(() => process.exit(130)));
await main();
