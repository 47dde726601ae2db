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
});
