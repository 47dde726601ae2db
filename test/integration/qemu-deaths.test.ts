/**
 * Issue 17: a QEMU dies under a running migrate-vm. The outcome it reports is the truth, the
 * cleanup does not trip over the dead side, and what the dead QEMU said is kept for the operator.
 */
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';
import { killPid, startMigrateVm, waitPidGone } from '../helpers/migrate-vm-process.js';

const strays: number[] = [];
afterEach(async () => {
  for (const pid of strays.splice(0)) killPid(pid);
  await cleanupAll();
});

async function mirroring() {
  const g = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 256 << 20, fillMiB: 100 }], workload: { write: { rate: 50 }, tickMs: 50 } });
  const specPath = join(g.hostA, 'vm.json');
  await writeFile(specPath, JSON.stringify(g.spec));
  const run = startMigrateVm(['--spec', specPath, '--to-dir', g.hostB, '--data-tls', 'off', '--bandwidth', '10M']);
  strays.push(run.pid);
  const wd = await run.waitForEvent((e) => e.event === 'watchdog');
  strays.push(wd.pid as number);
  await run.waitForEvent((e) => e.event === 'phase' && e.phase === 'mirror');
  await new Promise((r) => setTimeout(r, 500));
  const runDir = join(g.hostB, `run-${g.spec.name}-${String(wd.migrationId)}`);
  const destPid = Number((await readFile(join(runDir, 'qemu.pid'), 'utf8')).trim());
  strays.push(destPid);
  return { ...g, run, watchdogPid: wd.pid as number, destPid, runDir };
}

function summaryOf(events: Record<string, unknown>[]): Record<string, unknown> {
  return events.findLast((e) => e.event === 'summary') ?? {};
}

describe('a QEMU dies during the mirror (issue 17)', () => {
  test('the source QEMU: "the source died; the guest runs nowhere; nothing of it started elsewhere", exit 5, no cleanup errors', async () => {
    const { vm, spec, hostB, run, watchdogPid, destPid } = await mirroring();
    await vm.kill();
    const code = await run.exited;
    const stderr = run.stderr();
    expect(code, stderr).toBe(5);
    expect(stderr).toMatch(/the source QEMU died before the switchover: the guest runs nowhere, and nothing of it started elsewhere/);
    expect(stderr).toMatch(/^migrate-vm: the source QEMU died during mirror/m);
    expect(stderr).not.toMatch(/cleanup problem|UNCERTAIN/);
    expect(summaryOf(run.events)).toMatchObject({ ok: false, code: 'SOURCE_DIED', outcome: 'sourceDied', guestOn: 'nowhere', cleanupErrors: [] });
    expect(await waitPidGone(destPid, 1_000)).toBe(true);
    expect(await waitPidGone(watchdogPid, 5_000)).toBe(true);
    expect(await readdir(hostB)).toEqual([]);
    // Nothing of the guest ran after the source died; its disk holds every write it acknowledged.
    const report = await verifyDisk(spec.disks[0]!.path, { format: 'qcow2', diskId: 'root', ackedSeq: highestAcks(vm.serial.history()).get('root')! });
    expect(report.ok, JSON.stringify(report)).toBe(true);
  }, 120_000);

  test("the destination QEMU: DESTINATION_DIED says why (QEMU's last lines, also in --json), and its log is kept where the operator is told", async () => {
    const { vm, spec, hostB, run, watchdogPid, destPid, runDir } = await mirroring();
    // SIGTERM: QEMU writes "terminating on signal 15 from pid ..." to its log, then exits.
    killPid(destPid, 'SIGTERM');
    const code = await run.exited;
    const stderr = run.stderr();
    expect(code, stderr).toBe(1);
    expect(stderr).toMatch(/^migrate-vm: .*the destination QEMU (\(pid \d+\) )?exited during mirror \(exit code 0; QEMU said: .*terminating on signal 15/m);
    const summary = summaryOf(run.events);
    expect(summary).toMatchObject({ ok: false, code: 'DESTINATION_DIED', outcome: 'rolledBack', guestOn: 'source' });
    expect(String(summary.destinationExit)).toMatch(/terminating on signal 15/);
    const kept = join(hostB, `${runDir.split('/').at(-1)!.replace(/^run-/, 'failed-')}.qemu.log`);
    expect(summary.destinationLog).toBe(kept);
    expect(stderr).toContain(`the destination QEMU's log is kept at ${kept}`);
    expect(await readFile(kept, 'utf8')).toMatch(/terminating on signal 15/);
    // Nothing else of the run is left; the guest runs and writes on the source.
    expect(await readdir(hostB)).toEqual([kept.split('/').at(-1)]);
    expect(await waitPidGone(watchdogPid, 5_000)).toBe(true);
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
    const before = highestAcks(vm.serial.history()).get('root')!;
    await vm.serial.waitForLine((l) => l.text.startsWith('ack root ') && Number(l.text.split(' ')[2]) > before + 5, { timeoutMs: 20_000, what: 'acks after the rollback' });
    await vm.quit();
    const report = await verifyDisk(spec.disks[0]!.path, { format: 'qcow2', diskId: 'root', ackedSeq: highestAcks(vm.serial.history()).get('root')! });
    expect(report.ok, JSON.stringify(report)).toBe(true);
  }, 120_000);
});
