/**
 * npm run bench:migrate -- --suite lazy [--runs 5] [--qemu 7.2,10.0] [--scenarios idle,write-200]
 *
 * Issue 11 item 3, lazy mode: ferry's time to "destination running" beside the minimal-QMP floor
 * of the same flow (bench/floor-lazy.ts), interleaved run by run on the same machine so that the
 * ratio compares like with like. Both clocks start before the orchestrator's first QMP connection
 * to the source and stop when `cont` on the destination returned. Each run boots a fresh source
 * (256 MiB RAM, 1 GiB qcow2 holding 200 MiB) and waits 2 s for its workload's steady state.
 *
 * Prints one JSON document on stdout and a table on stderr: median [min..max] per cell, the
 * ratio of medians, and ferry's phases beside the floor's steps, so the gap can be located.
 */
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LocalDestination, LocalSource, type LocalIncomingVm } from '../src/engine/local-endpoint.js';
import { migrate } from '../src/engine/migrate.js';
import { loadGuestImage } from '../src/guest/image.js';
import { workloadAppend, type Workload } from '../src/guest/serial.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { parseVmSpec, type VmSpec } from '../src/qemu/spec.js';
import { diskSchemaCache, layeredSchemaCache, useSchemaCache } from '../src/qmp/schema-cache.js';
import { diskQemuBuildCache } from '../src/qemu/build-cache.js';
import { lazyFloorOnce, type LazyFloorRow } from './floor-lazy.js';
import { fillDisk, GiB } from './scenario.js';
import { flag, list, median, QEMUS, stat } from './suite-args.js';

const SCENARIOS: Record<string, Workload> = {
  idle: { tickMs: 20 },
  'write-200': { tickMs: 20, write: { rate: 200 } },
};
const FILL_MIB = 200;

interface Row {
  qemu: string;
  scenario: string;
  driver: 'ferry' | 'floor';
  run: number;
  ok: boolean;
  error?: string;
  destinationRunningMs?: number;
  qemuDowntimeMs?: number | undefined;
  /** ferry: its phases until the destination ran; floor: its steps. */
  parts?: Record<string, number>;
}

/** A fresh source of the scenario, booted and in its steady state; `use` runs one migration of it. */
async function withSource(qemu: string, scenario: string, image: { kernel: string; initrd: string }, use: (spec: VmSpec, destDir: string) => Promise<Omit<Row, 'qemu' | 'scenario' | 'driver' | 'run' | 'ok'>>): Promise<Omit<Row, 'qemu' | 'scenario' | 'driver' | 'run'>> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-bench-lazy-'));
  let vm: VmProcess | undefined;
  try {
    const hostA = join(dir, 'a');
    await mkdir(hostA);
    const diskPath = join(hostA, 'root.qcow2');
    await fillDisk(diskPath, 'qcow2', GiB, FILL_MIB);
    const spec = parseVmSpec({
      name: 'bench-lazy',
      memoryMiB: 256,
      accel: 'tcg',
      disks: [{ id: 'root', path: diskPath, format: 'qcow2' }],
      boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend(SCENARIOS[scenario]!)}` },
      runDir: join(hostA, 'run'),
    });
    vm = await launchVm(spec, { timeoutMs: 30_000, qemuBinary: QEMUS[qemu]! });
    await vm.serial.waitForLine((l) => l.text.includes('ferry-ready'), { timeoutMs: 60_000, what: 'ferry-ready' });
    await new Promise((r) => setTimeout(r, 2_000));
    return { ok: true, ...(await use(spec, join(dir, 'b'))) };
  } catch (err) {
    return { ok: false, error: err instanceof Error ? err.message : String(err) };
  } finally {
    await vm?.kill().catch(() => undefined);
    await reapAll();
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * ferry runs as migrate-vm would, one process per migration: its caches on disk (a QEMU build's
 * schema, the destination binary's probe; kept for the whole bench, so the first ferry run of
 * each QEMU probes and later ones read the files), fresh memory layers per run so that no run
 * reads another's memory.
 */
async function ferryLazy(qemu: string, spec: VmSpec, destDir: string, cacheDir: string): Promise<Omit<Row, 'qemu' | 'scenario' | 'driver' | 'run' | 'ok'>> {
  await mkdir(destDir);
  useSchemaCache(layeredSchemaCache(diskSchemaCache(cacheDir)));
  const destination = new LocalDestination({ dir: destDir, qemuBinary: QEMUS[qemu]!, qemuBuildCache: diskQemuBuildCache(cacheDir) });
  let incoming: LocalIncomingVm | undefined;
  try {
    const result = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }), destination, options: { mode: 'lazy', dataTls: 'off' } });
    incoming = destination.incoming;
    const { hydrate: _h, cleanup: _c, done: _d, ...parts } = result.phaseMs;
    return { destinationRunningMs: result.lazy?.destinationRunningMs, qemuDowntimeMs: result.qemuDowntimeMs, parts };
  } finally {
    incoming = incoming ?? destination.incoming;
    await incoming?.kill().catch(() => undefined);
  }
}

async function floorLazy(qemu: string, spec: VmSpec, destDir: string): Promise<Omit<Row, 'qemu' | 'scenario' | 'driver' | 'run' | 'ok'>> {
  const { row, destination }: { row: LazyFloorRow; destination: VmProcess } = await lazyFloorOnce(spec, destDir, { virtualSize: GiB, qemuBinary: QEMUS[qemu]! });
  await destination.kill().catch(() => undefined);
  return { destinationRunningMs: row.destinationRunningMs, qemuDowntimeMs: row.qemuDowntimeMs, parts: row.steps };
}

export async function lazySuite(): Promise<void> {
  const runs = Number(flag('runs') ?? '5');
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs: expected a whole number >= 1, got '${flag('runs') ?? ''}'`);
  const qemus = list('qemu', Object.keys(QEMUS));
  const scenarios = list('scenarios', Object.keys(SCENARIOS));
  for (const q of qemus) if (q !== '7.2' && !existsSync(QEMUS[q]!)) throw new Error(`QEMU ${q} is not at ${QEMUS[q]} (node scripts/bootstrap.mjs --qemu10)`);
  const image = await loadGuestImage();
  process.stderr.write(`bench lazy: ${qemus.length * scenarios.length * runs * 2} migrations (QEMU ${qemus.join(', ')} x ${scenarios.join(', ')} x ${runs} x ferry+floor)\n`);
  const rows: Row[] = [];
  const cacheDir = await mkdtemp(join(tmpdir(), 'ferry-bench-cache-'));
  try {
    for (const qemu of qemus) {
      for (const scenario of scenarios) {
        for (let i = 0; i < runs; i++) {
          // Interleaved, and the order alternates, so that drift in the machine's load hits both.
          const order: Row['driver'][] = i % 2 === 0 ? ['ferry', 'floor'] : ['floor', 'ferry'];
          for (const driver of order) {
            const r = await withSource(qemu, scenario, image, (spec, destDir) => (driver === 'ferry' ? ferryLazy(qemu, spec, destDir, cacheDir) : floorLazy(qemu, spec, destDir)));
            const row: Row = { qemu, scenario, driver, run: i, ...r };
            rows.push(row);
            process.stderr.write(`${JSON.stringify(row)}\n`);
          }
        }
      }
    }
  } finally {
    await reapAll();
    await rm(cacheDir, { recursive: true, force: true });
  }
  const summary = qemus.flatMap((qemu) =>
    scenarios.map((scenario) => {
      const of = (driver: Row['driver']): Row[] => rows.filter((r) => r.qemu === qemu && r.scenario === scenario && r.driver === driver && r.ok);
      const ferry = of('ferry');
      const floor = of('floor');
      const fm = median(ferry.flatMap((r) => (r.destinationRunningMs === undefined ? [] : [r.destinationRunningMs])));
      const lm = median(floor.flatMap((r) => (r.destinationRunningMs === undefined ? [] : [r.destinationRunningMs])));
      const parts = (rs: Row[]): Record<string, number | undefined> => {
        const keys = [...new Set(rs.flatMap((r) => Object.keys(r.parts ?? {})))];
        return Object.fromEntries(keys.map((k) => [k, median(rs.flatMap((r) => (r.parts?.[k] === undefined ? [] : [r.parts[k]!])))]));
      };
      return {
        qemu,
        scenario,
        ok: `${ferry.length}+${floor.length}/${2 * runs}`,
        ferryRunningMs: stat(ferry.map((r) => r.destinationRunningMs)),
        floorRunningMs: stat(floor.map((r) => r.destinationRunningMs)),
        ratio: fm !== undefined && lm !== undefined ? Number((fm / lm).toFixed(2)) : undefined,
        ferryQemuDowntimeMs: stat(ferry.map((r) => r.qemuDowntimeMs)),
        floorQemuDowntimeMs: stat(floor.map((r) => r.qemuDowntimeMs)),
        ferryPhasesMs: parts(ferry),
        floorStepsMs: parts(floor),
      };
    }),
  );
  process.stdout.write(`${JSON.stringify({ bench: 'lazy', runs, fillMiB: FILL_MIB, rows, summary }, null, 2)}\n`);
  process.stderr.write(`\nlazy mode: time to destination running, ${runs} run(s) each, median [min..max], ms\n`);
  for (const s of summary) {
    process.stderr.write(`QEMU ${s.qemu} ${s.scenario.padEnd(9)} ok ${s.ok}  ferry ${s.ferryRunningMs}  floor ${s.floorRunningMs}  ratio ${s.ratio ?? '-'}  qemu downtime ${s.ferryQemuDowntimeMs} vs ${s.floorQemuDowntimeMs}\n`);
    process.stderr.write(`    ferry phases ${JSON.stringify(s.ferryPhasesMs)}\n    floor steps  ${JSON.stringify(s.floorStepsMs)}\n`);
  }
  if (rows.some((r) => !r.ok)) process.exitCode = 1;
}
