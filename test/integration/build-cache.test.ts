/**
 * A local destination's remembered QEMU build (src/qemu/build-cache.ts) against a real QEMU: the
 * started destination's greeting is checked against what the preflight decided on. A wrong entry
 * is refused before anything is copied (rolled back, the guest still runs on the source, B empty)
 * and forgotten, so the next migration probes and goes through.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { binaryFileKey, memoryQemuBuildCache } from '../../src/qemu/build-cache.js';
import { defaultQemuBinary } from '../../src/qemu/launcher.js';
import { probeQemuBinary } from '../../src/qemu/versions.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';

afterEach(cleanupAll);

test('a remembered build that is not the QEMU that starts is refused, forgotten, and the next run probes', async () => {
  const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 32 << 20, fillMiB: 2 }], workload: { write: { rate: 50 }, tickMs: 50 } });
  const binary = defaultQemuBinary();
  const key = (await binaryFileKey(binary))!;
  expect(key).toBeDefined();
  const real = await probeQemuBinary(binary, { timeoutMs: 10_000 });
  expect(real.package, 'the test needs a packaged QEMU (its greeting names a package)').not.toBe('');
  const cache = memoryQemuBuildCache();
  // The same version and machines, another package: what a stale entry for a rebuilt binary looks like.
  await cache.put(key, { ...real, package: `${real.package}+rebuilt` });
  const source = new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') });

  const err = await migrate({ spec, source, destination: new LocalDestination({ dir: hostB, qemuBuildCache: cache }), options: { mode: 'lazy', dataTls: 'off' } }).catch((e: unknown) => e);
  expect(String(err)).toMatch(/not the remembered/);
  expect((await vm.qmp.execute('query-status')).status).toBe('running');
  expect(await readdir(hostB)).toEqual([]);
  expect(await cache.get(key)).toBeUndefined();

  const destination = new LocalDestination({ dir: hostB, qemuBuildCache: cache });
  await migrate({ spec, source, destination, options: { mode: 'lazy', dataTls: 'off' } });
  expect((await destination.incoming!.qmp.execute('query-status')).status).toBe('running');
  expect(await cache.get(key)).toEqual(real);
  await destination.incoming!.kill();
});
