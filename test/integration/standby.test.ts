/**
 * Standby replicas (issue 12), with real QEMU guests writing sequence-numbered records and a real
 * qemu-storage-daemon holding the replica on "host B" (a temp folder, NBD over loopback).
 */
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { replicaDelta } from '../../src/replica/delta-replica.js';
import { launchVm } from '../../src/qemu/launcher.js';
import { Protection, localSource, localStandby } from '../../src/replica/protection.js';
import { prepareRecovery } from '../../src/replica/recover.js';
import { ReplicaError } from '../../src/replica/errors.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';
import { ackedBefore, cleanupStandbys, expectPrefixConsistent, makeStandby } from '../helpers/standby.js';
import { replicaBitmaps, type SyncOutcome } from '../../src/replica/source-sync.js';

const DISK = 32 << 20;

afterEach(async () => {
  await cleanupStandbys();
  await cleanupAll();
});

async function protectedGuest(opts: { intervalMs: number; rate?: number }) {
  const g = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: DISK }], workload: { write: { rate: opts.rate ?? 40 }, tickMs: 100 } });
  const replica = await makeStandby({ dir: join(g.hostB, 'replica'), vm: g.spec.name, disks: [{ id: 'data', virtualSize: DISK }] });
  const source = new LocalSource({ qmpSocket: join(g.spec.runDir, 'qmp.sock') });
  const protection = new Protection({ vm: g.spec.name, source: localSource(() => source.connect({ timeoutMs: 5_000 }), g.spec.disks), standby: localStandby(replica), intervalMs: opts.intervalMs });
  return { ...g, replica, source, protection };
}

async function syncs(p: Protection, n: number): Promise<SyncOutcome> {
  let last: SyncOutcome | undefined;
  for (let i = 0; i < n; i++) {
    const o = await p.nextOutcome();
    if (o instanceof Error) throw o;
    last = o;
  }
  return last!;
}

test('kill -9 of the source after several syncs: the VM boots from the replica, a prefix-consistent point with every write acknowledged before it', async () => {
  const g = await protectedGuest({ intervalMs: 500 });
  g.protection.start();
  const last = await syncs(g.protection, 4);
  expect(last.seq).toBe(4);
  // The incremental syncs move far less than the disk.
  expect(last.bytes).toBeLessThan(DISK / 4);
  await g.protection.stop();
  const mustHave = ackedBefore(g.vm.serial.history(), 'data', last.pointAtMono);
  expect(mustHave).toBeGreaterThan(10);
  await g.vm.kill();
  const upTo = ackedBefore(g.vm.serial.history(), 'data', Infinity);

  const point = await prepareRecovery({ spec: g.spec, source: g.source, replica: g.replica, runDir: join(g.hostB, 'run') });
  expect(point.seq).toBe(4);
  expect(point.rpoMs).toBeGreaterThanOrEqual(0);
  expect(point.rpoMs).toBeLessThan(60_000);
  const top = point.spec.disks[0]!.path;
  await expectPrefixConsistent(top, { tmp: g.hostB, disk: 'data', mustHave, upTo });
  const recovered = await launchVm(point.spec, { timeoutMs: 30_000 });
  await recovered.serial.waitForLine((l) => l.text === 'ferry-ready', { timeoutMs: 60_000, what: 'ferry-ready on the recovered VM' });
  await recovered.quit({ timeoutMs: 10_000 });
});

test('recover --from-replica while the source still runs the guest: refused, nothing changed', async () => {
  const g = await protectedGuest({ intervalMs: 60_000 });
  await g.protection.syncOnce();
  await g.protection.stop();
  const before = JSON.stringify(g.replica.manifest);
  const err = await prepareRecovery({ spec: g.spec, source: g.source, replica: g.replica, runDir: join(g.hostB, 'run') }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(ReplicaError);
  expect((err as ReplicaError).code).toBe('SOURCE_RUNNING');
  expect((err as ReplicaError).userError).toBe(true);
  expect(JSON.stringify(g.replica.manifest)).toBe(before);
  expect(g.replica.manifest.state).toBe('active');
  expect(g.vm.running()).toBe(true);
  // The replica still takes syncs.
  const again = new Protection({ vm: g.spec.name, source: localSource(() => g.source.connect({ timeoutMs: 5_000 }), g.spec.disks), standby: localStandby(g.replica), intervalMs: 60_000 });
  expect((await again.syncOnce()).seq).toBe(2);
  await again.stop();
});

test('evacuation by delta of a writing guest to its standby: every acknowledged write, and only the delta plus RAM on the wire', async () => {
  const g = await protectedGuest({ intervalMs: 60_000 });
  await g.protection.syncOnce();
  await new Promise((r) => setTimeout(r, 1500));
  await g.protection.syncOnce();
  await g.protection.stop();
  await new Promise((r) => setTimeout(r, 1000));
  const destination = new LocalDestination({ dir: join(g.hostB, 'vm') });
  await mkdir(join(g.hostB, 'vm'));
  // What changed since the last sync: the replica bitmap's count now, plus at most one 64 KiB
  // chunk per record the guest writes during the evacuation.
  const changedBefore = (await replicaBitmaps(g.vm.qmp, 'data')).find((b) => b.seq === g.replica.manifest.consistent!.seq)!.count;
  const ackedBeforeMove = ackedBefore(g.vm.serial.history(), 'data', Infinity);
  const result = await migrate({ spec: g.spec, source: g.source, destination, delta: replicaDelta(g.replica) }).catch(async (err: unknown) => {
    // Say how the source QEMU ended, if it did: a QEMU crash is not the engine's failure.
    const exit = await Promise.race([g.vm.exited, new Promise((r) => setTimeout(r, 2000, 'still running'))]);
    throw new Error(`delta evacuation failed (source QEMU: ${JSON.stringify(exit).slice(0, 300)})`, { cause: err });
  });
  const b = destination.incoming!.process;
  expect(b.running()).toBe(true);
  await g.vm.exited;
  const writtenDuring = ackedBefore([...g.vm.serial.history(), ...b.serial.history()], 'data', Infinity) - ackedBeforeMove + 2;
  const changed = changedBefore + writtenDuring * 64 * 1024;
  expect(changedBefore).toBeGreaterThan(0);
  expect(result.delta!.passes).toBeGreaterThanOrEqual(2);
  // Within 1.2x of what changed since the last sync plus RAM.
  const moved = result.diskBytes + result.ramBytes;
  expect(moved).toBeLessThanOrEqual(1.2 * (changed + result.ramBytes));
  // And the disk part alone: a chunk rewritten between passes is sent again, no more than that.
  expect(result.diskBytes).toBeLessThanOrEqual(1.2 * changed + 1.2 * writtenDuring * 64 * 1024);
  await new Promise((r) => setTimeout(r, 500));
  await b.quit({ timeoutMs: 10_000 });
  const acked = ackedBefore([...g.vm.serial.history(), ...b.serial.history()], 'data', Infinity);
  await expectPrefixConsistent(result.plan.disks[0]!.destinationPath, { tmp: g.hostB, disk: 'data', mustHave: acked, upTo: acked });
});

test('the source killed in the middle of a sync: the standby still holds, and boots, the previous point', async () => {
  const g = await protectedGuest({ intervalMs: 60_000 });
  await g.protection.syncOnce();
  const second = await g.protection.syncOnce();
  const mustHave = ackedBefore(g.vm.serial.history(), 'data', second.pointAtMono);
  // Something to copy, then the next sync slowed to 1 MiB/s and the source killed while it runs.
  await g.vm.qmp.executeRaw('human-monitor-command', { 'command-line': 'qemu-io -d /machine/peripheral/dev-data/virtio-backend "write -P 0x77 8M 8M"' });
  const since = g.vm.qmp.eventCursor();
  const third = g.protection.syncOnce().catch((e: unknown) => e);
  // Slowed as soon as the job exists ('created'): by 'running' it may already have copied its 8 MiB.
  await g.vm.qmp.waitForEvent((e) => e.event === 'JOB_STATUS_CHANGE' && (e.data as { status?: string } | undefined)?.status === 'created', { since, timeoutMs: 30_000, what: 'the third sync to start' });
  await g.vm.qmp.executeRaw('block-job-set-speed', { device: 'ferry-replica-data', speed: 1 << 20 });
  expect(g.replica.manifest.pending?.seq).toBe(3);
  await g.vm.kill();
  expect(await third).toBeInstanceOf(Error);
  await g.protection.stop();
  expect(g.replica.manifest.consistent?.seq).toBe(2);
  expect(g.replica.manifest.pending).toBeNull();
  const upTo = ackedBefore(g.vm.serial.history(), 'data', Infinity);
  const point = await prepareRecovery({ spec: g.spec, source: g.source, replica: g.replica, runDir: join(g.hostB, 'run') });
  expect(point.seq).toBe(2);
  const report = await expectPrefixConsistent(point.spec.disks[0]!.path, { tmp: g.hostB, disk: 'data', mustHave, upTo });
  // Sync 3 left nothing: what the guest acknowledged after sync 2's instant is not all there.
  expect(report.highestContiguous).toBeLessThan(upTo);
  const recovered = await launchVm(point.spec, { timeoutMs: 30_000 });
  await recovered.serial.waitForLine((l) => l.text === 'ferry-ready', { timeoutMs: 60_000, what: 'ferry-ready on the recovered VM' });
  await recovered.quit({ timeoutMs: 10_000 });
});

test('an evacuation by delta cancelled mid-way rolls back: the guest stays on the source, the replica is served again and takes the next sync', async () => {
  const g = await protectedGuest({ intervalMs: 60_000 });
  await g.protection.syncOnce();
  await g.protection.stop();
  await mkdir(join(g.hostB, 'vm'));
  const destination = new LocalDestination({ dir: join(g.hostB, 'vm') });
  const cancel = new AbortController();
  const err = await migrate({
    spec: g.spec,
    source: g.source,
    destination,
    delta: replicaDelta(g.replica),
    signal: cancel.signal,
    onEvent: (e) => {
      if (e.event === 'phase' && e.phase === 'ram') cancel.abort();
    },
  }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(Error);
  expect(g.vm.running()).toBe(true);
  expect((await g.vm.qmp.execute('query-status')).status).toBe('running');
  expect(g.replica.manifest.state).toBe('active');
  expect(existsSync(join(g.hostB, 'vm', 'data.qcow2'))).toBe(false);
  // The passes' bitmaps are gone; the replica's own stays, so protection goes on incrementally.
  const again = new Protection({ vm: g.spec.name, source: localSource(() => g.source.connect({ timeoutMs: 5_000 }), g.spec.disks), standby: localStandby(g.replica), intervalMs: 60_000 });
  const next = await again.syncOnce();
  expect(next.seq).toBe(2);
  expect(next.bytes).toBeLessThan(DISK / 2);
  await again.stop();
  expect((await replicaBitmaps(g.vm.qmp, 'data')).map((b) => b.seq)).toEqual([2]);
});
