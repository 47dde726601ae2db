/**
 * npm run bench:migrate -- --suite convergence [--runs 5] [--qemu 7.2,10.0] [--scenarios demo,write-200,write-max]
 *   [--modes auto,background,write-blocking] [--no-floor] [--estimate]
 *
 * Issue 11's benchmark: the demo's guest (100 records/s), 200 writes/s and a writer as fast as it
 * can, each in copy mode auto, background and write-blocking, on QEMU 7.2 (the system's) and 10.0
 * (the bootstrap's, .cache/qemu-10.0), N runs each. Per run: total, mirror-to-READY (and, on the
 * active-sync path, write-blocking and actively-synced), downtime (the engine's, QEMU's, the
 * guest ticker's largest gap), disk bytes sent / allocated, and the guest's 4 KiB write latency
 * p50/p99 (ferry.probe, every 50 ms) from the mirrors' start to their convergence. Beside them, in
 * the same run, bench/floor.ts's raw-QMP migration of the same guests (the floor: the same data
 * path as auto, nbd-server-stop before cont, nothing else), and `migrate-vm --help`'s wall-clock
 * start-up. The guest: 256 MiB RAM, a 1 GiB qcow2 holding 64 MiB (the demo's data), `cache: none`.
 *
 * Prints one JSON document on stdout, tables (median [min..max]) on stderr, and before it starts,
 * how long the whole will take (--estimate: only that).
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LocalDestination, LocalSource, type LocalIncomingVm } from '../src/engine/local-endpoint.js';
import { migrate } from '../src/engine/migrate.js';
import type { CopyMode, MigrationResult } from '../src/engine/types.js';
import { loadGuestImage } from '../src/guest/image.js';
import { parseSerialLine, workloadAppend, type Workload } from '../src/guest/serial.js';
import { tickerGap } from '../src/measure/ticker.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { parseVmSpec } from '../src/qemu/spec.js';
import { fillDisk } from './scenario.js';
import { flag, list, QEMUS, stat } from './suite-args.js';

const run = promisify(execFile);
const ROOT = join(import.meta.dirname, '..');
const MiB = 1 << 20;
const FILL_MIB = 64;

/** Each scenario's guest, and its name in bench/floor.ts. */
const SCENARIOS: Record<string, { workload: Workload; floor: string }> = {
  demo: { workload: { tickMs: 20, probeMs: 50, write: { rate: 100 } }, floor: 'write-100' },
  'write-200': { workload: { tickMs: 20, probeMs: 50, write: { rate: 200 } }, floor: 'write-200' },
  'write-max': { workload: { tickMs: 20, probeMs: 50, write: { rate: 0 } }, floor: 'write-max' },
};
const MODES: CopyMode[] = ['auto', 'background', 'write-blocking'];
/** Measured seconds per run, for the estimate: boot + settle + migration + tidy (TCG, 2 cores; the --runs 1 smoke run: 240 s for 18 + 6). */
const SECONDS_PER_RUN = { ferry: 10, floor: 9, startup: 0.5 };


interface Row {
  qemu: string;
  scenario: string;
  mode: CopyMode;
  run: number;
  ok: boolean;
  error?: string;
  path?: string;
  totalMs?: number;
  readyMs?: number;
  switchedAtMs?: number | undefined;
  syncedAtMs?: number | undefined;
  downtimeMs?: number;
  qemuDowntimeMs?: number | undefined;
  tickerGapMs?: number;
  diskBytes?: number;
  allocatedBytes?: number;
  writeP50Us?: number;
  writeP99Us?: number;
  writes?: number;
}

interface FloorRow {
  qemu: string;
  scenario: string;
  run: number;
  ok: boolean;
  error?: string;
  mirrorReadyMs?: number;
  qemuDowntimeMs?: number;
  tickerGapMs?: number;
  switchoverMs?: number;
}

function percentile(xs: number[], p: number): number | undefined {
  if (xs.length === 0) return undefined;
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}



async function ferryOnce(qemu: string, scenario: string, mode: CopyMode, i: number, image: { kernel: string; initrd: string }): Promise<Row> {
  const row: Row = { qemu, scenario, mode, run: i, ok: false };
  const dir = await mkdtemp(join(tmpdir(), `ferry-bench-conv-`));
  let vm: VmProcess | undefined;
  let incoming: LocalIncomingVm | undefined;
  try {
    const hostA = join(dir, 'a');
    const hostB = join(dir, 'b');
    await run('mkdir', ['-p', hostA, hostB]);
    const diskPath = join(hostA, 'root.qcow2');
    await fillDisk(diskPath, 'qcow2', 1 << 30, FILL_MIB);
    const spec = parseVmSpec({
      name: 'bench-conv',
      memoryMiB: 256,
      accel: 'tcg',
      disks: [{ id: 'root', path: diskPath, format: 'qcow2' }],
      boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend({ ...SCENARIOS[scenario]!.workload, disks: 1 })}` },
      runDir: join(hostA, 'run'),
    });
    const qemuBinary = QEMUS[qemu]!;
    vm = await launchVm(spec, { timeoutMs: 30_000, qemuBinary });
    await vm.serial.waitForLine((l) => l.text.includes('ferry-ready'), { timeoutMs: 60_000, what: 'ferry-ready' });
    await new Promise((r) => setTimeout(r, 2_000));
    const destination = new LocalDestination({ dir: hostB, qemuBinary });
    const t0 = performance.now();
    let mirrorFrom = 0;
    let mirrorTo = 0;
    const result: MigrationResult = await migrate({
      spec,
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }),
      destination,
      options: { copyMode: mode },
      onEvent: (e) => {
        if (e.event === 'phase' && e.phase === 'mirror') mirrorFrom = performance.now();
        if (e.event === 'phase' && e.phase === 'ram') mirrorTo = performance.now();
      },
    });
    incoming = destination.incoming;
    await new Promise((r) => setTimeout(r, 1_000));
    const writes = vm.serial
      .history()
      .filter((l) => l.at >= mirrorFrom && l.at <= mirrorTo)
      .map((l) => parseSerialLine(l.text))
      .flatMap((m) => (m.kind === 'latency' && m.op === 'w' ? [m.us] : []));
    const gap = tickerGap([...vm.serial.history(), ...(incoming?.process.serial.history() ?? [])], { from: t0 });
    const m = result.convergence.mirrors;
    return {
      ...row,
      ok: true,
      path: m?.path,
      totalMs: result.totalMs,
      readyMs: m?.readyMs,
      switchedAtMs: m?.switchedAtMs,
      syncedAtMs: m?.syncedAtMs,
      downtimeMs: result.downtimeMs,
      qemuDowntimeMs: result.qemuDowntimeMs,
      tickerGapMs: Math.round(gap.maxGapMs),
      diskBytes: result.diskBytes,
      allocatedBytes: result.plan.disks.reduce((s, d) => s + d.allocatedBytes, 0),
      writeP50Us: percentile(writes, 50),
      writeP99Us: percentile(writes, 99),
      writes: writes.length,
    };
  } catch (err) {
    return { ...row, error: err instanceof Error ? err.message : String(err) };
  } finally {
    await incoming?.kill().catch(() => undefined);
    await vm?.kill().catch(() => undefined);
    await reapAll();
    await rm(dir, { recursive: true, force: true });
  }
}

/** bench/floor.ts in a child, on the path auto takes on this QEMU: its rows. */
async function floorRuns(qemu: string, scenarios: string[], runs: number): Promise<FloorRow[]> {
  const major = Number(qemu.split('.')[0]);
  const args = [
    join(ROOT, 'node_modules', 'tsx', 'dist', 'cli.mjs'),
    join(ROOT, 'bench', 'floor.ts'),
    ...scenarios.map((s) => SCENARIOS[s]!.floor),
    '--runs', String(runs), '--fill', String(FILL_MIB), '--qemu', QEMUS[qemu]!, '--stop-nbd-before-cont',
    ...(major < 8 ? ['--relay'] : ['--active-sync']),
  ];
  const out = await new Promise<string>((resolve, reject) => {
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'], cwd: ROOT });
    let buf = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (buf += s));
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(buf) : reject(new Error(`bench/floor.ts exited ${code}`))));
  });
  const doc = JSON.parse(out) as { rows: (Omit<FloorRow, 'qemu' | 'scenario'> & { scenario: string })[] };
  const byFloor = new Map(Object.entries(SCENARIOS).map(([name, s]) => [s.floor, name]));
  return doc.rows.map((r) => ({ ...r, qemu, scenario: byFloor.get(r.scenario) ?? r.scenario }));
}

/** Wall clock of `migrate-vm --help`, N times. */
async function startupMs(runs: number): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await run(process.execPath, [join(ROOT, 'bin', 'migrate-vm.mjs'), '--help']);
    out.push(Math.round(performance.now() - t0));
  }
  return out;
}

export async function convergenceSuite(): Promise<void> {
  const runs = Number(flag('runs') ?? '5');
  if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs: a positive integer');
  const qemus = list('qemu', Object.keys(QEMUS));
  const scenarios = list('scenarios', Object.keys(SCENARIOS));
  const modes = list('modes', MODES);
  const withFloor = !process.argv.includes('--no-floor');
  for (const q of qemus) if (q !== '7.2' && !existsSync(QEMUS[q]!)) throw new Error(`QEMU ${q} is not at ${QEMUS[q]} (node scripts/bootstrap.mjs --qemu10)`);
  const ferryRuns = qemus.length * scenarios.length * modes.length * runs;
  const floorCount = withFloor ? qemus.length * scenarios.length * runs : 0;
  const estimateS = ferryRuns * SECONDS_PER_RUN.ferry + floorCount * SECONDS_PER_RUN.floor + runs * SECONDS_PER_RUN.startup;
  process.stderr.write(
    `bench convergence: ${ferryRuns} ferry migrations (QEMU ${qemus.join(', ')} x ${scenarios.join(', ')} x ${modes.join(', ')} x ${runs}), ${floorCount} floor migrations: about ${Math.ceil(estimateS / 60)} min on the 2-core machine\n`,
  );
  if (process.argv.includes('--estimate')) return;
  const started = performance.now();
  const image = await loadGuestImage();
  const rows: Row[] = [];
  const floor: FloorRow[] = [];
  // Run by run, each mode then the floor, so that the machine's drift (load comes and goes on a
  // shared box) falls on ferry and its floor alike.
  for (const qemu of qemus) {
    for (const scenario of scenarios) {
      for (let i = 0; i < runs; i++) {
        for (const mode of modes) {
          const row = await ferryOnce(qemu, scenario, mode, i, image);
          rows.push(row);
          process.stderr.write(`${JSON.stringify(row)}\n`);
        }
        if (withFloor) floor.push(...(await floorRuns(qemu, [scenario], 1)));
      }
    }
  }
  const startup = await startupMs(Math.max(runs, 3));

  const summary = qemus.flatMap((qemu) =>
    scenarios.flatMap((scenario) =>
      modes.map((mode) => {
        const all = rows.filter((r) => r.qemu === qemu && r.scenario === scenario && r.mode === mode);
        const rs = all.filter((r) => r.ok);
        const fl = floor.filter((r) => r.qemu === qemu && r.scenario === scenario && r.ok);
        return {
          qemu,
          scenario,
          mode,
          ok: `${rs.length}/${all.length}`,
          path: [...new Set(rs.map((r) => r.path))].join(' '),
          totalMs: stat(rs.map((r) => r.totalMs)),
          readyMs: stat(rs.map((r) => r.readyMs)),
          downtimeMs: stat(rs.map((r) => r.downtimeMs)),
          qemuDowntimeMs: stat(rs.map((r) => r.qemuDowntimeMs)),
          floorQemuDowntimeMs: stat(fl.map((r) => r.qemuDowntimeMs)),
          tickerGapMs: stat(rs.map((r) => r.tickerGapMs)),
          floorTickerGapMs: stat(fl.map((r) => r.tickerGapMs)),
          sentPerAllocated: stat(rs.map((r) => (r.diskBytes && r.allocatedBytes ? (100 * r.diskBytes) / r.allocatedBytes : undefined))),
          writeP50Us: stat(rs.map((r) => r.writeP50Us)),
          writeP99Us: stat(rs.map((r) => r.writeP99Us)),
        };
      }),
    ),
  );
  const doc = {
    bench: 'migrate --suite convergence',
    runs,
    fillMiB: FILL_MIB,
    qemus: Object.fromEntries(await Promise.all(qemus.map(async (q) => [q, (await run(QEMUS[q]!, ['--version'])).stdout.split('\n')[0]]))),
    elapsedS: Math.round((performance.now() - started) / 1000),
    startupMs: { runs: startup, median: stat(startup) },
    rows,
    floor,
    summary,
  };
  process.stdout.write(`${JSON.stringify(doc, null, 2)}\n`);
  const cols = ['qemu', 'scenario', 'mode', 'ok', 'path', 'totalMs', 'readyMs', 'downtimeMs', 'qemuDowntimeMs', 'floorQemuDowntimeMs', 'tickerGapMs', 'floorTickerGapMs', 'sentPerAllocated', 'writeP50Us', 'writeP99Us'] as const;
  const width = (c: (typeof cols)[number]): number => Math.max(c.length, ...summary.map((s) => String(s[c]).length));
  process.stderr.write(`\n${runs} run(s) each, median [min..max]; ms, sent/allocated in %, write latency in us (ferry.probe, during the mirror); floor = bench/floor.ts on auto's path\n`);
  process.stderr.write(`${cols.map((c) => c.padEnd(width(c))).join('  ')}\n`);
  for (const s of summary) process.stderr.write(`${cols.map((c) => String(s[c]).padEnd(width(c))).join('  ')}\n`);
  process.stderr.write(`migrate-vm --help wall clock: ${stat(startup)} ms; the whole took ${doc.elapsedS} s\n`);
  if (rows.some((r) => !r.ok) || floor.some((r) => !r.ok)) process.exitCode = 1;
}
