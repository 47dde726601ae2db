/**
 * npm run demo: boot the tiny guest with a disk workload on "host A", migrate it with its disk to
 * "host B" while it writes, then show that it runs there, wrote on past the switchover, and lost
 * nothing. Host A and B are folders under the system temp dir (removed at the end, unless --keep).
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { fmtBytes, fmtMs, renderProgress, renderSummary } from '../src/cli/progress.js';
import { LocalDestination, LocalSource } from '../src/engine/local-endpoint.js';
import { migrate } from '../src/engine/migrate.js';
import type { VmSpec } from '../src/qemu/spec.js';
import { loadGuestImage } from '../src/guest/image.js';
import { highestAcks, parseSerialLine, workloadAppend } from '../src/guest/serial.js';
import { verifyDisk } from '../src/guest/verify.js';
import { launchVm } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { parseVmSpec } from '../src/qemu/spec.js';
import { tickerGap } from '../src/measure/ticker.js';

const run = promisify(execFile);
const keep = process.argv.includes('--keep');
const out = (s: string): void => void process.stdout.write(`${s}\n`);
const checks: { what: string; ok: boolean; detail: string }[] = [];
const check = (what: string, ok: boolean, detail: string): void => {
  checks.push({ what, ok, detail });
  out(`  ${ok ? 'ok  ' : 'FAIL'} ${what}: ${detail}`);
};

async function main(): Promise<number> {
  const root = await mkdtemp(join(tmpdir(), 'ferry-demo-'));
  const hostA = join(root, 'host-a');
  const hostB = join(root, 'host-b');
  const ac = new AbortController();
  const onSignal = (): void => ac.abort(new Error('interrupted'));
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await mkdir(hostA);
    await mkdir(hostB);
    const image = await loadGuestImage();
    const disk = join(hostA, 'root.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(256 << 20)]);
    // Some data already on the disk, as a real VM would have.
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 128M 64M', disk]);
    const spec: VmSpec = parseVmSpec({
      name: 'demo',
      memoryMiB: 256,
      accel: 'tcg',
      disks: [{ id: 'root', path: disk, format: 'qcow2' }],
      boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend({ write: { rate: 100 }, tickMs: 20, disks: 1 })}` },
      runDir: join(hostA, 'run'),
    });
    await writeFile(join(hostA, 'vm.json'), JSON.stringify(spec, null, 2));

    out(`ferry demo: host A = ${hostA}, host B = ${hostB}`);
    out('booting the guest on host A (TCG, 256 MiB RAM, 256 MiB qcow2 disk holding 64 MiB)...');
    const t0 = performance.now();
    const a = await launchVm(spec, { timeoutMs: 30_000, signal: ac.signal });
    await a.serial.waitForLine((l) => l.text === 'ferry-ready', { timeoutMs: 60_000, what: 'the guest to boot', signal: ac.signal });
    out(`  guest up in ${fmtMs(performance.now() - t0)} (pid ${a.pid}), writing 100 records/s and ticking every 20 ms`);
    await a.serial.waitForLine((l) => { const p = parseSerialLine(l.text); return p.kind === 'ack' && p.seq >= 50; }, { timeoutMs: 30_000, what: 'acks', signal: ac.signal });
    const beforeAck = highestAcks(a.serial.history()).get('root') ?? -1;
    out(`  acknowledged so far: record ${beforeAck}`);

    out('migrating to host B...');
    const destination = new LocalDestination({ dir: hostB, name: 'host B' });
    const tty = process.stderr.isTTY === true;
    const migrationStart = performance.now();
    const result = await migrate({
      spec,
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock'), name: 'host A' }),
      destination,
      signal: ac.signal,
      onEvent: (e) => {
        if (e.event === 'progress') process.stderr.write(tty ? `\r${renderProgress(e.progress).slice(0, (process.stderr.columns ?? 120) - 1)}` : '');
        else if (e.event === 'phase' && !tty) process.stderr.write(`  phase ${e.phase}\n`);
      },
    });
    if (tty) process.stderr.write('\n');
    out(renderSummary(result));

    out('checking the result...');
    const b = destination.incoming!.process;
    await a.exited;
    check('source QEMU is gone', !a.running(), `pid ${a.pid} exited`);
    const st = await b.qmp.execute('query-status');
    check('destination runs the guest', st.status === 'running', `host B pid ${b.pid} is ${st.status}`);
    const lastOnA = highestAcks(a.serial.history()).get('root') ?? -1;
    await b.serial.waitForLine((l) => { const p = parseSerialLine(l.text); return p.kind === 'ack' && p.seq > lastOnA + 50; }, { timeoutMs: 30_000, what: 'acks on host B' });
    const lastOnB = highestAcks(b.serial.history()).get('root') ?? -1;
    check('workload went on after the switchover', lastOnB > lastOnA, `last ack on A ${lastOnA}, on B ${lastOnB} (before migrating: ${beforeAck})`);
    const gap = tickerGap([...a.serial.history(), ...b.serial.history()], { from: migrationStart });
    await b.quit({ timeoutMs: 10_000 });
    const acked = highestAcks([...a.serial.history(), ...b.serial.history()]).get('root') ?? -1;
    const report = await verifyDisk(join(hostB, 'root.qcow2'), { format: 'qcow2', diskId: 'root', ackedSeq: acked });
    check(
      'every acknowledged write is on host B',
      report.ok,
      `records 0..${acked} checked: ${report.missingCount} missing, ${report.corruptCount} corrupt (${report.beyondAck} more written after the last ack)`,
    );
    out('');
    out(`total ${fmtMs(result.totalMs)}, downtime ${fmtMs(result.downtimeMs)} (QEMU ${result.qemuDowntimeMs ?? '-'} ms, the guest's ticker saw a gap of ${fmtMs(gap.maxGapMs)}), disk ${fmtBytes(result.diskBytes)} and RAM ${fmtBytes(result.ramBytes)} moved`);
    const failed = checks.filter((c) => !c.ok);
    out(failed.length === 0 ? 'demo: all checks passed' : `demo: ${failed.length} check(s) FAILED`);
    return failed.length === 0 ? 0 : 1;
  } catch (err) {
    out(`demo failed: ${err instanceof Error ? err.message : String(err)}`);
    return 1;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await reapAll();
    if (keep) out(`kept ${root}`);
    else await rm(root, { recursive: true, force: true });
  }
}

process.exit(await main());
