/**
 * Test harness: boot the tiny guest with a workload on "host A" (a temp folder), and make sure
 * every QEMU is reaped and every temp folder removed after each test, also when it failed.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { loadGuestImage } from '../../src/guest/image.js';
import { workloadAppend, type Workload } from '../../src/guest/serial.js';
import { launchVm, type VmProcess } from '../../src/qemu/launcher.js';
import { reapAll } from '../../src/qemu/reaper.js';
import { parseVmSpec, type VmSpec } from '../../src/qemu/spec.js';

const run = promisify(execFile);
const dirs: string[] = [];

export async function makeTempDir(prefix = 'ferry-test-'): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), prefix));
  dirs.push(d);
  return d;
}

/** Reaps every QEMU this process started and removes every temp folder made by makeTempDir. */
export async function cleanupAll(): Promise<void> {
  await reapAll();
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
}

export interface DiskPlan {
  id: string;
  format: 'qcow2' | 'raw';
  size: number;
  /** MiB of data to write before boot (pattern 0x5a, in the upper half of the disk). */
  fillMiB?: number;
  /** Make the disk a qcow2 overlay on a backing file holding this many MiB (pattern 0x6b). */
  backingFillMiB?: number;
  /** qcow2: rewrite the filled image with compressed clusters (its actual-size then is tiny). */
  compress?: boolean;
}

export async function makeDisk(path: string, d: DiskPlan): Promise<void> {
  if (d.backingFillMiB !== undefined) {
    const base = `${path}.base`;
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(d.size)]);
    await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x6b ${Math.floor(d.size / 4)} ${d.backingFillMiB}M`, base]);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', path, String(d.size)]);
  } else {
    await run('qemu-img', ['create', '-q', '-f', d.format, path, String(d.size)]);
  }
  if (d.fillMiB) {
    // Fill the upper half so the guest's records (scattered over all of it) mostly land elsewhere.
    await run('qemu-io', ['-f', d.format, '-c', `write -P 0x5a ${Math.floor(d.size / 2)} ${d.fillMiB}M`, path]);
  }
  if (d.compress) {
    await run('qemu-img', ['convert', '-c', '-f', 'qcow2', '-O', 'qcow2', path, `${path}.c`]);
    await run('mv', [`${path}.c`, path]);
  }
}

export interface BootedGuest {
  vm: VmProcess;
  spec: VmSpec;
  hostA: string;
  hostB: string;
}

export async function bootWorkloadGuest(opts: {
  disks: DiskPlan[];
  workload: Workload;
  memoryMiB?: number;
  name?: string;
  /**
   * Default: the launcher's, i.e. $FERRY_QEMU (the 10.0 test leg sets it) or the system's. The
   * bootstrap's 10.0 (test/helpers/qemu.ts) is a wrapper that adds its own -L.
   */
  qemuBinary?: string;
}): Promise<BootedGuest> {
  const root = await makeTempDir();
  const hostA = join(root, 'host-a');
  const hostB = join(root, 'host-b');
  await mkdir(hostA);
  await mkdir(hostB);
  const image = await loadGuestImage();
  for (const d of opts.disks) await makeDisk(join(hostA, `${d.id}.${d.format}`), d);
  const spec = parseVmSpec({
    name: opts.name ?? 'guest',
    memoryMiB: opts.memoryMiB ?? 256,
    accel: 'tcg',
    disks: opts.disks.map((d) => ({ id: d.id, path: join(hostA, `${d.id}.${d.format}`), format: d.format })),
    boot: {
      kernel: image.kernel,
      initrd: image.initrd,
      append: `console=ttyS0 quiet ${workloadAppend({ ...opts.workload, disks: opts.disks.length })}`,
    },
    runDir: join(hostA, 'run'),
  });
  const vm = await launchVm(spec, { timeoutMs: 30_000, ...(opts.qemuBinary ? { qemuBinary: opts.qemuBinary } : {}) });
  await vm.serial.waitForLine((l) => l.text === 'ferry-ready', { timeoutMs: 60_000, what: 'ferry-ready' });
  return { vm, spec, hostA, hostB };
}

/**
 * A writing guest laid out the way an agent keeps it: `<root>/<name>/data.qcow2` (made here) and
 * `<root>/<name>/run`. Returns the spec to hand to `vm.create`, and where its serial log will be.
 */
export async function agentGuestSpec(
  root: string,
  name: string,
  opts: { memoryMiB?: number; diskMiB?: number; fillMiB?: number; rate?: number; tickMs?: number } = {},
): Promise<{ spec: Record<string, unknown>; serialLog: string }> {
  const image = await loadGuestImage();
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  await makeDisk(join(dir, 'data.qcow2'), { id: 'data', format: 'qcow2', size: (opts.diskMiB ?? 64) << 20, ...(opts.fillMiB ? { fillMiB: opts.fillMiB } : {}) });
  const workload = workloadAppend({ write: { rate: opts.rate ?? 50 }, tickMs: opts.tickMs ?? 50, disks: 1 });
  return {
    spec: {
      name,
      memoryMiB: opts.memoryMiB ?? 256,
      disks: [{ id: 'data', path: join(dir, 'data.qcow2'), format: 'qcow2' }],
      boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workload}` },
      runDir: join(dir, 'run'),
    },
    serialLog: join(dir, 'run', 'serial.log'),
  };
}

/** SIGKILLs the QEMUs a test let outlive their starter (an agent's VMs), by PID; empties the list. */
export function killPids(pids: number[]): void {
  for (const pid of pids.splice(0)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}
