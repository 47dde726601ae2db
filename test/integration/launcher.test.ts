import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { loadGuestImage } from '../../src/guest/image.js';
import { LaunchError, launchVm } from '../../src/qemu/launcher.js';
import { livePids } from '../../src/qemu/reaper.js';
import { parseVmSpec, SpecError } from '../../src/qemu/spec.js';
import { cleanupAll, makeDisk, makeTempDir } from '../helpers/guest.js';

afterEach(cleanupAll);

async function specIn(dir: string, diskPath: string, format: 'raw' | 'qcow2' = 'raw') {
  const image = await loadGuestImage();
  return parseVmSpec({
    name: 'l',
    memoryMiB: 128,
    disks: [{ id: 'd0', path: diskPath, format }],
    boot: { kernel: image.kernel, initrd: image.initrd, append: 'console=ttyS0 quiet' },
    runDir: join(dir, 'run'),
  });
}

test('launch, QMP answers, quit reaps', async () => {
  const dir = await makeTempDir();
  await makeDisk(join(dir, 'd0.raw'), { id: 'd0', format: 'raw', size: 1 << 20 });
  const vm = await launchVm(await specIn(dir, join(dir, 'd0.raw')), { timeoutMs: 20_000 });
  expect((await vm.qmp.execute('query-status')).status).toBe('running');
  expect(livePids()).toContain(vm.pid);
  await vm.quit({ timeoutMs: 10_000 });
  expect(vm.running()).toBe(false);
  expect(livePids()).not.toContain(vm.pid);
});

test("a disk QEMU cannot open: LaunchError with QEMU's own message, no process left", async () => {
  const dir = await makeTempDir();
  const notQcow2 = join(dir, 'd0.qcow2');
  await writeFile(notQcow2, 'this is not a qcow2 image');
  const t0 = performance.now();
  const err = await launchVm(await specIn(dir, notQcow2, 'qcow2'), { timeoutMs: 20_000 }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(LaunchError);
  expect((err as Error).message).toMatch(/exited during start-up.*qcow2/s);
  expect(performance.now() - t0).toBeLessThan(20_000);
  expect(livePids()).toEqual([]);
});

test('a missing disk file is refused before QEMU starts, naming the field', async () => {
  const dir = await makeTempDir();
  const err = await launchVm(await specIn(dir, join(dir, 'absent.raw')), { timeoutMs: 5_000 }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(SpecError);
  expect(err).toMatchObject({ field: 'disks.0.path' });
});
