/**
 * Issue 17: migrate-vm dies (kill -9) in the middle of a migration between two folders. The
 * watchdog it left (src/cli/watchdog.ts) settles the migration from what the QEMUs report: the
 * guest pauses for a bounded time and runs in exactly one place afterwards, every acknowledged
 * write on that side's disk, nothing of the run left behind.
 */
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { ferryLeftovers } from '../../src/engine/settle-local.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { eventIs } from '../../src/qmp/index.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';
import { killPid, startMigrateVm, waitPidGone } from '../helpers/migrate-vm-process.js';

const strays: number[] = [];
afterEach(async () => {
  for (const pid of strays.splice(0)) killPid(pid);
  await cleanupAll();
});

async function guestAndRun(extra: string[] = []) {
  const g = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 64 << 20 }], workload: { write: { rate: 50 }, tickMs: 50 } });
  const specPath = join(g.hostA, 'vm.json');
  await writeFile(specPath, JSON.stringify(g.spec));
  const run = startMigrateVm(['--spec', specPath, '--to-dir', g.hostB, ...extra]);
  strays.push(run.pid);
  const wd = await run.waitForEvent((e) => e.event === 'watchdog');
  const watchdogPid = wd.pid as number;
  strays.push(watchdogPid);
  const runDir = join(g.hostB, `run-${g.spec.name}-${String(wd.migrationId)}`);
  return { ...g, run, watchdogPid, runDir };
}

async function destinationPidOf(runDir: string): Promise<number> {
  return Number((await readFile(join(runDir, 'qemu.pid'), 'utf8')).trim());
}

describe('a dead migrate-vm costs the guest a bounded pause (issue 17)', () => {
  test('kill -9 during the RAM phase, the source paused at pre-switchover: the watchdog fences the destination, the source resumes, nothing is left', async () => {
    // A slow link keeps the RAM phase long enough to be inside it.
    const { vm, hostB, run, watchdogPid, runDir } = await guestAndRun(['--bandwidth', '8M', '--copy-mode', 'write-blocking']);
    const since = vm.qmp.eventCursor();
    await run.waitForEvent((e) => e.event === 'phase' && e.phase === 'ram');
    await vm.qmp.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'active', { since, timeoutMs: 30_000, what: 'the RAM migration to start' });
    const destPid = await destinationPidOf(runDir);
    strays.push(destPid);
    // Frozen first, so the source reaches pre-switchover with nobody to continue it: the state
    // the issue found, the guest paused (finish-migrate). Then killed.
    const stopAt = vm.qmp.eventCursor();
    killPid(run.pid, 'SIGSTOP');
    await vm.qmp.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'pre-switchover', { since: stopAt, timeoutMs: 60_000, what: 'pre-switchover' });
    expect((await vm.qmp.execute('query-status')).status).toBe('finish-migrate');
    killPid(run.pid);
    const killedAt = performance.now();
    expect(await run.exited).toBeNull();

    // Without a watchdog the source would sit at pre-switchover (finish-migrate) forever.
    // Settled: the migration over (not paused at pre-switchover, not still copying) and the guest running.
    for (;;) {
      const s = await vm.qmp.execute('query-status');
      const m = await vm.qmp.execute('query-migrate');
      if (s.status === 'running' && ['cancelled', 'failed', 'none'].includes(m.status ?? 'none')) break;
      expect(performance.now() - killedAt, `source ${s.status}, migration ${m.status}; stderr: ${run.stderr()}`).toBeLessThan(15_000);
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(await waitPidGone(watchdogPid)).toBe(true);
    // migrate-vm's throwaway PKI (data TLS between two folders) went with the settle.
    expect((await readdir(tmpdir())).filter((n) => n.startsWith('ferry-data-tls-'))).toEqual([]);
    expect(run.stderr()).toMatch(/migrate-vm watchdog: migrate-vm \(pid \d+\) died during ram/);
    expect(run.stderr()).toMatch(/settled: the guest runs on the source/);
    expect(await waitPidGone(destPid, 1_000)).toBe(true);
    expect(await readdir(hostB)).toEqual([]);
    expect(await ferryLeftovers(vm.qmp)).toEqual([]);
    expect((await vm.qmp.execute('query-migrate')).status).toMatch(/cancelled|failed/);

    // The guest writes on, and every write it acknowledged is on the source's disk.
    const before = highestAcks(vm.serial.history()).get('root')!;
    await vm.serial.waitForLine((l) => l.text.startsWith('ack root ') && Number(l.text.split(' ')[2]) > before + 5, { timeoutMs: 20_000, what: 'acks after the watchdog' });
    await vm.quit();
    const acked = highestAcks(vm.serial.history()).get('root')!;
    const report = await verifyDisk(vm.spec.disks[0]!.path, { format: 'qcow2', diskId: 'root', ackedSeq: acked });
    expect(report.ok, JSON.stringify(report)).toBe(true);
  }, 120_000);

  test('kill -9 at the point of no return: exactly one QEMU runs the guest afterwards, never both', async () => {
    const { vm, spec, hostB, run, watchdogPid, runDir } = await guestAndRun();
    await run.waitForEvent((e) => e.event === 'point-of-no-return', 120_000);
    killPid(run.pid);
    const destPid = await destinationPidOf(runDir);
    strays.push(destPid);
    await run.exited;
    expect(await waitPidGone(watchdogPid)).toBe(true);
    const stderr = run.stderr();
    const onDestination = /settled: the guest runs on the destination/.test(stderr);
    expect(onDestination || /settled: the guest runs on the source/.test(stderr), stderr).toBe(true);
    const acked = highestAcks(vm.serial.history()).get('root')!;
    if (onDestination) {
      // The destination ran: the source was retired, never resumed.
      await vm.exited;
      expect(await waitPidGone(destPid, 1_000)).toBe(false);
      killPid(destPid);
      await waitPidGone(destPid);
      const report = await verifyDisk(join(hostB, 'root.qcow2'), { format: 'qcow2', diskId: 'root', ackedSeq: acked });
      expect(report.ok, JSON.stringify(report)).toBe(true);
    } else {
      expect((await vm.qmp.execute('query-status')).status).toBe('running');
      expect(await waitPidGone(destPid, 1_000)).toBe(true);
      expect(await readdir(hostB)).toEqual([]);
      await vm.quit();
      const report = await verifyDisk(spec.disks[0]!.path, { format: 'qcow2', diskId: 'root', ackedSeq: highestAcks(vm.serial.history()).get('root')! });
      expect(report.ok, JSON.stringify(report)).toBe(true);
    }
  }, 120_000);

  test('a clean run stops its watchdog', async () => {
    const { vm, run, watchdogPid, runDir } = await guestAndRun();
    expect(await run.exited, run.stderr()).toBe(0);
    // The guest runs on the destination now, a QEMU migrate-vm let go of: this test ends it.
    const destPid = await destinationPidOf(runDir);
    strays.push(destPid);
    expect(await waitPidGone(watchdogPid, 5_000)).toBe(true);
    expect(run.stderr()).not.toMatch(/watchdog/);
    await vm.exited;
  }, 120_000);
});
