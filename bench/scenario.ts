/**
 * One benchmark scenario of the tiny guest under TCG on this machine: a disk filled, the guest
 * booted with its workload, migrated between two local folders, measured. Shared by
 * bench/migrate.ts (its scenarios) and bench/data-tls.ts (plain beside TLS); `tls`: both sides
 * get a throwaway CA's certificates and the migration requires TLS on the data path.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LocalDestination, LocalSource, type LocalIncomingVm } from '../src/engine/local-endpoint.js';
import { migrate } from '../src/engine/migrate.js';
import type { MigrationOptionsInput, MigrationResult } from '../src/engine/types.js';
import { parseSerialLine, workloadAppend } from '../src/guest/serial.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { parseVmSpec, type VmSpec } from '../src/qemu/spec.js';
import { tickerGap } from '../src/measure/ticker.js';

import { throwawayPki } from '../src/host/data-tls.js';

const run = promisify(execFile);
export const MiB = 1 << 20;
export const GiB = 1 << 30;

export interface Scenario {
  name: string;
  diskSize: number;
  fillMiB: number;
  workload: Parameters<typeof workloadAppend>[0];
  options?: MigrationOptionsInput;
  /** TLS on the data path, with a throwaway CA made for the run. */
  tls?: boolean;
  /** With tls: the gnutls priority string of both QEMUs' TLS objects; absent: QEMU's default. */
  tlsPriority?: string;
  /** Both QEMUs' binary; absent: the system's. */
  qemuBinary?: string;
}

export interface Row {
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
  /** Whether the data path was encrypted. */
  encrypted?: boolean;
  /** Inside the pause, from QEMU's own event timestamps (ms): see pauseSteps. */
  pause?: PauseSteps;
  /** The guest's probes on the destination (ferry.probe), over the window after it started running. */
  latency?: { windowMs: number; readP50Us: number; readP99Us: number; reads: number; writeP50Us: number; writeP99Us: number; writes: number };
}

/**
 * The pause, step by step, from the timestamps QEMU puts on its events (one host clock):
 * stop→pre-switchover (QEMU stops the vCPUs), then the mirrors' cancel until their last job
 * ends, migrate-continue until `device` (the last RAM and the device state go after it), until
 * the source's `completed`, the destination's `completed`, and its RESUME (nbd-server-stop and
 * `cont` in between). `qemu` is QEMU's own downtime figure's span: STOP to the source's completed.
 */
export interface PauseSteps {
  stopToPreSwitchover: number;
  mirrorsComplete: number;
  continueToDevice: number;
  deviceToCompleted: number;
  sourceToDestinationCompleted: number;
  destinationCompletedToResume: number;
  stopToResume: number;
}

type Stamp = { event: string; at: number; data: unknown };
const stampOf = (e: { event: string; timestamp: { seconds: number; microseconds: number }; data?: unknown }): Stamp => ({ event: e.event, at: e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000, data: e.data });
const statusOf = (s: Stamp): string | undefined => (s.event === 'MIGRATION' && typeof s.data === 'object' && s.data !== null && 'status' in s.data && typeof s.data.status === 'string' ? s.data.status : undefined);

function pauseSteps(source: Stamp[], destination: Stamp[]): PauseSteps | undefined {
  const at = (xs: Stamp[], f: (s: Stamp) => boolean): number | undefined => xs.find(f)?.at;
  const pre = at(source, (s) => statusOf(s) === 'pre-switchover');
  const stop = source.filter((s) => s.event === 'STOP' && pre !== undefined && s.at <= pre).at(-1)?.at;
  const device = at(source, (s) => statusOf(s) === 'device');
  const done = at(source, (s) => statusOf(s) === 'completed');
  const mirrorsEnd = source.filter((s) => (s.event === 'BLOCK_JOB_COMPLETED' || s.event === 'BLOCK_JOB_CANCELLED') && pre !== undefined && s.at >= pre).at(-1)?.at ?? pre;
  const destDone = at(destination, (s) => statusOf(s) === 'completed');
  const resume = at(destination, (s) => s.event === 'RESUME');
  if ([pre, stop, device, done, mirrorsEnd, destDone, resume].some((x) => x === undefined)) return undefined;
  const r = (x: number): number => Math.round(x * 10) / 10;
  return {
    stopToPreSwitchover: r(pre! - stop!),
    mirrorsComplete: r(mirrorsEnd! - pre!),
    continueToDevice: r(device! - mirrorsEnd!),
    deviceToCompleted: r(done! - device!),
    sourceToDestinationCompleted: r(destDone! - done!),
    destinationCompletedToResume: r(resume! - destDone!),
    stopToResume: r(resume! - stop!),
  };
}

/** Every event of a session from now until `stop` aborts. */
function collectEvents(qmp: { events(opts: { signal?: AbortSignal }): AsyncIterableIterator<Parameters<typeof stampOf>[0]> }, stop: AbortSignal): Stamp[] {
  const out: Stamp[] = [];
  void (async () => {
    try {
      for await (const e of qmp.events({ signal: stop })) out.push(stampOf(e));
    } catch {
      // The reader ends with the session or the abort.
    }
  })();
  return out;
}

export function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return 0;
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

export async function fillDisk(path: string, format: 'qcow2' | 'raw', size: number, fillMiB: number): Promise<void> {
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
export async function nbdBaseline(dir: string, fillMiB: number): Promise<{ bytes: number; ms: number; bytesPerSec: number }> {
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

export async function runScenario(s: Scenario, image: { kernel: string; initrd: string }, nbdBytesPerSec: number): Promise<Row> {
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
    vm = await launchVm(spec, { timeoutMs: 30_000, ...(s.qemuBinary ? { qemuBinary: s.qemuBinary } : {}) });
    await vm.serial.waitForLine((l) => l.text.includes('ferry-ready'), { timeoutMs: 60_000, what: 'ferry-ready' });
    // Let the workload reach its steady state.
    await new Promise((r) => setTimeout(r, 2_000));

    const pki = s.tls ? await throwawayPki(join(dir, 'pki'), { address: '127.0.0.1', names: ['bench-a', 'bench-b'] }) : [];
    const priority = s.tlsPriority === undefined ? {} : { dataTlsPriority: s.tlsPriority };
    const destination = new LocalDestination({ dir: hostB, ...(pki[1] ? { dataTls: pki[1] } : {}), ...priority, ...(s.qemuBinary ? { qemuBinary: s.qemuBinary } : {}) });
    const stopEvents = new AbortController();
    const sourceEvents = collectEvents(vm.qmp, stopEvents.signal);
    const t0 = performance.now();
    let runningAt = 0;
    const result = await migrate({
      spec,
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock'), ...(pki[0] ? { dataTls: pki[0] } : {}), ...priority }),
      destination,
      options: { ...s.options, dataTls: s.tls ? 'required' : 'off' },
      onEvent: (e) => {
        if (e.event === 'phase' && (e.phase === 'hydrate' || (e.phase === 'cleanup' && runningAt === 0))) runningAt = performance.now();
      },
    });
    incoming = destination.incoming;
    stopEvents.abort();
    const destinationEvents: Stamp[] = [];
    for (const pred of [(e: { event: string; data?: unknown }) => e.event === 'MIGRATION' && statusOf(stampOf({ ...e, timestamp: { seconds: 0, microseconds: 0 } })) === 'completed', (e: { event: string }) => e.event === 'RESUME']) {
      const e = await incoming?.qmp.waitForEvent(pred, { since: 0, timeoutMs: 100 }).catch(() => undefined);
      if (e) destinationEvents.push(stampOf(e));
    }
    const pause = pauseSteps(sourceEvents, destinationEvents);
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
      encrypted: result.plan.dataTls.encrypted,
      ...(pause ? { pause } : {}),
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

export function fmtBytes(n: number | undefined): string {
  if (n === undefined) return '-';
  return n >= GiB ? `${(n / GiB).toFixed(2)} GiB` : `${(n / MiB).toFixed(1)} MiB`;
}

