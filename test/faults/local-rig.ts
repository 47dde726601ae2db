/**
 * The local rig: a writing guest on "host A" (a folder, QEMU started by the harness), migrate-vm
 * as a real process moving it into "host B" (a folder; on a small tmpfs for disk-full; its QEMU
 * under blkdebug for disk-io-error). Faults: kill -9 of either QEMU or of migrate-vm, SIGTERM to
 * migrate-vm, host B's filesystem filled, host B's disk failing writes.
 */
import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, statfs, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { promisify } from 'node:util';
import { loadGuestImage } from '../../src/guest/image.js';
import { workloadAppend } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { launchVm, type VmProcess } from '../../src/qemu/launcher.js';
import { parseVmSpec } from '../../src/qemu/spec.js';
import type { QmpClient } from '../../src/qmp/index.js';
import { makeDisk } from '../helpers/guest.js';
import { cellId, EXPECTED, isFaultPhase, PHASE_WINDOW_MS, rng, type Cell, type FaultPhase, type Outcome } from './cells.js';
import { REPO, startOrchestrator, type Orchestrator } from './orchestrator.js';
import { runDirsUnder, Sampler } from './sampler.js';
import { actualOutcome, claimOf, judge } from './verdict.js';

const run = promisify(execFile);
const BALLAST = 'fault-ballast';
export const KEPT_LOG = /^failed-.+\.qemu\.log$/;
const DISK = { id: 'data', size: 32 << 20, fillMiB: 8 };

export interface CellResult {
  id: string;
  phase: FaultPhase;
  fault: string;
  seed: number;
  /** The phase migrate-vm was in when the fault struck (as its event stream said), and how far in. */
  hitPhase: string | undefined;
  offsetMs: number;
  exit: string;
  outcome: Outcome;
  expected: readonly Outcome[];
  pass: boolean;
  problems: string[];
  seconds: number;
  /** What the harness did after the fault (a recover run, a wait for the watchdog). */
  notes: string[];
  replay: string;
}

export const replayCommand = (c: Cell, seed: number): string => `npm run faults -- --cells ${cellId(c)} --seed ${seed}`;

/** A cell's result, as both rigs report it; a failed cell carries migrate-vm's last stderr lines. */
export function cellResult(
  cell: Cell,
  seed: number,
  r: Pick<CellResult, 'hitPhase' | 'offsetMs' | 'exit' | 'outcome' | 'expected' | 'problems' | 'notes'> & { t0: number; orch: Pick<Orchestrator, 'stderr' | 'events'> | undefined },
): CellResult {
  if (r.problems.length && r.orch) r.notes.push(`migrate-vm stderr (last lines): ${r.orch.stderr().trim().split('\n').slice(-6).join(' | ')}`);
  // Replaying a failure: FERRY_FAULT_STDERR_DIR keeps migrate-vm's whole stderr (with FERRY_FAULT_LOG_LEVEL=debug, its log).
  const keep = process.env.FERRY_FAULT_STDERR_DIR;
  if (keep && r.orch) {
    writeFileSync(join(keep, `${cellId(cell).replace('/', '_')}-${seed}.stderr`), r.orch.stderr());
    writeFileSync(join(keep, `${cellId(cell).replace('/', '_')}-${seed}.events`), r.orch.events.map((e) => JSON.stringify(e)).join('\n'));
  }
  return {
    id: cellId(cell),
    phase: cell.phase,
    fault: cell.fault,
    seed,
    hitPhase: r.hitPhase,
    offsetMs: r.offsetMs,
    exit: r.exit,
    outcome: r.outcome,
    expected: r.expected,
    pass: r.problems.length === 0,
    problems: r.problems,
    seconds: Math.round((performance.now() - r.t0) / 100) / 10,
    notes: r.notes,
    replay: replayCommand(cell, seed),
  };
}

export function expectedFor(c: Cell, hitPhase: string | undefined): readonly Outcome[] {
  const row = EXPECTED[c.fault];
  return (isFaultPhase(hitPhase) ? row[hitPhase] : undefined) ?? row[c.phase] ?? [];
}

/** Pids of every process whose command line names `root` (the QEMUs of this cell). */
export async function pidsNaming(root: string): Promise<number[]> {
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmd = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(root) && /qemu-system/.test(cmd)) out.push(Number(name));
  }
  return out;
}

function kill(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, sig);
  } catch {
    // gone already
  }
}

async function listTree(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
      const p = join(d, e.name);
      out.push(relative(dir, p));
      if (e.isDirectory()) await walk(p);
    }
  };
  await walk(dir);
  return out.sort();
}

/** What a QEMU still holds of a migration: jobs, ferry's nodes, exports, a migration in flight. */
export async function qemuLeftovers(q: QmpClient, side: string): Promise<string[]> {
  const out: string[] = [];
  const jobs = await q.execute('query-block-jobs').catch(() => []);
  if (jobs.length) out.push(`${side}: block jobs ${jobs.map((j) => j.device).join(', ')}`);
  const nodes = await q.execute('query-named-block-nodes', { flat: true }).catch(() => []);
  const ferry = nodes.map((n) => n['node-name'] ?? '').filter((n) => n.startsWith('ferry-'));
  if (ferry.length) out.push(`${side}: block nodes ${ferry.join(', ')}`);
  const exports = await q.executeRaw('query-block-exports').catch(() => []);
  if (Array.isArray(exports) && exports.length) out.push(`${side}: ${exports.length} block export(s)`);
  const mig = await q.execute('query-migrate').catch(() => ({ status: undefined }));
  if (mig.status && /active|setup|pre-switchover|device|postcopy|cancelling/.test(mig.status)) out.push(`${side}: a migration in state ${mig.status}`);
  return out;
}

async function waitFor(pred: () => boolean, ms: number): Promise<boolean> {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    if (pred()) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return pred();
}

/** Does this checkout's migrate-vm know `--recover` (issue 17's cleanup command)? */
let recoverSupported: boolean | undefined;
async function hasRecover(): Promise<boolean> {
  if (recoverSupported === undefined) {
    const r = await run(process.execPath, ['bin/migrate-vm.mjs', '--help'], { cwd: REPO }).catch(() => ({ stdout: '' }));
    recoverSupported = r.stdout.includes('--recover');
  }
  return recoverSupported;
}

export async function runLocalCell(cell: Cell, seed: number): Promise<CellResult> {
  const t0 = performance.now();
  const rand = rng(seed, cellId(cell));
  const offsetMs = Math.floor(rand() * PHASE_WINDOW_MS[cell.phase]);
  const root = await mkdtemp(join(tmpdir(), 'ferry-fault-'));
  const hostA = join(root, 'host-a');
  const hostB = join(root, 'host-b');
  const childTmp = join(root, 'tmp');
  for (const d of [hostA, hostB, childTmp]) await mkdir(d);
  const notes: string[] = [];
  const problems: string[] = [];
  let mounted = false;
  let vm: VmProcess | undefined;
  let orch: Orchestrator | undefined;
  let sampler: Sampler | undefined;
  let hitPhase: string | undefined;
  let exit = 'none';
  let outcome: Outcome = 'uncertain';
  let expected: readonly Outcome[] = [];
  try {
    if (cell.fault === 'disk-full') {
      await run('mount', ['-t', 'tmpfs', '-o', 'size=128m', 'tmpfs', hostB]);
      mounted = true;
    }
    const image = await loadGuestImage();
    const diskPath = join(hostA, `${DISK.id}.qcow2`);
    await makeDisk(diskPath, { id: DISK.id, format: 'qcow2', size: DISK.size, fillMiB: DISK.fillMiB });
    const spec = parseVmSpec({
      name: 'fault',
      memoryMiB: 128,
      accel: 'tcg',
      disks: [{ id: DISK.id, path: diskPath, format: 'qcow2' }],
      boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend({ write: { rate: 50 }, tickMs: 50, disks: 1 })}` },
      runDir: join(hostA, 'run'),
    });
    vm = await launchVm(spec, { timeoutMs: 30_000 });
    await vm.serial.waitForLine((l) => l.text.startsWith('ack '), { timeoutMs: 60_000, what: 'the first acked write' });
    const specPath = join(hostA, 'vm.json');
    await writeFile(specPath, JSON.stringify(spec));
    const hostABefore = await listTree(hostA);
    const src = vm;
    // The source's free monitor is migrate-vm's; the harness asks on the launcher's.
    const sourceStatus = async (): Promise<string> => (src.running() ? (await src.qmp.execute('query-status', undefined, { timeoutMs: 2_000 })).status : 'gone');
    sampler = new Sampler({ runDirs: async () => [spec.runDir], status: sourceStatus }, { runDirs: () => runDirsUnder(hostB) });
    sampler.start();

    const lazy = cell.phase === 'hydrate';
    const argv = ['--spec', specPath, '--to-dir', hostB, '--json', '--bandwidth', '16M', '--progress-timeout', '20', '--timeout', '90', ...(lazy ? ['--mode', 'lazy', '--hydration-rate', '4M'] : [])];
    const env: NodeJS.ProcessEnv = { TMPDIR: childTmp, FERRY_LOG_LEVEL: process.env.FERRY_FAULT_LOG_LEVEL ?? 'warn' };
    if (cell.fault === 'disk-io-error') {
      env.FERRY_QEMU = join(REPO, 'test/faults/blkdebug-qemu.sh');
      env.FERRY_FAULT_REAL_QEMU = process.env.FERRY_QEMU ?? 'qemu-system-x86_64';
      // prepare-destination: from the first write on; mirror: after a seeded number of them.
      env.FERRY_FAULT_EIO_AFTER = String(cell.phase === 'mirror' ? 1 + Math.floor(rand() * 30) : 0);
      notes.push(`EIO after ${env.FERRY_FAULT_EIO_AFTER} write(s)`);
    }
    const o = startOrchestrator(argv, { env });
    orch = o;
    let injected: Promise<void> | undefined;
    const destPid = async (): Promise<number | undefined> => {
      for (const d of await runDirsUnder(hostB)) {
        const pid = Number((await readFile(join(d, 'qemu.pid'), 'utf8').catch(() => '')).trim());
        if (pid > 0) return pid;
      }
      return undefined;
    };
    const inject = async (): Promise<void> => {
      hitPhase = o.phases.at(-1)?.phase;
      switch (cell.fault) {
        case 'kill-source-qemu':
          kill(src.pid);
          break;
        case 'kill-destination-qemu': {
          // Early in prepare-destination its QEMU may not be there yet: the fault waits for it.
          let pid = await destPid();
          for (let i = 0; i < 200 && pid === undefined && o.child.exitCode === null; i++) {
            await new Promise((r) => setTimeout(r, 50));
            pid = await destPid();
          }
          hitPhase = o.phases.at(-1)?.phase;
          if (pid === undefined) notes.push('no destination QEMU appeared');
          kill(pid);
          break;
        }
        case 'kill-orchestrator':
          kill(o.child.pid);
          break;
        case 'sigterm-orchestrator':
          kill(o.child.pid, 'SIGTERM');
          break;
        case 'disk-full': {
          const fs = await statfs(hostB);
          const free = fs.bavail * fs.bsize;
          await run('fallocate', ['-l', String(free), join(hostB, BALLAST)]).catch(() => run('dd', ['if=/dev/zero', `of=${join(hostB, BALLAST)}`, 'bs=1M']).catch(() => undefined));
          break;
        }
        case 'disk-io-error':
          break; // standing from the destination's start (blkdebug-qemu.sh)
        default:
          throw new Error(`the local rig has no fault ${cell.fault}`);
      }
    };
    o.onPhase(cell.phase, () => {
      injected = new Promise<void>((r) => setTimeout(r, offsetMs)).then(inject);
    });
    const timeout = setTimeout(() => {
      problems.push('migrate-vm did not end within 150 s: killed');
      kill(o.child.pid);
    }, 150_000);
    const ended = await o.exited;
    clearTimeout(timeout);
    await injected;
    if (!injected) problems.push(`phase ${cell.phase} never began (phases seen: ${o.phases.map((p) => p.phase).join(' → ')})`);
    exit = ended.signal ? ended.signal : String(ended.code);
    const orchestratorKilled = cell.fault === 'kill-orchestrator' && ended.signal === 'SIGKILL';

    const settledState = (): boolean => {
      const l = sampler!.last();
      return !!l && ((l.source === 'running' && l.destination === 'gone') || (l.destination === 'running' && l.source === 'gone') || (l.source === 'gone' && l.destination === 'gone'));
    };
    if (orchestratorKilled) {
      // A dead orchestrator must cost a bounded pause: something it left behind settles the guest.
      const settled = await waitFor(settledState, 20_000);
      notes.push(settled ? 'settled without help after the kill' : 'not settled 20 s after the kill');
      if (await hasRecover()) {
        const r = await run(process.execPath, ['bin/migrate-vm.mjs', '--recover', '--spec', specPath, '--to-dir', hostB], { cwd: REPO, env: { ...process.env, TMPDIR: childTmp }, timeout: 60_000 }).then(
          (x) => ({ code: 0, out: x.stdout + x.stderr }),
          (e: { code?: number; stdout?: string; stderr?: string }) => ({ code: e.code ?? -1, out: (e.stdout ?? '') + (e.stderr ?? '') }),
        );
        notes.push(`migrate-vm --recover: exit ${r.code}: ${r.out.trim().split('\n').at(-1) ?? ''}`);
      } else {
        notes.push('this migrate-vm has no --recover');
      }
    }
    // Let whichever copy runs show a few ticks (and a killed one none).
    await waitFor(settledState, 10_000);
    await new Promise((r) => setTimeout(r, 800));
    await sampler.stop();
    const last = sampler.last()!;
    // Ticks on B, or a `cont` there that succeeded (exit 0 past the point of no return) and a fault
    // that struck before B's first tick was read.
    const ranOnDestination = sampler.ticks.destination.size > 0 || (o.pastNoReturn() && ended.code === 0);
    const overlaysBacked = lazy && last.destination === 'running' ? await backed(join(hostB, `${DISK.id}.qcow2`)) : false;
    outcome = actualOutcome({ source: last.source, destination: last.destination, overlaysBacked }, ranOnDestination, lazy);
    expected = expectedFor(cell, hitPhase);

    // Debris, while everything that is left is still there.
    const debris: string[] = [];
    const qemus = await pidsNaming(root);
    const allowed = new Set<number>();
    if (last.source !== 'gone' && vm.running()) allowed.add(vm.pid);
    const dpid = await destPid();
    if (last.destination !== 'gone' && dpid !== undefined) allowed.add(dpid);
    const stray = qemus.filter((p) => !allowed.has(p));
    if (stray.length) debris.push(`QEMU process(es) ${stray.join(', ')} left running`);
    // Uncertain leaves the source paused as it was, mirror and NBD node included, for the operator
    // (`migrate-vm --recover` settles it once the destination was looked at), as the netns rig does.
    if (vm.running() && outcome !== 'needs-source' && outcome !== 'uncertain') debris.push(...(await qemuLeftovers(vm.qmp, 'source')));
    // A dead destination's log is kept on purpose until the operator read it (DESTINATION_DIED names it).
    const bFiles = (await readdir(hostB)).filter((f) => f !== BALLAST && f !== 'lost+found' && !KEPT_LOG.test(f));
    if (outcome === 'source' || outcome === 'nowhere') {
      if (bFiles.length) debris.push(`host B still holds ${bFiles.join(', ')}`);
    } else {
      const extra = bFiles.filter((f) => f !== `${DISK.id}.qcow2` && !f.startsWith('run-'));
      if (extra.length) debris.push(`host B holds ${extra.join(', ')} beside the guest's disk`);
      if (bFiles.filter((f) => f.startsWith('run-')).length > 1) debris.push(`host B holds more than one run dir: ${bFiles.join(', ')}`);
    }
    const hostAAfter = await listTree(hostA);
    const newInA = hostAAfter.filter((f) => !hostABefore.includes(f));
    if (newInA.length) debris.push(`host A has new files ${newInA.join(', ')}`);
    const tmpLeft = (await readdir(childTmp)).filter((f) => !f.startsWith('tsx-')); // tsx's compile cache is not ferry's
    if (tmpLeft.length) debris.push(`migrate-vm's TMPDIR holds ${tmpLeft.join(', ')}`);

    // Every copy stops; then the disks of the side the guest ended on hold every acked write.
    for (const p of qemus) kill(p);
    await vm.exited.catch(() => undefined);
    await waitFor(() => false, 200);
    const acked = sampler.acks.get(DISK.id) ?? -1;
    let writes = { ok: true, detail: '' };
    if (outcome === 'needs-source' || lazy) {
      notes.push('disks not verified: a lazy overlay reads the rest from the source export');
    } else {
      const side = outcome === 'destination' || outcome === 'killed' ? join(hostB, `${DISK.id}.qcow2`) : diskPath;
      const rep = await verifyDisk(side, { format: 'qcow2', diskId: DISK.id, ackedSeq: acked }).catch((e: unknown) => ({ ok: false, missingCount: -1, corruptCount: -1, highestContiguous: -1, error: String(e) }));
      writes = { ok: rep.ok, detail: `${side === diskPath ? 'source' : 'destination'} disk, acked ${acked}: ${JSON.stringify({ missing: rep.missingCount, corrupt: rep.corruptCount, contiguous: rep.highestContiguous })}` };
    }
    problems.push(...judge({ sampler, claimed: claimOf(orchestratorKilled ? null : ended.code), actual: outcome, expected, orchestratorKilled, writes, debris }));
    if (!orchestratorKilled && ended.code !== 0) {
      const last = o.events.at(-1);
      if (last?.event === 'summary') notes.push(`summary: ${String(last.code)}: ${String(last.message).slice(0, 300)}`);
    }
  } catch (err) {
    problems.push(`harness error: ${err instanceof Error ? err.message : String(err)}`);
  } finally {
    await sampler?.stop().catch(() => undefined);
    if (orch && orch.child.exitCode === null) kill(orch.child.pid);
    for (const p of await pidsNaming(root)) kill(p);
    if (vm) {
      kill(vm.pid);
      await vm.exited.catch(() => undefined);
    }
    await waitFor(() => false, 300);
    if (mounted) await run('umount', ['-l', hostB]).catch((e: unknown) => problems.push(`harness: umount ${hostB}: ${String(e)}`));
    await rm(root, { recursive: true, force: true });
    // migrate-vm's detached watchdog may still be on its way out (and tsx writes its cache into
    // the cell's TMPDIR): a second sweep a moment later.
    await waitFor(() => false, 1_000);
    await rm(root, { recursive: true, force: true });
    const mounts = await readFile('/proc/mounts', 'utf8');
    if (mounts.includes(root)) problems.push(`debris: a mount under ${root} is left`);
  }
  return cellResult(cell, seed, { t0, orch, hitPhase, offsetMs, exit, outcome, expected, problems, notes });
}

/** A qcow2 overlay whose header still names a backing file (hydration not finished), read with -U beside its QEMU. */
async function backed(path: string): Promise<boolean> {
  const { stdout } = await run('qemu-img', ['info', '-U', '--output=json', path], { timeout: 10_000 });
  const info: unknown = JSON.parse(stdout);
  return typeof info === 'object' && info !== null && 'backing-filename' in info;
}
