/**
 * Mixed pairs with real QEMUs: the system's 7.2 and the bootstrap's 10.0 (skipped, saying so,
 * when 10.0 is not unpacked). Forward (7.2 -> 10.0) migrates with the destination pinned to the
 * source's pc-q35-7.2; backward (10.0 -> 7.2) is refused in preflight with nothing changed.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { AgentClient, AgentDestination } from '../../src/agent/client.js';
import { startAgent } from '../../src/agent/server.js';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { MigrationError } from '../../src/engine/types.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { highestAcks, parseSerialLine } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import type { VmProcess } from '../../src/qemu/launcher.js';
import type { VmSpec } from '../../src/qemu/spec.js';
import { bootWorkloadGuest, cleanupAll, makeTempDir } from '../helpers/guest.js';
import { QEMU10_MISSING, qemu10Binary, systemQemuBinary } from '../helpers/qemu.js';

afterEach(cleanupAll);

const sourceOf = (spec: VmSpec): LocalSource => new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') });

async function machineOf(vm: VmProcess): Promise<string> {
  return String(await vm.qmp.executeRaw('qom-get', { path: '/machine', property: 'type' }));
}

async function ackBeyond(vm: VmProcess, seq: number): Promise<void> {
  await vm.serial.waitForLine(
    (l) => {
      const p = parseSerialLine(l.text);
      return p.kind === 'ack' && p.disk === 'data' && p.seq > seq;
    },
    { timeoutMs: 30_000, what: `an ack on data beyond ${seq}` },
  );
}

describe.skipIf(!qemu10Binary)(`mixed QEMU pairs, 7.2 and 10.0 (${qemu10Binary ? 'real QEMUs' : QEMU10_MISSING})`, () => {
  test('7.2 -> 10.0: the destination runs pc-q35-7.2, no acknowledged write lost; then 10.0 -> 10.0 keeps pc-q35-7.2', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 4 }],
      workload: { write: { rate: 50 }, tickMs: 50 },
      qemuBinary: systemQemuBinary,
    });
    expect((await vm.qmp.execute('query-version')).qemu.major).toBe(7);
    expect(spec.machine).toBe('q35');
    expect(await machineOf(vm)).toBe('pc-q35-7.2-machine');
    await ackBeyond(vm, 10);

    const dest = new LocalDestination({ dir: hostB, qemuBinary: qemu10Binary! });
    await migrate({ spec, source: sourceOf(spec), destination: dest });
    await vm.exited;
    const b = dest.incoming!.process;
    expect((await b.qmp.execute('query-version')).qemu.major).toBe(10);
    expect(await machineOf(b)).toBe('pc-q35-7.2-machine');
    expect((await b.qmp.execute('query-status')).status).toBe('running');
    const afterSource = highestAcks(vm.serial.history()).get('data')!;
    await ackBeyond(b, afterSource + 10);

    // Migrated again with the spec still saying `q35` (pc-q35-10.0 on 10.0): what the source
    // really runs decides, not the alias.
    const hostC = await makeTempDir('ferry-test-c-');
    const again = new LocalDestination({ dir: hostC, qemuBinary: qemu10Binary! });
    await migrate({ spec: { ...b.spec, machine: 'q35' }, source: sourceOf(b.spec), destination: again });
    await b.exited;
    const c = again.incoming!.process;
    expect(await machineOf(c)).toBe('pc-q35-7.2-machine');
    const afterB = highestAcks(b.serial.history()).get('data')!;
    await ackBeyond(c, afterB + 10);
    await c.quit({ timeoutMs: 10_000 });

    const acked = highestAcks([...vm.serial.history(), ...b.serial.history(), ...c.serial.history()]).get('data')!;
    const report = await verifyDisk(join(hostC, 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: acked });
    expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  });

  test('10.0 -> 7.2: refused in preflight, naming both versions; nothing started or written on B', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'qcow2', size: 64 << 20 }],
      workload: { write: { rate: 50 }, tickMs: 50 },
      qemuBinary: qemu10Binary!,
    });
    expect(await machineOf(vm)).toBe('pc-q35-10.0-machine');
    await ackBeyond(vm, 5);
    const dest = new LocalDestination({ dir: hostB, qemuBinary: systemQemuBinary });
    const phases: string[] = [];
    const err = await migrate({
      spec,
      source: sourceOf(spec),
      destination: dest,
      onEvent: (e) => {
        if (e.event === 'phase') phases.push(e.phase);
      },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationError);
    expect(err).toMatchObject({ code: 'PREFLIGHT_REFUSED', phase: 'preflight', userError: true });
    expect((err as MigrationError).message).toMatch(/source runs QEMU 10\.0\.\d+ with machine type pc-q35-10\.0; the destination's QEMU 7\.2\.\d+ is older/);
    expect(phases).toEqual(['preflight', 'failed']);
    expect(dest.incoming).toBeUndefined();
    expect(await readdir(hostB)).toEqual([]);
    // The guest never noticed.
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
    const before = highestAcks(vm.serial.history()).get('data')!;
    await ackBeyond(vm, before + 5);
  });

  test('through agents too: 10.0 -> a 7.2 agent refused before the agent makes anything; 7.2 -> a 10.0 agent pinned', async () => {
    const token = 'token-of-alice-0123456789';
    const old = await makeTempDir('ferry-agent-72-');
    const agent72 = await startAgent({ name: 'old', listenPort: 0, storageRoot: old, bootRoots: [IMAGE_DIR], tokens: { [token]: 'alice' }, qemuBinary: systemQemuBinary });
    const newer = await makeTempDir('ferry-agent-100-');
    const agent100 = await startAgent({ name: 'new', listenPort: 0, storageRoot: newer, bootRoots: [IMAGE_DIR], tokens: { [token]: 'alice' }, qemuBinary: qemu10Binary! });
    const pids: number[] = [];
    try {
      const g10 = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20 }], workload: { tickMs: 50 }, qemuBinary: qemu10Binary!, name: 'g10' });
      const to72 = await AgentDestination.connect(agent72.url, token);
      const err = await migrate({ spec: g10.spec, source: sourceOf(g10.spec), destination: to72 }).catch((e: unknown) => e);
      to72.close();
      expect(err).toMatchObject({ code: 'PREFLIGHT_REFUSED', phase: 'preflight' });
      expect((err as Error).message).toMatch(/QEMU 10\.0\.\d+ with machine type pc-q35-10\.0; the destination's QEMU 7\.2\.\d+ is older/);
      expect((await readdir(old)).filter((f) => !f.startsWith('.'))).toEqual([]);
      expect((await g10.vm.qmp.execute('query-status')).status).toBe('running');

      const g72 = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20 }], workload: { write: { rate: 50 }, tickMs: 50 }, qemuBinary: systemQemuBinary, name: 'g72' });
      await ackBeyond(g72.vm, 5);
      const to100 = await AgentDestination.connect(agent100.url, token);
      await migrate({ spec: g72.spec, source: sourceOf(g72.spec), destination: to100 });
      await g72.vm.exited;
      const client = await AgentClient.connect(agent100.url, token);
      const [listed] = (await client.call('vm.list')) as { vmId: string; pid: number }[];
      pids.push(listed!.pid);
      expect((await readFile(`/proc/${listed!.pid}/cmdline`, 'utf8')).split('\0')).toContain('pc-q35-7.2');
      const qmp = await client.openQmp(to100.vmId!);
      expect((await qmp.execute('query-version')).qemu.major).toBe(10);
      expect((await qmp.execute('query-status')).status).toBe('running');
      await qmp.close();
      await client.call('dest.kill', { vmId: to100.vmId! });
      client.close();
      to100.close();
    } finally {
      await agent72.close();
      await agent100.close();
      for (const pid of pids) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }
  });
});
