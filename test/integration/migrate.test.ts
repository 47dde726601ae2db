/**
 * The migration engine against real QEMU guests (TCG). The guest writes sequence-numbered records
 * to its disks during the migration and prints what is acknowledged; afterwards (or after a
 * rollback) the disks are read back and every acknowledged record must be there, intact.
 */
import { execFile } from 'node:child_process';
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, test } from 'vitest';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { MigrationError, type Phase } from '../../src/engine/types.js';
import { highestAcks, parseSerialLine } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import type { VmProcess } from '../../src/qemu/launcher.js';
import type { VmSpec } from '../../src/qemu/spec.js';
import { bootWorkloadGuest, cleanupAll, makeTempDir } from '../helpers/guest.js';

const run = promisify(execFile);

afterEach(cleanupAll);

function sourceOf(spec: VmSpec): LocalSource {
  return new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') });
}

/** Waits until the guest acknowledges a write past `seq` on `disk`: proof that it runs and writes. */
async function ackBeyond(vm: VmProcess, disk: string, seq: number, timeoutMs = 30_000): Promise<number> {
  const line = await vm.serial.waitForLine(
    (l) => {
      const p = parseSerialLine(l.text);
      return p.kind === 'ack' && p.disk === disk && p.seq > seq;
    },
    { timeoutMs, what: `an ack on ${disk} beyond ${seq}` },
  );
  const p = parseSerialLine(line.text);
  return p.kind === 'ack' ? p.seq : -1;
}

async function verifyAcked(disks: { id: string; path: string; format: 'qcow2' | 'raw' }[], acked: Map<string, number>): Promise<void> {
  for (const d of disks) {
    const ackedSeq = acked.get(d.id);
    expect(ackedSeq, `the guest acknowledged writes on ${d.id}`).toBeGreaterThan(0);
    const report = await verifyDisk(d.path, { format: d.format, diskId: d.id, ackedSeq: ackedSeq! });
    expect(report, `every acknowledged record of ${d.id} in ${d.path}`).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  }
}

/** Rollback's promise: the guest runs on the source, still writing, and host B holds nothing. */
async function expectRolledBack(vm: VmProcess, spec: VmSpec, hostB: string, disk: string): Promise<void> {
  expect((await vm.qmp.execute('query-status')).status).toBe('running');
  expect(await vm.qmp.execute('query-block-jobs')).toEqual([]);
  const nodes = await vm.qmp.execute('query-named-block-nodes', { flat: true });
  expect(nodes.map((n) => n['node-name']).filter((n) => n?.startsWith('ferry-'))).toEqual([]);
  const before = highestAcks(vm.serial.history()).get(disk) ?? -1;
  await ackBeyond(vm, disk, before + 5);
  expect(await readdir(hostB)).toEqual([]);
  await vm.quit({ timeoutMs: 10_000 });
  await verifyAcked(spec.disks, highestAcks(vm.serial.history()));
}

describe('migrate (real QEMU guests, TCG)', () => {
  test('idle guest, one disk: phases in order, destination runs, source exits, disks identical', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'root', format: 'qcow2', size: 64 << 20, fillMiB: 8 }],
      workload: { tickMs: 50 },
    });
    const dest = new LocalDestination({ dir: hostB });
    const phases: Phase[] = [];
    const result = await migrate({
      spec,
      source: sourceOf(spec),
      destination: dest,
      onEvent: (e) => {
        if (e.event === 'phase') phases.push(e.phase);
      },
    });
    expect(phases).toEqual(['preflight', 'prepare-destination', 'mirror', 'ram', 'switchover', 'confirm', 'cleanup', 'done']);
    expect(result.downtimeMs).toBeGreaterThan(0);
    expect(result.ramBytes).toBeGreaterThan(0);
    expect(result.diskBytes).toBeGreaterThanOrEqual(8 << 20);
    await vm.exited;
    const incoming = dest.incoming!;
    expect((await incoming.qmp.execute('query-status')).status).toBe('running');
    // The guest goes on ticking on the destination.
    const ticks = incoming.process.serial.cursor();
    await incoming.process.serial.waitForLine((l) => l.text.startsWith('tick '), { timeoutMs: 10_000, since: ticks, what: 'a tick on B' });
    await incoming.process.quit({ timeoutMs: 10_000 });
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', spec.disks[0]!.path, join(hostB, 'root.qcow2')]);
    expect(cmp.stdout).toContain('Images are identical');
  });

  test('a disk with a backing file arrives flattened, content identical', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'root', format: 'qcow2', size: 64 << 20, backingFillMiB: 8, fillMiB: 4 }],
      workload: { tickMs: 50 },
    });
    const destination = new LocalDestination({ dir: hostB });
    const result = await migrate({ spec, source: sourceOf(spec), destination });
    expect(result.plan.disks[0]!.sync).toBe('full');
    await vm.exited;
    await destination.incoming!.kill();
    const target = join(hostB, 'root.qcow2');
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', target])).stdout) as Record<string, unknown>;
    expect(info['backing-filename']).toBeUndefined();
    // The source read through its chain equals the flat target: the backing file's data came too.
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', spec.disks[0]!.path, target]);
    expect(cmp.stdout).toContain('Images are identical');
    const region = await run('qemu-io', ['-f', 'qcow2', '-c', `read -P 0x6b ${16 << 20} 8M`, target]);
    expect(region.stdout).toMatch(/read 8388608\/8388608 bytes/);
  });

  test('writing guest, two disks (qcow2 + raw): no acknowledged write lost, the guest writes on', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [
        { id: 'data', format: 'qcow2', size: 64 << 20 },
        { id: 'logs', format: 'raw', size: 32 << 20 },
      ],
      workload: { write: { rate: 100 }, tickMs: 50 },
    });
    const before = await ackBeyond(vm, 'data', 20);
    const dest = new LocalDestination({ dir: hostB });
    await migrate({ spec, source: sourceOf(spec), destination: dest });
    await vm.exited;
    const b = dest.incoming!.process;
    expect((await b.qmp.execute('query-status')).status).toBe('running');
    const afterSource = highestAcks(vm.serial.history());
    expect(afterSource.get('data')).toBeGreaterThanOrEqual(before);
    await ackBeyond(b, 'data', afterSource.get('data')! + 10);
    await ackBeyond(b, 'logs', afterSource.get('logs')! + 10);
    await b.quit({ timeoutMs: 10_000 });
    const acked = highestAcks([...vm.serial.history(), ...b.serial.history()]);
    await verifyAcked(
      spec.disks.map((d) => ({ ...d, path: join(hostB, `${d.id}.${d.format}`) })),
      acked,
    );
  });

  test('8 GiB disk holding ~50 MiB: the mirror sends at most 1.1 x what is allocated', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'big', format: 'qcow2', size: 8 * 2 ** 30, fillMiB: 50 }],
      workload: { tickMs: 100 },
    });
    const result = await migrate({ spec, source: sourceOf(spec), destination: new LocalDestination({ dir: hostB }) });
    const allocated = result.plan.disks[0]!.allocatedBytes;
    expect(allocated).toBeGreaterThanOrEqual(50 << 20); // the data it holds (qemu-img map), not the file size
    expect(allocated).toBeLessThan(60 << 20);
    expect(result.diskBytes).toBeGreaterThanOrEqual(50 << 20);
    expect(result.diskBytes).toBeLessThanOrEqual(1.1 * allocated);
    await vm.exited;
    const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', join(hostB, 'big.qcow2')])).stdout) as { 'actual-size': number };
    expect(info['actual-size']).toBeLessThan(1.2 * allocated);
  });

  test('destination QEMU killed during the mirror: guest stays on the source, writes intact, nothing left on B', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'qcow2', size: 512 << 20, fillMiB: 200 }],
      workload: { write: { rate: 50 }, tickMs: 50 },
    });
    await ackBeyond(vm, 'data', 10);
    const dest = new LocalDestination({ dir: hostB });
    const err = await migrate({
      spec,
      source: sourceOf(spec),
      destination: dest,
      // Slow enough that the mirror is still copying when the destination dies.
      options: { bandwidthBytesPerSec: 20 << 20 },
      onEvent: (e) => {
        if (e.event === 'phase' && e.phase === 'mirror') setTimeout(() => void dest.incoming?.kill(), 1_000);
      },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationError);
    expect(err).toMatchObject({ phase: 'mirror', guestOn: 'source', cleanupErrors: [] });
    expect(dest.incoming!.running()).toBe(false);
    await expectRolledBack(vm, spec, hostB, 'data');
  });

  test('cancel during the RAM phase: guest stays on the source, writes intact, nothing left on B', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'qcow2', size: 64 << 20 }],
      workload: { write: { rate: 50 }, tickMs: 50, dirty: { mib: 64, mibPerSec: 0 } },
    });
    await ackBeyond(vm, 'data', 10);
    const dest = new LocalDestination({ dir: hostB });
    const ac = new AbortController();
    const err = await migrate({
      spec,
      source: sourceOf(spec),
      destination: dest,
      signal: ac.signal,
      // A link too slow for the dirtying guest: the RAM phase lasts until the cancel.
      options: { bandwidthBytesPerSec: 8 << 20, autoConverge: false },
      onEvent: (e) => {
        if (e.event === 'phase' && e.phase === 'ram') setTimeout(() => ac.abort(), 1_500);
      },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationError);
    expect(err).toMatchObject({ code: 'CANCELLED', phase: 'ram', guestOn: 'source', cleanupErrors: [] });
    // Rollback kills the destination first, so the source's migration may end as 'failed' (its
    // peer vanished) before migrate_cancel makes it 'cancelled'. Either way it must have ended.
    const mig = await vm.qmp.execute('query-migrate');
    expect(['cancelled', 'failed']).toContain(mig.status);
    await expectRolledBack(vm, spec, hostB, 'data');
  });

  test('bad input: clear errors, nothing changed', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 24 }],
      workload: { write: { rate: 20 }, tickMs: 100 },
    });
    const expectRefused = async (p: Promise<unknown>, code: string, text: RegExp): Promise<void> => {
      const err = await p.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(MigrationError);
      expect(err).toMatchObject({ code, userError: true, phase: 'preflight' });
      expect((err as Error).message).toMatch(text);
    };
    // A source socket that is not there.
    await expectRefused(
      migrate({ spec, source: new LocalSource({ qmpSocket: join(hostB, 'nope.sock') }), destination: new LocalDestination({ dir: hostB }) }),
      'SOURCE_UNREACHABLE',
      /nope\.sock/,
    );
    // A destination folder that is a file, and one that does not exist.
    const file = join(await makeTempDir(), 'a-file');
    await writeFile(file, 'x');
    await expectRefused(migrate({ spec, source: sourceOf(spec), destination: new LocalDestination({ dir: file }) }), 'PREFLIGHT_REFUSED', /not a directory/);
    await expectRefused(
      migrate({ spec, source: sourceOf(spec), destination: new LocalDestination({ dir: join(hostB, 'missing') }) }),
      'PREFLIGHT_REFUSED',
      /does not exist/,
    );
    // Not enough space: a 16 MiB tmpfs cannot take a disk that holds more.
    const small = await makeTempDir();
    await run('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', small]);
    try {
      await expectRefused(migrate({ spec, source: sourceOf(spec), destination: new LocalDestination({ dir: small }) }), 'PREFLIGHT_REFUSED', /not enough space/);
      expect(await readdir(small)).toEqual([]);
    } finally {
      await run('umount', [small]);
    }
    // A spec that does not describe the running VM.
    await expectRefused(
      migrate({ spec: { ...spec, memoryMiB: 512 }, source: sourceOf(spec), destination: new LocalDestination({ dir: hostB }) }),
      'PREFLIGHT_REFUSED',
      /512/,
    );
    await expectRefused(
      migrate({
        spec: { ...spec, disks: [{ ...spec.disks[0]!, id: 'other' }] },
        source: sourceOf(spec),
        destination: new LocalDestination({ dir: hostB }),
      }),
      'PREFLIGHT_REFUSED',
      /disk 'other'/,
    );
    // An impossible option.
    await expectRefused(
      migrate({ spec, source: sourceOf(spec), destination: new LocalDestination({ dir: hostB }), options: { downtimeLimitMs: -5 } }),
      'OPTIONS_INVALID',
      /downtimeLimitMs/,
    );
    await expectRolledBack(vm, spec, hostB, 'data');
  });

  describe('a guest that dirties RAM faster than the link moves it', () => {
    // 32 MiB rewritten flat out against a 24 MiB/s link, auto-converge off: it never converges.
    const options = { bandwidthBytesPerSec: 24 << 20, autoConverge: false, deadlineBaseMs: 4_000, deadlinePerGiBMs: 0 };
    const boot = () =>
      bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 16 << 20 }], workload: { write: { rate: 20 }, tickMs: 50, dirty: { mib: 32, mibPerSec: 0 } } });

    test('deadline policy abort (the default): rolled back, the guest stays on the source', async () => {
      const { vm, spec, hostB } = await boot();
      const events: string[] = [];
      const err = await migrate({
        spec,
        source: sourceOf(spec),
        destination: new LocalDestination({ dir: hostB }),
        options,
        onEvent: (e) => {
          if (e.event === 'convergence') events.push(e.action);
        },
      }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'DEADLINE', phase: 'ram', guestOn: 'source' });
      expect(events).toContain('deadline-abort');
      await expectRolledBack(vm, spec, hostB, 'data');
    });

    test('deadline policy force: the switchover happens, reported as forced, nothing lost', async () => {
      const { vm, spec, hostB } = await boot();
      const dest = new LocalDestination({ dir: hostB });
      const events: string[] = [];
      const result = await migrate({
        spec,
        source: sourceOf(spec),
        destination: dest,
        options: { ...options, onDeadline: 'force' },
        onEvent: (e) => {
          if (e.event === 'convergence') events.push(e.action);
        },
      });
      expect(result.convergence.forced).toBe(true);
      expect(events).toContain('deadline-force');
      expect(result.downtimeMs).toBeGreaterThan(0);
      await vm.exited;
      const b = dest.incoming!.process;
      await ackBeyond(b, 'data', highestAcks(vm.serial.history()).get('data')! + 5);
      await b.quit({ timeoutMs: 10_000 });
      await verifyAcked([{ ...spec.disks[0]!, path: join(hostB, 'data.qcow2') }], highestAcks([...vm.serial.history(), ...b.serial.history()]));
    });
  });

  describe('never run twice: a destination that stops answering at the end', () => {
    test('frozen before its cont: the source, already in postmigrate, is resumed; writes intact', async () => {
      const { vm, spec, hostB } = await bootWorkloadGuest({
        disks: [{ id: 'data', format: 'qcow2', size: 32 << 20 }],
        workload: { write: { rate: 50 }, tickMs: 50 },
      });
      await ackBeyond(vm, 'data', 10);
      const dest = new LocalDestination({ dir: hostB });
      const err = await migrate({
        spec,
        source: sourceOf(spec),
        destination: dest,
        options: { commandTimeoutMs: 2_000 },
        onEvent: (e) => {
          // The source has completed and sits in postmigrate; the destination goes silent.
          if (e.event === 'phase' && e.phase === 'confirm') process.kill(dest.incoming!.pid, 'SIGSTOP');
        },
      }).catch((e: unknown) => e);
      expect(err).toMatchObject({ phase: 'confirm', guestOn: 'source', cleanupErrors: [] });
      expect(dest.incoming!.running()).toBe(false);
      await expectRolledBack(vm, spec, hostB, 'data');
    });

    test("frozen at the point of no return: cont gets no answer, the source stays paused, exactly one runs", async () => {
      const { vm, spec, hostB } = await bootWorkloadGuest({
        disks: [{ id: 'data', format: 'qcow2', size: 32 << 20 }],
        workload: { write: { rate: 50 }, tickMs: 50 },
      });
      await ackBeyond(vm, 'data', 10);
      const dest = new LocalDestination({ dir: hostB });
      let frozen = 0;
      const err = await migrate({
        spec,
        source: sourceOf(spec),
        destination: dest,
        options: { commandTimeoutMs: 2_000 },
        onEvent: (e) => {
          if (e.event === 'point-of-no-return') {
            frozen = e.destinationPid;
            process.kill(e.destinationPid, 'SIGSTOP');
          }
        },
      }).catch((e: unknown) => e);
      expect(frozen).toBe(dest.incoming!.pid);
      expect(err).toMatchObject({ code: 'SWITCHOVER_UNCERTAIN', guestOn: 'unknown' });
      expect((err as Error).message).toContain(`pid ${frozen}`);
      // ferry did not resume the source: it is still paused after the completed migration.
      expect((await vm.qmp.execute('query-status')).status).toBe('postmigrate');
      // The destination got its cont; thawed, it runs the guest, which writes on. One runs, not two.
      process.kill(frozen, 'SIGCONT');
      const b = dest.incoming!.process;
      await ackBeyond(b, 'data', highestAcks(vm.serial.history()).get('data')! + 5);
      expect((await vm.qmp.execute('query-status')).status).toBe('postmigrate');
      await b.quit({ timeoutMs: 10_000 });
      await verifyAcked([{ ...spec.disks[0]!, path: join(hostB, 'data.qcow2') }], highestAcks([...vm.serial.history(), ...b.serial.history()]));
    });
  });

  describe('every wait has a bound', () => {
    test('the total timeout ends a slow migration and rolls back', async () => {
      const { vm, spec, hostB } = await bootWorkloadGuest({
        disks: [{ id: 'data', format: 'qcow2', size: 256 << 20, fillMiB: 100 }],
        workload: { write: { rate: 20 }, tickMs: 50 },
      });
      const err = await migrate({
        spec,
        source: sourceOf(spec),
        destination: new LocalDestination({ dir: hostB }),
        options: { bandwidthBytesPerSec: 10 << 20, totalTimeoutMs: 2_000 },
      }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'TOTAL_TIMEOUT', phase: 'mirror', guestOn: 'source', cleanupErrors: [] });
      await expectRolledBack(vm, spec, hostB, 'data');
    });

    test('a destination that stops answering mid-mirror trips the progress timeout', async () => {
      const { vm, spec, hostB } = await bootWorkloadGuest({
        disks: [{ id: 'data', format: 'qcow2', size: 256 << 20, fillMiB: 100 }],
        workload: { write: { rate: 20 }, tickMs: 50 },
      });
      const dest = new LocalDestination({ dir: hostB });
      const err = await migrate({
        spec,
        source: sourceOf(spec),
        destination: dest,
        options: { bandwidthBytesPerSec: 10 << 20, progressTimeoutMs: 2_000, progressIntervalMs: 200 },
        onEvent: (e) => {
          if (e.event === 'phase' && e.phase === 'mirror') setTimeout(() => process.kill(dest.incoming!.pid, 'SIGSTOP'), 500);
        },
      }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'STALLED', phase: 'mirror', guestOn: 'source', cleanupErrors: [] });
      await expectRolledBack(vm, spec, hostB, 'data');
    });
  });
});
