/**
 * Lazy mode on real QEMU: the destination runs as soon as RAM has moved, reads what it lacks
 * from the source's read-only export, and hydrates in the background.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, test } from 'vitest';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { MigrationError, type MigrationEvent, type Phase } from '../../src/engine/types.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import type { QmpClient } from '../../src/qmp/index.js';
import type { VmSpec } from '../../src/qemu/spec.js';
import { throwawayPki } from '../../src/host/data-tls.js';
import { bootWorkloadGuest, cleanupAll, makeTempDir } from '../helpers/guest.js';

const run = promisify(execFile);
afterEach(cleanupAll);

const sourceOf = (spec: VmSpec): LocalSource => new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') });

/**
 * A read-only NBD export of the destination's disk node, so qemu-io on this host reads through
 * the destination's block layer (overlay, then the source behind it) exactly as the guest does.
 */
async function exportForReading(qmp: QmpClient, node: string): Promise<string> {
  const port = 41000 + Math.floor(Math.random() * 2000);
  await qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(port) } } });
  await qmp.execute('block-export-add', { type: 'nbd', id: 'probe', 'node-name': node, name: 'probe', writable: false });
  return `nbd://127.0.0.1:${port}/probe`;
}

/** 4 KiB at `offset` as qemu-io prints it (hex dump), or its error. */
async function readAt(target: string[], offset: number): Promise<string> {
  const r = await run('qemu-io', [...target, '-c', `read -v ${offset} 4096`]).catch((e: { stdout?: string; stderr?: string }) => e);
  return `${r.stdout ?? ''}${r.stderr ?? ''}`;
}
const dumpOnly = (s: string): string =>
  s
    .split('\n')
    .filter((l) => /^[0-9a-f]{8}:/.test(l))
    .join('\n');

describe('lazy mode', () => {
  test('the destination runs before the disk has moved, hydrates about what is allocated, and loses no acked write', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'qcow2', size: 1 << 30, fillMiB: 32 }],
      workload: { write: { rate: 50 }, tickMs: 50 },
    });
    await vm.serial.waitForLine((l) => /^ack data \d{2,}$/.test(l.text), { timeoutMs: 30_000, what: 'acks' });
    const dest = new LocalDestination({ dir: hostB });
    const phases: Phase[] = [];
    const hydration: Extract<MigrationEvent, { event: 'hydration' }>[] = [];
    const result = await migrate({
      spec,
      source: sourceOf(spec),
      destination: dest,
      options: { mode: 'lazy' },
      onEvent: (e) => {
        if (e.event === 'phase') phases.push(e.phase);
        if (e.event === 'hydration') hydration.push(e);
      },
    });
    expect(phases).toEqual(['preflight', 'prepare-destination', 'ram', 'switchover', 'confirm', 'hydrate', 'cleanup', 'done']);
    expect(result.plan.mode).toBe('lazy');
    expect(result.lazy!.destinationRunningMs).toBeLessThan(result.totalMs);
    expect(result.lazy!.hydrationMs).toBeGreaterThan(0);
    // Only allocated data crossed: ~32 MiB of fill plus the guest's records, not the 1 GiB.
    const allocated = result.plan.disks[0]!.allocatedBytes;
    expect(result.lazy!.hydratedWireBytes).toBeGreaterThan(allocated * 0.5);
    expect(result.lazy!.hydratedWireBytes).toBeLessThan(allocated * 1.5 + (8 << 20));
    expect(hydration.at(-1)!.disks[0]!.doneBytes).toBe(1 << 30);
    await vm.exited;
    const incoming = dest.incoming!;
    const ticks = incoming.process.serial.cursor();
    await incoming.process.serial.waitForLine((l) => /^ack data \d+$/.test(l.text), { timeoutMs: 10_000, since: ticks, what: 'an ack on B' });
    await incoming.process.quit({ timeoutMs: 10_000 });
    // The overlay stands alone now (the verifier refuses a backing file), and holds every write.
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', join(hostB, 'data.qcow2')])).stdout) as Record<string, unknown>;
    expect(info['backing-filename']).toBeUndefined();
    const acked = Math.max(highestAcks(vm.serial.history()).get('data')!, highestAcks(incoming.process.serial.history()).get('data')!);
    const report = await verifyDisk(join(hostB, 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: acked });
    expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  }, 120_000);

  test("unhydrated blocks read the source's data; with the source gone they fail loudly, never read wrong", async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'qcow2', size: 256 << 20, fillMiB: 32 }],
      workload: { write: { rate: 20 }, tickMs: 100 },
    });
    const dest = new LocalDestination({ dir: hostB });
    let hydrating!: () => void;
    const inHydrate = new Promise<void>((r) => (hydrating = r));
    const migration = migrate({
      spec,
      source: sourceOf(spec),
      destination: dest,
      // Slow enough that the end of the 32 MiB fill stays unhydrated for half a minute.
      options: { mode: 'lazy', hydrationBytesPerSec: 1 << 20, nbdReconnectDelayS: 1, hydrationAttempts: 2 },
      onEvent: (e) => {
        if (e.event === 'phase' && e.phase === 'hydrate') hydrating();
      },
    });
    migration.catch(() => undefined);
    await Promise.race([inHydrate, migration.then(() => Promise.reject(new Error('hydration finished before the test could look')))]);
    const q = dest.incoming!.process.qmp;
    const throughDest = ['-r', '-f', 'raw', await exportForReading(q, 'disk-data')];
    const offset = (128 << 20) + (30 << 20); // inside the fill (it starts at half the disk), near its end
    const onDest = await readAt(throughDest, offset);
    const onSource = await readAt(['-f', 'qcow2', '-r', '-U', spec.disks[0]!.path], offset);
    expect(dumpOnly(onDest), onDest).not.toBe('');
    expect(dumpOnly(onDest)).toBe(dumpOnly(onSource));

    // The source's storage server dies mid-hydration: reads of what is missing now fail.
    await vm.kill();
    const err = await migration.then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(MigrationError);
    expect(err).toMatchObject({ code: 'HYDRATION_FAILED', guestOn: 'destination', message: expect.stringMatching(/The guest runs on .*reads of blocks not yet hydrated fail with I\/O errors/) });
    // Every read is now either an I/O error or the source's own data (a block the stream, or a
    // guest write's copy-on-write of its 64 KiB cluster, already brought over): never anything else.
    let errors = 0;
    for (let i = 1; i <= 8; i++) {
      const at = offset - i * (256 << 10); // blocks in distinct clusters, all in the fill
      const got = await readAt(throughDest, at);
      if (/read failed: Input\/output error/.test(got)) {
        errors++;
        expect(dumpOnly(got)).toBe('');
      } else {
        expect(dumpOnly(got), `block at ${at}`).toBe(dumpOnly(await readAt(['-f', 'qcow2', '-r', '-U', spec.disks[0]!.path], at)));
      }
    }
    expect(errors).toBeGreaterThan(0);
    expect((await q.execute('query-status')).status).toBe('running'); // the guest lives on, with errors
  }, 120_000);

  test('cancelled before the switchover: the guest stays on the source, the export and the overlays are gone', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'data', format: 'raw', size: 64 << 20, fillMiB: 8 }],
      workload: { write: { rate: 20 }, tickMs: 50 },
      memoryMiB: 512,
    });
    const ac = new AbortController();
    const err = await migrate({
      spec,
      source: sourceOf(spec),
      destination: new LocalDestination({ dir: hostB }),
      // A slow RAM copy leaves time to cancel in the middle of it.
      options: { mode: 'lazy', bandwidthBytesPerSec: 16 << 20 },
      signal: ac.signal,
      onEvent: (e) => {
        if (e.event === 'phase' && e.phase === 'ram') setTimeout(() => ac.abort(), 500);
      },
    }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'CANCELLED', guestOn: 'source', phase: 'ram' });
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
    expect(await vm.qmp.executeRaw('query-block-exports')).toEqual([]);
    expect((await run('ls', ['-A', hostB])).stdout.trim()).toBe('');
    const before = highestAcks(vm.serial.history()).get('data')!;
    await vm.serial.waitForLine((l) => /^ack data \d+$/.test(l.text) && Number(l.text.split(' ')[2]) > before, { timeoutMs: 10_000, what: 'the guest writing on' });
  }, 60_000);
});

test.each([
  ['plain text', false],
  ['over data TLS', true],
] as const)('a network blip and a cancel during hydration (%s): the NBD client reconnects, the cancel is too late to matter, hydration completes, nothing lost', async (_what, tls) => {
  const pki = tls ? await throwawayPki(await makeTempDir('ferry-pki-'), { address: '127.0.0.1', names: ['hostA', 'hostB'] }) : [];
  const { vm, spec, hostB } = await bootWorkloadGuest({
    disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 8 }],
    workload: { write: { rate: 20 }, tickMs: 100 },
  });
  const port = 39000 + Math.floor(Math.random() * 900);
  const dest = new LocalDestination({ dir: hostB, ...(pki[1] ? { dataTls: pki[1] } : {}) });
  let blips = 0;
  let killed: Promise<string> | undefined;
  const ac = new AbortController();
  const result = await migrate({
    signal: ac.signal,
    spec,
    source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock'), exportPortRange: [port, port], ...(pki[0] ? { dataTls: pki[0] } : {}) }),
    destination: dest,
    // QEMU 7.2's stream counts holes against its speed too: 64 MiB at 8 MiB/s is ~8 s.
    options: { mode: 'lazy', hydrationBytesPerSec: 8 << 20, nbdReconnectDelayS: 10, dataTls: tls ? 'required' : 'off' },
    onEvent: (e) => {
      // Once, a second into the hydration: cut every connection to the source's export.
      if (e.event === 'hydration' && e.elapsedMs > 1_000 && blips === 0) {
        blips++;
        // Past the point of no return a cancel must not stop the hydration: the guest needs it.
        ac.abort();
        killed = run('ss', ['-K', 'dst', '127.0.0.1', 'dport', '=', `:${port}`]).then(
          (r) => r.stdout,
          (e: { stdout?: string }) => e.stdout ?? '',
        );
      }
    },
  });
  expect(blips).toBe(1);
  expect(result.plan.dataTls.encrypted).toBe(tls);
  expect(await killed).toContain(`:${port}`); // the kernel did cut the destination's connection
  expect(result.lazy!.hydrationMs).toBeGreaterThan(1_000);
  expect(result.lazy!.hydratedWireBytes).toBeGreaterThan(8 << 20);
  await vm.exited;
  const incoming = dest.incoming!;
  await incoming.process.quit({ timeoutMs: 10_000 });
  const acked = Math.max(highestAcks(vm.serial.history()).get('data')!, highestAcks(incoming.process.serial.history()).get('data') ?? -1);
  const report = await verifyDisk(join(hostB, 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: acked });
  expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
}, 120_000);
