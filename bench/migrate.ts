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
 * `npm run bench:migrate -- --suite convergence [--runs 5] [--qemu 7.2,10.0] ...` runs issue 11's
 * copy-mode benchmark instead (bench/convergence.ts).
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LocalDestination, LocalSource, type LocalIncomingVm } from '../src/engine/local-endpoint.js';
import { migrate } from '../src/engine/migrate.js';
import type { MigrationOptionsInput, MigrationResult } from '../src/engine/types.js';
import { loadGuestImage } from '../src/guest/image.js';
import { parseSerialLine, workloadAppend } from '../src/guest/serial.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { parseVmSpec, type VmSpec } from '../src/qemu/spec.js';
import { tickerGap } from '../src/measure/ticker.js';

const run = promisify(execFile);
const MiB = 1 << 20;
const GiB = 1 << 30;

interface Scenario {
  name: string;
  diskSize: number;
  fillMiB: number;
  workload: Parameters<typeof workloadAppend>[0];
  options?: MigrationOptionsInput;
}

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

interface Row {
  scenario: string;
  ok: boolean;
  error?: string;
  totalMs?: number;
  downtimeMs?: number;
  qemuDowntimeMs?: number | undefined;
  tickerGapMs?: number;
  diskBytes?: number;
  ramBytes?: number;
  allocatedBytes?: number;
  phaseMs?: MigrationResult['phaseMs'];
  boundMs?: number;
  ratioToBound?: number;
  forced?: boolean;
  /** lazy: ms from the start until the destination ran; hydration ms and its bytes on the wire. */
  destinationRunningMs?: number;
  hydrationMs?: number;
  hydratedBytes?: number | undefined;
  /** The guest's probes on the destination (ferry.probe), over the window after it started running. */
  latency?: { windowMs: number; readP50Us: number; readP99Us: number; reads: number; writeP50Us: number; writeP99Us: number; writes: number };
}

function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return 0;
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function fillDisk(path: string, format: 'qcow2' | 'raw', size: number, fillMiB: number): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', format, path, String(size)]);
  if (fillMiB > 0) {
    // Spread over the disk in 4 extents, so the mirror walks the whole of it.
    const chunk = Math.floor(fillMiB / 4);
    const cmds: string[] = [];
    for (let i = 0; i < 4; i++) cmds.push('-c', `write -P 0x${(0x41 + i).toString(16)} ${Math.floor((size / 4) * i)} ${chunk}M`);
    await run('qemu-io', ['-f', format, ...cmds, path]);
  }
}

/** Throughput of a plain NBD copy of `fillMiB` MiB: qemu-img convert into a qemu-nbd export. */
async function nbdBaseline(dir: string, fillMiB: number): Promise<{ bytes: number; ms: number; bytesPerSec: number }> {
  const src = join(dir, 'nbd-src.qcow2');
  const dst = join(dir, 'nbd-dst.qcow2');
  await fillDisk(src, 'qcow2', GiB, fillMiB);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', dst, String(GiB)]);
  const port = 30000 + Math.floor(Math.random() * 5000);
  const server = spawn('qemu-nbd', ['-f', 'qcow2', '-x', 'bench', '-p', String(port), '-b', '127.0.0.1', '-t', dst], { stdio: 'ignore' });
  try {
    await new Promise((r) => setTimeout(r, 500));
    const t0 = performance.now();
    await run('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', src, `nbd://127.0.0.1:${port}/bench`]);
    const ms = performance.now() - t0;
    const bytes = fillMiB * MiB;
    return { bytes, ms, bytesPerSec: (bytes * 1000) / ms };
  } finally {
    server.kill('SIGKILL');
  }
}

async function runScenario(s: Scenario, image: { kernel: string; initrd: string }, nbdBytesPerSec: number): Promise<Row> {
  const dir = await mkdtemp(join(tmpdir(), `ferry-bench-${s.name}-`));
  const hostA = join(dir, 'a');
  const hostB = join(dir, 'b');
  let vm: VmProcess | undefined;
  let incoming: LocalIncomingVm | undefined;
  try {
    await run('mkdir', ['-p', hostA, hostB]);
    const diskPath = join(hostA, 'root.qcow2');
    await fillDisk(diskPath, 'qcow2', s.diskSize, s.fillMiB);
    const spec: VmSpec = parseVmSpec({
      name: `bench-${s.name}`,
      memoryMiB: 256,
      accel: 'tcg',
      disks: [{ id: 'root', path: diskPath, format: 'qcow2' }],
      boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend(s.workload)}` },
      runDir: join(hostA, 'run'),
    });
    vm = await launchVm(spec, { timeoutMs: 30_000 });
    await vm.serial.waitForLine((l) => l.text.includes('ferry-ready'), { timeoutMs: 60_000, what: 'ferry-ready' });
    // Let the workload reach its steady state.
    await new Promise((r) => setTimeout(r, 2_000));

    const destination = new LocalDestination({ dir: hostB });
    const t0 = performance.now();
    let runningAt = 0;
    const result = await migrate({
      spec,
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }),
      destination,
      ...(s.options ? { options: s.options } : {}),
      onEvent: (e) => {
        if (e.event === 'phase' && (e.phase === 'hydrate' || (e.phase === 'cleanup' && runningAt === 0))) runningAt = performance.now();
      },
    });
    incoming = destination.incoming;
    // Latency window: lazy, the hydration; precopy, as long again after the guest arrived.
    const windowMs = result.lazy ? result.lazy.hydrationMs : 10_000;
    if (!result.lazy && s.workload.probeMs) await new Promise((r) => setTimeout(r, windowMs));
    // A second of the guest on the destination closes the ticker window.
    await new Promise((r) => setTimeout(r, 1_000));
    let latency: Row['latency'];
    if (s.workload.probeMs) {
      const probes = (incoming?.process.serial.history() ?? [])
        .filter((l) => l.at >= runningAt && l.at <= runningAt + windowMs)
        .map((l) => parseSerialLine(l.text))
        .filter((m): m is Extract<ReturnType<typeof parseSerialLine>, { kind: 'latency' }> => m.kind === 'latency');
      const reads = probes.filter((p) => p.op === 'r').map((p) => p.us);
      const writes = probes.filter((p) => p.op === 'w').map((p) => p.us);
      latency = { windowMs, readP50Us: percentile(reads, 50), readP99Us: percentile(reads, 99), reads: reads.length, writeP50Us: percentile(writes, 50), writeP99Us: percentile(writes, 99), writes: writes.length };
    }
    const lines = [...vm.serial.history(), ...(incoming?.process.serial.history() ?? [])];
    const gap = tickerGap(lines, { from: t0 });
    const allocated = result.plan.disks.reduce((sum, d) => sum + d.allocatedBytes, 0);
    const boundMs = ((result.diskBytes + result.ramBytes) * 1000) / nbdBytesPerSec;
    return {
      scenario: s.name,
      ok: true,
      totalMs: result.totalMs,
      downtimeMs: result.downtimeMs,
      qemuDowntimeMs: result.qemuDowntimeMs,
      tickerGapMs: Math.round(gap.maxGapMs),
      diskBytes: result.diskBytes,
      ramBytes: result.ramBytes,
      allocatedBytes: allocated,
      phaseMs: result.phaseMs,
      boundMs: Math.round(boundMs),
      ratioToBound: Number((result.totalMs / boundMs).toFixed(2)),
      forced: result.convergence.forced,
      ...(result.lazy ? { destinationRunningMs: result.lazy.destinationRunningMs, hydrationMs: result.lazy.hydrationMs, hydratedBytes: result.lazy.hydratedWireBytes } : {}),
      ...(latency ? { latency } : {}),
    };
  } catch (err) {
    return { scenario: s.name, ok: false, error: err instanceof Error ? err.message : String(err) };
  } finally {
    await incoming?.kill().catch(() => undefined);
    await vm?.kill().catch(() => undefined);
    await reapAll();
    await rm(dir, { recursive: true, force: true });
  }
}

function fmtBytes(n: number | undefined): string {
  if (n === undefined) return '-';
  return n >= GiB ? `${(n / GiB).toFixed(2)} GiB` : `${(n / MiB).toFixed(1)} MiB`;
}

async function main(): Promise<void> {
  const suite = process.argv.indexOf('--suite');
  if (suite >= 0) {
    // Issue 11's convergence benchmark: bench/convergence.ts (its own flags).
    if (process.argv[suite + 1] !== 'convergence') throw new Error(`--suite: unknown '${process.argv[suite + 1] ?? ''}'; known: convergence`);
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
