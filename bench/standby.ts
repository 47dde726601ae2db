/**
 * npm run bench:standby — standby replicas (issue 12) under TCG, on this machine.
 *
 * One VM per run, its disk `8 GiB holding 1 GiB` divided by --scale (default 1; say which you
 * used: TCG on a loaded box may need 4 or 8), the guest writing --rate records/s (default 200)
 * with ferry.probe timing its acked writes:
 *   1. write latency p50/p99 with no sync running, then while syncs run back to back;
 *   2. RPO at --interval 10s under that writer: now - last consistent point, sampled every 200 ms
 *      for --rpo-seconds (default 40), max and mean;
 *   3. 1% of the data rewritten since the last sync (qemu-io through the guest's own device),
 *      then evacuation by delta to the standby: time, bytes, downtime;
 *   4. the same VM migrated on to a third folder by a full pre-copy (a mirror of everything):
 *      time, bytes, downtime. Ratios delta/full compare only within one run.
 * `--runs N` repeats it (median [min..max]); `--runs 1` is the smoke run. JSON on stdout, a table on stderr.
 */
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { LocalDestination, LocalSource } from '../src/engine/local-endpoint.js';
import { migrate } from '../src/engine/migrate.js';
import { loadGuestImage } from '../src/guest/image.js';
import { parseSerialLine, workloadAppend } from '../src/guest/serial.js';
import { freePort } from '../src/host/ports.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { parseVmSpec } from '../src/qemu/spec.js';
import { replicaDelta } from '../src/replica/delta-replica.js';
import { Protection, localSource, localStandby } from '../src/replica/protection.js';
import { StandbyReplica } from '../src/replica/standby-daemon.js';
import { fillDisk, fmtBytes, GiB, MiB, percentile } from './scenario.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '1' },
    scale: { type: 'string', default: '1' },
    rate: { type: 'string', default: '200' },
    interval: { type: 'string', default: '10' },
    'rpo-seconds': { type: 'string', default: '40' },
  },
});
const RUNS = Number(values.runs);
const SCALE = Number(values.scale);
const RATE = Number(values.rate);
const INTERVAL_MS = Number(values.interval) * 1000;
const RPO_MS = Number(values['rpo-seconds']) * 1000;
const DISK = Math.round((8 * GiB) / SCALE / MiB) * MiB;
const FILL_MIB = Math.round(1024 / SCALE);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface RunFigures {
  latencyNoSyncUs: { p50: number; p99: number; n: number };
  latencySyncingUs: { p50: number; p99: number; n: number };
  fullSyncMs: number;
  fullSyncBytes: number;
  rpo: { intervalMs: number; maxMs: number; meanMs: number; syncs: number };
  delta: { totalMs: number; diskBytes: number; ramBytes: number; downtimeMs: number; passes: number; finalPassMs: number; rewrittenBytes: number };
  full: { totalMs: number; diskBytes: number; ramBytes: number; downtimeMs: number };
}

function writeLatencies(vm: VmProcess, from: number, to: number): number[] {
  return vm.serial.history().flatMap((l) => {
    if (l.at < from || l.at > to) return [];
    const p = parseSerialLine(l.text);
    return p.kind === 'latency' && p.op === 'w' ? [p.us] : [];
  });
}

const stats = (xs: number[]) => ({ p50: percentile(xs, 50), p99: percentile(xs, 99), n: xs.length });

async function oneRun(root: string): Promise<RunFigures> {
  const [hostA, hostB, hostC] = ['a', 'b', 'c'].map((h) => join(root, h)) as [string, string, string];
  for (const d of [hostA, hostB, hostC]) await mkdir(d);
  await mkdir(join(hostB, 'vm'));
  const image = await loadGuestImage();
  const disk = join(hostA, 'data.qcow2');
  await fillDisk(disk, 'qcow2', DISK, FILL_MIB);
  const spec = parseVmSpec({
    name: 'standby-bench',
    memoryMiB: 256,
    accel: 'tcg',
    disks: [{ id: 'data', path: disk, format: 'qcow2' }],
    boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend({ write: { rate: RATE }, tickMs: 20, probeMs: 50, disks: 1 })}` },
    runDir: join(hostA, 'run'),
  });
  const vm = await launchVm(spec, { timeoutMs: 30_000 });
  await vm.serial.waitForLine((l) => l.text === 'ferry-ready', { timeoutMs: 60_000, what: 'ferry-ready' });
  const replica = await StandbyReplica.create({ dir: join(hostB, 'replica'), host: '127.0.0.1', port: await freePort(), vm: spec.name, disks: [{ id: 'data', virtualSize: DISK }], needBytes: FILL_MIB * MiB });
  try {
    const source = new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') });
    const sourceSide = localSource(() => source.connect({ timeoutMs: 5_000 }), spec.disks);
    const backToBack = new Protection({ vm: spec.name, source: sourceSide, standby: localStandby(replica), intervalMs: 1 });
    const full = await backToBack.syncOnce();

    // 1. write latency: a quiet window, then the same length with syncs back to back.
    const quietFrom = performance.now();
    await sleep(5_000);
    const latencyNoSyncUs = stats(writeLatencies(vm, quietFrom, performance.now()));
    const syncingFrom = performance.now();
    const windows: [number, number][] = [];
    while (performance.now() - syncingFrom < 5_000) {
      const t = performance.now();
      await backToBack.syncOnce();
      windows.push([t, performance.now()]);
    }
    const latencySyncingUs = stats(windows.flatMap(([a, b]) => writeLatencies(vm, a, b)));
    await backToBack.stop();

    // 2. RPO at the interval.
    const loop = new Protection({ vm: spec.name, source: sourceSide, standby: localStandby(replica), intervalMs: INTERVAL_MS });
    loop.start();
    const rpos: number[] = [];
    const rpoFrom = performance.now();
    while (performance.now() - rpoFrom < RPO_MS) {
      await sleep(200);
      const s = loop.status();
      if (s.rpoMs !== null) rpos.push(s.rpoMs);
    }
    const syncs = loop.status().syncs;
    await loop.stop();
    await backToBack.syncOnce().catch(() => undefined);

    // 3. 1% of the data rewritten since the last sync, then the evacuation by delta.
    const rewrittenBytes = Math.max(64 * 1024, Math.round((FILL_MIB * MiB) / 100 / (64 * 1024)) * 64 * 1024);
    const quarter = Math.floor(DISK / 4);
    await vm.qmp.executeRaw('human-monitor-command', { 'command-line': `qemu-io -d /machine/peripheral/dev-data/virtio-backend "write -P 0x77 ${quarter} ${rewrittenBytes}"` });
    const toB = new LocalDestination({ dir: join(hostB, 'vm') });
    const d = await migrate({ spec, source, destination: toB, delta: replicaDelta(replica) });
    const onB = toB.incoming!.process;
    await vm.exited;

    // 4. The same VM, on to C by a full pre-copy.
    const toC = new LocalDestination({ dir: hostC });
    const f = await migrate({ spec: onB.spec, source: new LocalSource({ qmpSocket: join(onB.spec.runDir, 'qmp.sock') }), destination: toC });
    await toC.incoming!.process.quit({ timeoutMs: 10_000 });
    return {
      latencyNoSyncUs,
      latencySyncingUs,
      fullSyncMs: full.durationMs,
      fullSyncBytes: full.bytes,
      rpo: { intervalMs: INTERVAL_MS, maxMs: Math.max(...rpos), meanMs: Math.round(rpos.reduce((a, b) => a + b, 0) / Math.max(1, rpos.length)), syncs },
      delta: { totalMs: d.totalMs, diskBytes: d.diskBytes, ramBytes: d.ramBytes, downtimeMs: d.downtimeMs, passes: d.delta?.passes ?? 0, finalPassMs: d.delta?.finalMs ?? 0, rewrittenBytes },
      full: { totalMs: f.totalMs, diskBytes: f.diskBytes, ramBytes: f.ramBytes, downtimeMs: f.downtimeMs },
    };
  } finally {
    await replica.destroy({ keepFiles: true }).catch(() => undefined);
    await reapAll();
  }
}

function median(xs: number[]): string {
  const s = [...xs].sort((a, b) => a - b);
  const m = s[Math.floor(s.length / 2)]!;
  return s.length > 1 ? `${m} [${s[0]}..${s.at(-1)}]` : String(m);
}

const runs: RunFigures[] = [];
for (let i = 0; i < RUNS; i++) {
  const root = await mkdtemp(join(tmpdir(), 'ferry-bench-standby-'));
  try {
    runs.push(await oneRun(root));
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}
process.stdout.write(`${JSON.stringify({ scale: SCALE, diskBytes: DISK, dataMiB: FILL_MIB, rate: RATE, runs }, null, 2)}\n`);
const col = (f: (r: RunFigures) => number): string => median(runs.map((r) => Math.round(f(r))));
const lines = [
  `standby bench: disk ${fmtBytes(DISK)} holding ${FILL_MIB} MiB (scale 1/${SCALE}), guest ${RATE} writes/s, ${RUNS} run(s), median [min..max]`,
  `  delta evacuation: ${col((r) => r.delta.totalMs)} ms, disk ${col((r) => r.delta.diskBytes / MiB)} MiB + RAM ${col((r) => r.delta.ramBytes / MiB)} MiB, downtime ${col((r) => r.delta.downtimeMs)} ms (last pass ${col((r) => r.delta.finalPassMs)} ms), rewritten ${col((r) => r.delta.rewrittenBytes / MiB)} MiB`,
  `  full migration:   ${col((r) => r.full.totalMs)} ms, disk ${col((r) => r.full.diskBytes / MiB)} MiB + RAM ${col((r) => r.full.ramBytes / MiB)} MiB, downtime ${col((r) => r.full.downtimeMs)} ms`,
  `  delta/full: bytes ${col((r) => (100 * (r.delta.diskBytes + r.delta.ramBytes)) / (r.full.diskBytes + r.full.ramBytes))}%, time ${col((r) => (100 * r.delta.totalMs) / r.full.totalMs)}%, downtime ${col((r) => (100 * r.delta.downtimeMs) / Math.max(1, r.full.downtimeMs))}%`,
  `  write latency us: no sync p50 ${col((r) => r.latencyNoSyncUs.p50)} p99 ${col((r) => r.latencyNoSyncUs.p99)}; syncs running p50 ${col((r) => r.latencySyncingUs.p50)} p99 ${col((r) => r.latencySyncingUs.p99)}`,
  `  RPO at --interval ${INTERVAL_MS / 1000}s: max ${col((r) => r.rpo.maxMs)} ms, mean ${col((r) => r.rpo.meanMs)} ms; first (full) sync ${col((r) => r.fullSyncMs)} ms, ${col((r) => r.fullSyncBytes / MiB)} MiB`,
];
process.stderr.write(`${lines.join('\n')}\n`);
