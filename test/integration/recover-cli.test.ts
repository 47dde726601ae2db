/**
 * Issue 17: a migrate-vm that died together with its watchdog (kill -9 of both) leaves QEMU state
 * behind. The next run names it and the command that settles it; `migrate-vm --recover` settles
 * it from what the QEMUs report; then the guest migrates as if nothing had happened.
 */
import { execFile } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, test } from 'vitest';
import { ferryLeftovers } from '../../src/engine/settle-local.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { eventIs } from '../../src/qmp/index.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';
import { killPid, MIGRATE_VM, startMigrateVm, waitPidGone } from '../helpers/migrate-vm-process.js';

const exec = promisify(execFile);
const strays: number[] = [];
afterEach(async () => {
  for (const pid of strays.splice(0)) killPid(pid);
  await cleanupAll();
});

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await exec(process.execPath, [MIGRATE_VM, ...args], { timeout: 120_000 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** Starts a migration and returns once it is inside `phase`, with the pids to kill. */
async function runUntil(specPath: string, hostB: string, extra: string[]) {
  const run = startMigrateVm(['--spec', specPath, '--to-dir', hostB, '--data-tls', 'off', ...extra]);
  strays.push(run.pid);
  const wd = await run.waitForEvent((e) => e.event === 'watchdog');
  strays.push(wd.pid as number);
  return { run, watchdogPid: wd.pid as number, migrationId: String(wd.migrationId) };
}

async function destinationPid(runDir: string): Promise<number> {
  const pid = Number((await readFile(join(runDir, 'qemu.pid'), 'utf8')).trim());
  strays.push(pid);
  return pid;
}

describe('migrate-vm --recover (issue 17)', () => {
  test('kill -9 of migrate-vm and its watchdog during the mirror: refused with the command to run, --recover settles both sides, then the guest migrates', async () => {
    const { vm, spec, hostA, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'root', format: 'qcow2', size: 256 << 20, fillMiB: 100 }],
      workload: { write: { rate: 50 }, tickMs: 50 },
    });
    const specPath = join(hostA, 'vm.json');
    await writeFile(specPath, JSON.stringify(spec));
    const { run, watchdogPid, migrationId } = await runUntil(specPath, hostB, ['--bandwidth', '10M']);
    await run.waitForEvent((e) => e.event === 'phase' && e.phase === 'mirror');
    await new Promise((r) => setTimeout(r, 500));
    killPid(watchdogPid);
    killPid(run.pid);
    await run.exited;
    expect(await waitPidGone(watchdogPid)).toBe(true);
    const runDir = join(hostB, `run-${spec.name}-${migrationId}`);
    const destPid = await destinationPid(runDir);
    expect(await waitPidGone(destPid, 500)).toBe(false);
    expect((await ferryLeftovers(vm.qmp)).length).toBeGreaterThan(0);

    // The next run names what it found and the command that settles it; it changes nothing.
    let r = await cli(['--spec', specPath, '--to-dir', hostB, '--data-tls', 'off']);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/a ferry run that died left .*ferry-nbd-root/);
    expect(r.stderr).toContain(`to settle it: migrate-vm --recover --spec ${specPath} --to-dir ${hostB}`);
    expect(r.stderr).not.toMatch(/\n\s+at /);

    r = await cli(['--recover', '--spec', specPath, '--to-dir', hostB]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/killed the destination QEMU \(pid \d+, inmigrate\)/);
    expect(r.stdout).toMatch(/the guest runs on the source/);
    expect(await waitPidGone(destPid, 1_000)).toBe(true);
    expect(await readdir(hostB)).toEqual([]);
    expect(await ferryLeftovers(vm.qmp)).toEqual([]);
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
    // Nothing left: a second --recover says so and changes nothing.
    r = await cli(['--recover', '--spec', specPath, '--to-dir', hostB, '--json']);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout.trim().split('\n').at(-1)!)).toMatchObject({ event: 'recover', where: 'source', did: [] });

    // And the guest migrates as if the dead run had never been.
    r = await cli(['--spec', specPath, '--to-dir', hostB, '--data-tls', 'off', '--json']);
    expect(r.code, r.stderr).toBe(0);
    await vm.exited;
    const dirs = (await readdir(hostB)).filter((n) => n.startsWith('run-'));
    expect(dirs).toHaveLength(1);
    const finalPid = await destinationPid(join(hostB, dirs[0]!));
    killPid(finalPid);
    await waitPidGone(finalPid);
    const report = await verifyDisk(join(hostB, 'root.qcow2'), { format: 'qcow2', diskId: 'root', ackedSeq: highestAcks(vm.serial.history()).get('root')! });
    expect(report.ok, JSON.stringify(report)).toBe(true);
  }, 180_000);

  test('a source left paused at pre-switchover: the next run says the guest runs nowhere (not "on the source"), --recover resumes it', async () => {
    const { vm, spec, hostA, hostB } = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 64 << 20 }], workload: { write: { rate: 50 }, tickMs: 50 } });
    const specPath = join(hostA, 'vm.json');
    await writeFile(specPath, JSON.stringify(spec));
    const since = vm.qmp.eventCursor();
    const { run, watchdogPid } = await runUntil(specPath, hostB, ['--bandwidth', '8M', '--copy-mode', 'write-blocking']);
    await vm.qmp.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'active', { since, timeoutMs: 60_000, what: 'the RAM migration' });
    killPid(watchdogPid);
    killPid(run.pid, 'SIGSTOP');
    await vm.qmp.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'pre-switchover', { since, timeoutMs: 60_000, what: 'pre-switchover' });
    killPid(run.pid);
    await run.exited;
    expect((await vm.qmp.execute('query-status')).status).toBe('finish-migrate');

    let r = await cli(['--spec', specPath, '--to-dir', hostB, '--data-tls', 'off']);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/paused in 'finish-migrate' by a migration \(status pre-switchover\).*runs NOWHERE/);
    expect(r.stderr).not.toMatch(/runs on the source/);
    expect(r.stderr).toContain('to settle it: migrate-vm --recover');
    expect((await vm.qmp.execute('query-status')).status).toBe('finish-migrate');

    r = await cli(['--recover', '--spec', specPath, '--to-dir', hostB]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/cancelled the migration/);
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
    expect(await readdir(hostB)).toEqual([]);
    expect(await ferryLeftovers(vm.qmp)).toEqual([]);
    const before = highestAcks(vm.serial.history()).get('root')!;
    await vm.serial.waitForLine((l) => l.text.startsWith('ack root ') && Number(l.text.split(' ')[2]) > before + 5, { timeoutMs: 20_000, what: 'acks after --recover' });
    await vm.quit();
    const report = await verifyDisk(spec.disks[0]!.path, { format: 'qcow2', diskId: 'root', ackedSeq: highestAcks(vm.serial.history()).get('root')! });
    expect(report.ok, JSON.stringify(report)).toBe(true);
  }, 180_000);
});
