/**
 * The mirror-convergence helpers (src/engine/convergence/) against real QEMU, on raw QMP steps
 * (test/helpers/raw-precopy.ts) at the points where the engine calls them.
 *
 * QEMU 7.2 (the system's): a guest writing 200 records/s, mirrored into a destination whose
 * spec says `cache: none`, through the NBD relay: READY within the bound, and every acknowledged
 * write is on the destination after the migration. FERRY_TEST_NO_RELAY=1 runs the same without
 * the relay, to see it fail (the mirror is not READY in time).
 * QEMU >= 8.2 (FERRY_QEMU, or the bootstrap's 10.0): the same guest
 * on both sides O_DIRECT; convergeActively switches the mirror to write-blocking and sees it
 * actively-synced. Skipped, saying why, when no such QEMU is at hand.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { canChangeCopyMode, convergeActively } from '../../src/engine/convergence/active-sync.js';
import { nbdServerNeedsRelay } from '../../src/engine/convergence/nbd-relay.js';
import { highestAcks, parseSerialLine } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import type { VmProcess } from '../../src/qemu/launcher.js';
import { diskNodeName, fileNodeName } from '../../src/qemu/spec.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';
import { qemu10Binary } from '../helpers/qemu.js';
import { migrateRawToCompleted, mirrorJob, readyWithin, startRawDestination, startRawMirrors } from '../helpers/raw-precopy.js';

afterEach(cleanupAll);

/**
 * READY bound for a 200 writes/s guest on a disk holding 64 MiB. Measured on QEMU 7.2, the machine
 * loaded by other jobs (bench/mirror-ready.ts, 5 runs each): straight to QEMU's NBD server with an
 * O_DIRECT destination 2.8-7.2 s (and not in 40 s in the runs issue 11 reports); through the
 * relay 0.7-1.4 s.
 */
const READY_BOUND_MS = 2_500;

async function directOf(vm: VmProcess, node: string): Promise<boolean | undefined> {
  const nodes = await vm.qmp.execute('query-named-block-nodes', { flat: true });
  return nodes.find((n) => n['node-name'] === node)?.cache.direct;
}

async function ackBeyond(vm: VmProcess, seq: number): Promise<void> {
  await vm.serial.waitForLine((l) => { const p = parseSerialLine(l.text); return p.kind === 'ack' && p.seq > seq; }, { timeoutMs: 30_000, what: `an ack beyond ${seq}` });
}

test('QEMU 7.2: through the NBD relay the mirror of a writing guest into an O_DIRECT destination is READY in time; nothing lost', { timeout: 180_000 }, async () => {
  const { vm: source, spec, hostB } = await bootWorkloadGuest({
    disks: [{ id: 'root', format: 'qcow2', size: 256 << 20, fillMiB: 64 }],
    workload: { write: { rate: 200 }, tickMs: 20 },
  });
  expect(spec.disks[0]!.cache).toBe('none');
  await ackBeyond(source, 100);
  expect(canChangeCopyMode(await source.qmp.probeCapabilities())).toBe(false);
  const withRelay = process.env.FERRY_TEST_NO_RELAY !== '1';

  const dest = await startRawDestination(spec, hostB, { relay: withRelay });
  expect(nbdServerNeedsRelay(await dest.vm.qmp.execute('query-version'))).toBe(true);
  expect(await directOf(dest.vm, fileNodeName('root'))).toBe(true);
  const since = await startRawMirrors(source, dest);
  const readyMs = await readyWithin(source, since, READY_BOUND_MS);
  expect(readyMs, `mirror not READY within ${READY_BOUND_MS} ms`).toBeDefined();
  expect(dest.relay?.bytesToServer ?? 0).toBeGreaterThan(64 << 20);

  await migrateRawToCompleted(source, dest);
  const acked = highestAcks(source.serial.history()).get('root') ?? -1;
  // Issue 15 defect 17: the writable exports must be gone before `cont`, or QEMU cannot take back
  // the WRITE it shared during the migration and logs a Permission conflict (then runs on with
  // the device sharing WRITE). FERRY_TEST_KEEP_EXPORTS=1 keeps them, to see the line.
  if (process.env.FERRY_TEST_KEEP_EXPORTS !== '1') await dest.vm.qmp.execute('nbd-server-stop');
  await dest.relay?.close();
  await dest.vm.qmp.execute('cont');
  await ackBeyond(dest.vm, acked + 50);
  expect(await readFile(join(dest.spec.runDir, 'qemu.log'), 'utf8')).not.toMatch(/Permission conflict/);
  await dest.vm.kill();
  await source.kill();
  const report = await verifyDisk(dest.spec.disks[0]!.path, { format: 'qcow2', diskId: 'root', ackedSeq: acked });
  expect(report, `records 0..${acked}: ${report.missingCount} missing, ${report.corruptCount} corrupt`).toMatchObject({ ok: true });
});

/** A QEMU with block-job-change: FERRY_QEMU, else the bootstrap's 10.0 (a wrapper that adds its own -L). */
const q10 = process.env.FERRY_QEMU ?? qemu10Binary;

describe.skipIf(!q10)(`QEMU >= 8.2 (${q10 ?? 'none found: set FERRY_QEMU or run node scripts/bootstrap.mjs --qemu10'})`, () => {
  test('block-job-change to write-blocking, then actively-synced; the migration completes and loses nothing', { timeout: 180_000 }, async () => {
    const { vm: source, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'root', format: 'qcow2', size: 256 << 20, fillMiB: 64 }],
      workload: { write: { rate: 200 }, tickMs: 20 },
      qemuBinary: q10!,
    });
    await ackBeyond(source, 100);
    expect(canChangeCopyMode(await source.qmp.probeCapabilities())).toBe(true);
    const dest = await startRawDestination(spec, hostB, { qemuBinary: q10! });
    expect(await directOf(dest.vm, fileNodeName('root'))).toBe(true);
    const since = await startRawMirrors(source, dest);
    const switched: { job: string; readyBeforeSwitch: boolean }[] = [];
    const jobs = await convergeActively(source.qmp, [mirrorJob('root')], { since, readyBoundMs: 2_000, timeoutMs: 30_000, onSwitch: (e) => switched.push(e) });
    expect(jobs).toHaveLength(1);
    expect(switched.map((s) => s.job)).toEqual([mirrorJob('root')]);
    expect(jobs[0]!.syncedAtMs).toBeGreaterThanOrEqual(jobs[0]!.switchedAtMs);
    // Write-blocking from here: the job stays synced while the guest writes on.
    await ackBeyond(source, (highestAcks(source.serial.history()).get('root') ?? 0) + 20);
    const after = (await source.qmp.executeRaw('query-block-jobs')) as { device: string; 'actively-synced'?: boolean }[];
    expect(after.find((j) => j.device === mirrorJob('root'))?.['actively-synced']).toBe(true);

    await migrateRawToCompleted(source, dest);
    const acked = highestAcks(source.serial.history()).get('root') ?? -1;
    await dest.vm.qmp.execute('nbd-server-stop');
    await dest.vm.qmp.execute('cont');
    await ackBeyond(dest.vm, acked + 20);
    expect(await readFile(join(dest.spec.runDir, 'qemu.log'), 'utf8')).not.toMatch(/Permission conflict/);
    await dest.vm.kill();
    await source.kill();
    const report = await verifyDisk(dest.spec.disks[0]!.path, { format: 'qcow2', diskId: 'root', ackedSeq: acked });
    expect(report, `records 0..${acked}: ${report.missingCount} missing, ${report.corruptCount} corrupt`).toMatchObject({ ok: true });
  });
});
