/**
 * Dirty bitmaps travel with the VM: a backup tool's incremental state made on the source must be
 * on the destination with the same name and contents, and keep recording there.
 * Writes go through QEMU's block layer (HMP qemu-io) so exactly which 64 KiB chunks are dirty is
 * known: the guest itself runs no disk workload here.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, expect, test } from 'vitest';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import type { QmpClient } from '../../src/qmp/index.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';

const run = promisify(execFile);
const CHUNK = 64 * 1024;

afterEach(cleanupAll);

/** A 64 KiB write through the guest's own virtio-blk device (it shares write with no one else). */
async function write(q: QmpClient, offsetMiB: number): Promise<void> {
  const out = await q.executeRaw('human-monitor-command', {
    'command-line': `qemu-io -d /machine/peripheral/dev-data/virtio-backend "write -P 0x33 ${offsetMiB}M 64k"`,
  });
  expect(out).toBe('');
}

async function bitmap(q: QmpClient, name: string): Promise<{ count: number; persistent: boolean } | undefined> {
  const nodes = await q.execute('query-named-block-nodes', { flat: true });
  const b = nodes.find((n) => n['node-name'] === 'disk-data')?.['dirty-bitmaps']?.find((x) => x.name === name);
  return b ? { count: b.count, persistent: b.persistent } : undefined;
}

test('a persistent dirty bitmap moves with the VM and keeps recording on the destination', async () => {
  const { vm, spec, hostB } = await bootWorkloadGuest({
    disks: [{ id: 'data', format: 'qcow2', size: 64 << 20 }],
    workload: { tickMs: 100 },
  });
  await write(vm.qmp, 20); // before the bitmap: must not count
  await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk-data', name: 'backup0', persistent: true, granularity: CHUNK });
  for (const mib of [1, 2, 3]) await write(vm.qmp, mib);
  expect(await bitmap(vm.qmp, 'backup0')).toEqual({ count: 3 * CHUNK, persistent: true });

  const destination = new LocalDestination({ dir: hostB });
  const result = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }), destination });
  expect(result.plan.bitmaps).toEqual([{ disk: 'data', name: 'backup0', persistent: true, count: 3 * CHUNK }]);
  expect(result.bitmapsMigrated).toEqual([{ disk: 'data', name: 'backup0' }]);

  const b = destination.incoming!.process;
  expect(await bitmap(b.qmp, 'backup0')).toEqual({ count: 3 * CHUNK, persistent: true });
  // New writes on the destination are recorded; a chunk already dirty stays one chunk.
  for (const mib of [10, 11, 1]) await write(b.qmp, mib);
  expect(await bitmap(b.qmp, 'backup0')).toEqual({ count: 5 * CHUNK, persistent: true });
  // Persistent: written into the destination's qcow2 when its QEMU closes the image.
  await b.quit({ timeoutMs: 10_000 });
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', join(hostB, 'data.qcow2')])).stdout) as {
    'format-specific'?: { data?: { bitmaps?: { name: string }[] } };
  };
  expect(info['format-specific']?.data?.bitmaps?.map((x) => x.name)).toEqual(['backup0']);
});
