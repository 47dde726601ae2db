/**
 * The downtime floor (issue 11 item 3): the same pre-copy migration ferry performs, driven by
 * the minimal QMP sequence and nothing else, so that ferry's figures have something to be
 * compared with in the same session on the same machine.
 *
 *   destination  -incoming defer -S; nbd-server-start; block-export-add (writable);
 *                migrate-set-capabilities events + late-block-activate; migrate-incoming
 *   source       blockdev-add nbd; blockdev-mirror (background); BLOCK_JOB_READY;
 *                migrate-set-capabilities events + pause-before-switchover (+ auto-converge);
 *                migrate-set-parameters (ferry's defaults: unlimited bandwidth, 300 ms); migrate
 *   switchover   MIGRATION pre-switchover -> block-job-cancel -> JOB_STATUS_CHANGE concluded ->
 *                migrate-continue -> destination MIGRATION completed -> cont on the destination
 *
 * Every event wait is registered (an event cursor taken) before the command that causes it;
 * nothing is polled, nothing queried on the way. query-migrate (for QEMU's downtime figure) and
 * the tidy-up come after `cont`.
 *
 * Scenarios, as bench/migrate.ts's guest (256 MiB RAM, 1 GiB qcow2 holding --fill MiB, ticking
 * every 20 ms): idle, write-100 (the demo's guest), write-200 (4 KiB records at 200/s), write-max (as fast as it can), dirty
 * (rewriting 64 MiB of RAM as fast as it can).
 *
 *   npx tsx bench/floor.ts [idle write-100 write-200 write-max dirty] [--runs 5] [--fill 200]
 *     [--qemu /path/qemu-system-x86_64 --data-dir /path/share/qemu] [--stop-nbd-before-cont] [--relay]
 *     [--active-sync]
 *
 * --relay puts the destination's NBD server behind ferry's NBD relay (TCP_NODELAY; what ferry
 * does on QEMU 7.2), so the floor measures the same data path as ferry. --active-sync (QEMU >= 8.2)
 * turns the READY mirror to write-blocking and waits for actively-synced, as ferry's `auto` does.
 *
 * --stop-nbd-before-cont adds nbd-server-stop on the destination between completed and cont,
 * timed: without it, `cont` finds the writable NBD export still holding WRITE on the disk node and
 * QEMU logs "Permission conflict on node 'disk-root'" (reported, then ignored: the device keeps
 * sharing WRITE). The column permissionConflict counts the runs whose destination log has it.
 *
 * Prints one JSON document on stdout, a table on stderr: QEMU's downtime (query-migrate), the
 * guest's ticker gap seen from the host, the switchover phase (pre-switchover to cont returned)
 * split into its steps, median and [min..max] over the runs.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { convergeActively } from '../src/engine/convergence/active-sync.js';
import { startNbdRelay, type NbdRelay } from '../src/engine/convergence/nbd-relay.js';
import { loadGuestImage } from '../src/guest/image.js';
import { workloadAppend, type Workload } from '../src/guest/serial.js';
import { tickerGap } from '../src/measure/ticker.js';
import { eventIs, type QmpClient, type QmpEvent } from '../src/qmp/index.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { diskNodeName, parseVmSpec, retargetSpec, type VmSpec } from '../src/qemu/spec.js';
import { freePort } from '../src/host/ports.js';
import { fillDisk } from './scenario.js';

const run = promisify(execFile);
const GiB = 1 << 30;

const SCENARIOS: Record<string, Workload> = {
  idle: { tickMs: 20 },
  /** The demo's guest (scripts/demo.ts): 100 records/s. */
  // The same guests as ferry's convergence suite, ferry.probe included (a timed read and write
  // every 50 ms): a floor whose guest did less would flatter itself.
  'write-100': { tickMs: 20, probeMs: 50, write: { rate: 100 } },
  'write-200': { tickMs: 20, probeMs: 50, write: { rate: 200 } },
  'write-max': { tickMs: 20, probeMs: 50, write: { rate: 0 } },
  dirty: { tickMs: 20, dirty: { mib: 64, mibPerSec: 0 } },
};

function flag(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : dflt;
}
const VALUED = new Set(['--runs', '--fill', '--qemu', '--data-dir']);
const positional = process.argv.slice(2).filter((a, i, all) => !a.startsWith('--') && !(i > 0 && VALUED.has(all[i - 1]!)));
const chosen = positional.length > 0 ? positional : Object.keys(SCENARIOS);
for (const c of chosen) if (!(c in SCENARIOS)) throw new Error(`unknown scenario '${c}'; known: ${Object.keys(SCENARIOS).join(', ')}`);
const runs = Number(flag('runs', '5'));
const fillMiB = Number(flag('fill', '200'));
const qemuBinary = flag('qemu', 'qemu-system-x86_64');
const dataDir = flag('data-dir', '');
const extraArgs = dataDir ? ['-L', dataDir] : [];
/** --stop-nbd-before-cont: nbd-server-stop on the destination between completed and cont. */
const stopNbdBeforeCont = process.argv.includes('--stop-nbd-before-cont');
/** --relay: the destination's NBD server on a unix socket behind ferry's NBD relay (src/engine/convergence). */
const withRelay = process.argv.includes('--relay');
/** --active-sync: after READY, block-job-change to write-blocking and wait for actively-synced (QEMU >= 8.2). */
const activeSync = process.argv.includes('--active-sync');
const DOWNTIME_LIMIT_MS = 300;
const WAIT_MS = 120_000;

interface Row {
  scenario: string;
  run: number;
  ok: boolean;
  error?: string;
  mirrorReadyMs?: number;
  totalMs?: number;
  qemuDowntimeMs?: number | undefined;
  tickerGapMs?: number;
  /** pre-switchover event to `cont` returned, and its steps. */
  switchoverMs?: number;
  steps?: { cancelMs: number; continueToCompletedMs: number; stopNbdMs?: number; contMs: number };
  /** The destination's qemu.log has QEMU's "Permission conflict" line (issue 15, defect 17). */
  permissionConflict?: boolean;
}

/** Resolves with the first event after `since` matching `pred`. */
function eventAfter(q: QmpClient, since: number, what: string, pred: (e: QmpEvent) => boolean): Promise<QmpEvent> {
  return q.waitForEvent(pred, { since, timeoutMs: WAIT_MS, what });
}
const migrationStatus = (status: string) => (e: QmpEvent): boolean => eventIs(e, 'MIGRATION') && e.data.status === status;
const migrationEnded = (e: QmpEvent): boolean => eventIs(e, 'MIGRATION') && ['completed', 'failed', 'cancelled'].includes(e.data.status);

async function migrateOnce(name: string, i: number, image: { kernel: string; initrd: string }): Promise<Row> {
  const root = await mkdtemp(join(tmpdir(), `ferry-floor-${name}-`));
  let src: VmProcess | undefined;
  let dst: VmProcess | undefined;
  let relay: NbdRelay | undefined;
  try {
    const hostA = join(root, 'a');
    const hostB = join(root, 'b');
    await mkdir(hostA);
    await mkdir(hostB);
    const disk = join(hostA, 'root.qcow2');
    await fillDisk(disk, 'qcow2', GiB, fillMiB);
    const spec: VmSpec = parseVmSpec({
      name: `floor-${name}`,
      memoryMiB: 256,
      accel: 'tcg',
      disks: [{ id: 'root', path: disk, format: 'qcow2' }],
      boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend(SCENARIOS[name]!)}` },
      runDir: join(hostA, 'run'),
      extraArgs,
    });
    src = await launchVm(spec, { timeoutMs: 30_000, qemuBinary });
    await src.serial.waitForLine((l) => l.text === 'ferry-ready', { timeoutMs: 60_000, what: 'ferry-ready' });
    await new Promise((r) => setTimeout(r, 1_000));

    const destSpec = retargetSpec(spec, { dir: hostB, runDir: join(hostB, 'run') });
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', destSpec.disks[0]!.path, String(GiB)]);
    const t0 = performance.now();
    dst = await launchVm(destSpec, { incoming: true, startPaused: true, timeoutMs: 30_000, qemuBinary });
    const sq = src.qmp;
    const dq = dst.qmp;
    const call = { timeoutMs: 30_000 };

    let nbdPort: number;
    if (withRelay) {
      const unixPath = join(destSpec.runDir, 'nbd.sock');
      await dq.execute('nbd-server-start', { addr: { type: 'unix', data: { path: unixPath } } }, call);
      relay = await startNbdRelay({ host: '127.0.0.1', ports: [0], unixPath });
      nbdPort = relay.port;
    } else {
      nbdPort = await freePort();
      await dq.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(nbdPort) } } }, call);
    }
    await dq.execute('block-export-add', { type: 'nbd', id: 'root', 'node-name': diskNodeName('root'), name: 'root', writable: true }, call);
    await sq.execute('blockdev-add', { driver: 'nbd', 'node-name': 'nbd-root', server: { type: 'inet', host: '127.0.0.1', port: String(nbdPort) }, export: 'root' }, call);
    const sinceMirror = sq.eventCursor();
    await sq.execute('blockdev-mirror', { 'job-id': 'mirror-root', device: diskNodeName('root'), target: 'nbd-root', sync: 'top', 'copy-mode': 'background', 'auto-dismiss': false }, call);
    await eventAfter(sq, sinceMirror, 'BLOCK_JOB_READY', (e) => e.event === 'BLOCK_JOB_READY');
    if (activeSync) await convergeActively(sq, ['mirror-root'], { since: sinceMirror, readyBoundMs: 0, timeoutMs: WAIT_MS });
    const mirrorReadyMs = performance.now() - t0;

    const caps = [
      { capability: 'events', state: true },
      { capability: 'pause-before-switchover', state: true },
      { capability: 'auto-converge', state: true },
    ];
    await sq.execute('migrate-set-capabilities', { capabilities: caps }, call);
    await sq.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40, 'downtime-limit': DOWNTIME_LIMIT_MS }, call);
    await dq.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'late-block-activate', state: true }] }, call);
    const migPort = await freePort();
    const sinceDest = dq.eventCursor();
    await dq.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${migPort}` }, call);
    const sinceMigrate = sq.eventCursor();
    await sq.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` }, call);

    // Every wait of the switchover is registered now, before the commands that cause them.
    const preSwitchover = eventAfter(sq, sinceMigrate, 'pre-switchover', (e) => migrationStatus('pre-switchover')(e) || migrationEnded(e));
    const destEnded = eventAfter(dq, sinceDest, "the destination's migration to end", migrationEnded);
    destEnded.catch(() => undefined);
    const pre = await preSwitchover;
    if (!migrationStatus('pre-switchover')(pre)) throw new Error(`migration ended before switchover: ${JSON.stringify(pre)}`);
    const tPre = performance.now();

    const sinceCancel = sq.eventCursor();
    await sq.execute('block-job-cancel', { device: 'mirror-root' }, call);
    await eventAfter(sq, sinceCancel, 'the mirror to conclude', (e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === 'mirror-root' && e.data.status === 'concluded');
    const tCancelled = performance.now();
    await sq.execute('migrate-continue', { state: 'pre-switchover' }, call);
    const ended = await destEnded;
    if (!migrationStatus('completed')(ended)) throw new Error(`the destination's migration ended ${JSON.stringify(ended)}`);
    const tCompleted = performance.now();
    if (stopNbdBeforeCont) await dq.execute('nbd-server-stop', undefined, call);
    const tStopped = performance.now();
    await dq.execute('cont', undefined, call);
    const tCont = performance.now();

    // Past the pause: the figures and the tidy-up.
    const mig = await sq.execute('query-migrate', undefined, call);
    await dst.serial.waitForLine((l) => l.text.startsWith('tick '), { timeoutMs: 10_000, what: 'a tick on the destination' });
    await new Promise((r) => setTimeout(r, 500));
    const gap = tickerGap([...src.serial.history(), ...dst.serial.history()], { from: tPre - 2_000 });
    const destLog = await readFile(join(destSpec.runDir, 'qemu.log'), 'utf8').catch(() => '');
    return {
      scenario: name,
      run: i,
      ok: true,
      mirrorReadyMs: Math.round(mirrorReadyMs),
      totalMs: Math.round(tCont - t0),
      qemuDowntimeMs: mig.downtime,
      tickerGapMs: Math.round(gap.maxGapMs),
      switchoverMs: Math.round(tCont - tPre),
      steps: {
        cancelMs: Math.round(tCancelled - tPre),
        continueToCompletedMs: Math.round(tCompleted - tCancelled),
        ...(stopNbdBeforeCont ? { stopNbdMs: Math.round(tStopped - tCompleted) } : {}),
        contMs: Math.round(tCont - tStopped),
      },
      permissionConflict: destLog.includes('Permission conflict'),
    };
  } catch (err) {
    return { scenario: name, run: i, ok: false, error: err instanceof Error ? err.message : String(err) };
  } finally {
    await relay?.close();
    await dst?.kill();
    await src?.kill();
    await rm(root, { recursive: true, force: true });
  }
}

function stat(xs: (number | undefined)[]): string {
  const v = xs.filter((x): x is number => typeof x === 'number').sort((a, b) => a - b);
  if (v.length === 0) return '-';
  return `${v[Math.floor(v.length / 2)]} [${v[0]}..${v[v.length - 1]}]`;
}

async function main(): Promise<void> {
  const image = await loadGuestImage();
  const { stdout: version } = await run(qemuBinary, [...extraArgs, '--version']);
  const rows: Row[] = [];
  try {
    for (const name of chosen) {
      for (let i = 0; i < runs; i++) {
        const row = await migrateOnce(name, i, image);
        rows.push(row);
        process.stderr.write(`${JSON.stringify(row)}\n`);
      }
    }
  } finally {
    await reapAll();
  }
  const summary = chosen.map((name) => {
    const rs = rows.filter((r) => r.scenario === name && r.ok);
    return {
      scenario: name,
      ok: `${rs.length}/${rows.filter((r) => r.scenario === name).length}`,
      qemuDowntimeMs: stat(rs.map((r) => r.qemuDowntimeMs)),
      tickerGapMs: stat(rs.map((r) => r.tickerGapMs)),
      switchoverMs: stat(rs.map((r) => r.switchoverMs)),
      cancelMs: stat(rs.map((r) => r.steps?.cancelMs)),
      continueToCompletedMs: stat(rs.map((r) => r.steps?.continueToCompletedMs)),
      stopNbdMs: stat(rs.map((r) => r.steps?.stopNbdMs)),
      contMs: stat(rs.map((r) => r.steps?.contMs)),
      permissionConflict: `${rs.filter((r) => r.permissionConflict).length}/${rs.length}`,
      mirrorReadyMs: stat(rs.map((r) => r.mirrorReadyMs)),
    };
  });
  process.stdout.write(`${JSON.stringify({ qemu: version.split('\n')[0], relay: withRelay, activeSync, stopNbdBeforeCont, fillMiB, runs, rows, summary }, null, 2)}\n`);
  const cols = ['scenario', 'ok', 'qemuDowntimeMs', 'tickerGapMs', 'switchoverMs', 'cancelMs', 'continueToCompletedMs', 'stopNbdMs', 'contMs', 'mirrorReadyMs', 'permissionConflict'] as const;
  const width = (c: (typeof cols)[number]): number => Math.max(c.length, ...summary.map((s) => String(s[c]).length));
  process.stderr.write(`${version.split('\n')[0]}${withRelay ? ', NBD relay' : ''}${activeSync ? ', active-sync' : ''}${stopNbdBeforeCont ? ', nbd-server-stop before cont' : ''}, ${runs} run(s) per scenario, median [min..max], ms\n`);
  process.stderr.write(`${cols.map((c) => c.padEnd(width(c))).join('  ')}\n`);
  for (const s of summary) process.stderr.write(`${cols.map((c) => String(s[c]).padEnd(width(c))).join('  ')}\n`);
}

main().catch(async (err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  await reapAll();
  process.exit(1);
});
