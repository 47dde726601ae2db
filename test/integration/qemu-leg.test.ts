/**
 * Which QEMU this test run launches: FERRY_QEMU when set (the 10.0 leg of .ci/run sets it to the
 * bootstrap's QEMU 10.0), else the system's. Guards the 10.0 leg against silently running 7.2.
 */
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { loadGuestImage } from '../../src/guest/image.js';
import { defaultQemuBinary, launchVm } from '../../src/qemu/launcher.js';
import { parseVmSpec } from '../../src/qemu/spec.js';
import { probeQemuBinary } from '../../src/qemu/versions.js';
import { cleanupAll, makeDisk, makeTempDir } from '../helpers/guest.js';
import { qemu10Binary } from '../helpers/qemu.js';

afterEach(cleanupAll);

test(`a launch without a binary runs ${process.env.FERRY_QEMU ? `FERRY_QEMU (${process.env.FERRY_QEMU})` : 'the system QEMU'}`, async () => {
  const expected = await probeQemuBinary(defaultQemuBinary(), { timeoutMs: 10_000 });
  if (process.env.FERRY_QEMU && process.env.FERRY_QEMU === qemu10Binary) expect(expected.version).toMatchObject({ major: 10, minor: 0 });
  if (!process.env.FERRY_QEMU) expect(defaultQemuBinary()).toBe('qemu-system-x86_64');

  const dir = await makeTempDir();
  await makeDisk(join(dir, 'd0.raw'), { id: 'd0', format: 'raw', size: 1 << 20 });
  const image = await loadGuestImage();
  const spec = parseVmSpec({
    name: 'leg',
    memoryMiB: 64,
    disks: [{ id: 'd0', path: join(dir, 'd0.raw'), format: 'raw' }],
    boot: { kernel: image.kernel, initrd: image.initrd, append: 'console=ttyS0 quiet' },
    runDir: join(dir, 'run'),
  });
  const vm = await launchVm(spec, { timeoutMs: 20_000 });
  const v = await vm.qmp.execute('query-version');
  expect({ ...v.qemu, package: v.package.trim() }).toEqual({ ...expected.version, package: expected.package });
  await vm.quit({ timeoutMs: 10_000 });
});
