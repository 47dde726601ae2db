import { chmod, mkdir, mkdtemp, readdir, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { binaryFileKey, diskQemuBuildCache, memoryQemuBuildCache, probeQemuBinaryCached, resolveBinary } from '../../../src/qemu/build-cache.js';
import type { QemuBuild } from '../../../src/qemu/versions.js';

const BUILD: QemuBuild = { version: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3', machines: [{ name: 'pc-q35-7.2', alias: 'q35' }] };

let dir: string;
let binary: string;
let probes: number;
const probe = (answer: QemuBuild) => async (): Promise<QemuBuild> => {
  probes++;
  return answer;
};
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-build-cache-'));
  binary = join(dir, 'bin', 'qemu-system-x86_64');
  await mkdir(join(dir, 'bin'));
  await writeFile(binary, '#!/bin/sh\n', { mode: 0o755 });
  probes = 0;
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('binaryFileKey', () => {
  it('finds a command name on PATH as spawn does, and an absolute path as given', async () => {
    expect(await resolveBinary('qemu-system-x86_64', { PATH: `/nonexistent:${join(dir, 'bin')}` })).toBe(binary);
    expect(await resolveBinary('qemu-system-x86_64', { PATH: '/nonexistent' })).toBeUndefined();
    expect(await resolveBinary(binary, {})).toBe(binary);
  });

  it('changes when the file is rewritten, even with its old mtime put back', async () => {
    const before = await binaryFileKey(binary);
    expect(before).toBeDefined();
    expect(await binaryFileKey(binary)).toBe(before);
    const { mtime, atime } = await stat(binary);
    await writeFile(binary, '#!/bin/sh\n');
    await utimes(binary, atime, mtime);
    // Same size, same mtime: the ctime, which no one can set, still tells.
    expect(await binaryFileKey(binary)).not.toBe(before);
  });
});

describe('probeQemuBinaryCached', () => {
  it('probes on a miss and not again for the same file; a fresh disk cache reads it back', async () => {
    const cacheDir = join(dir, 'cache');
    expect(await probeQemuBinaryCached(binary, diskQemuBuildCache(cacheDir), probe(BUILD))).toEqual({ build: BUILD, remembered: false });
    expect(await probeQemuBinaryCached(binary, diskQemuBuildCache(cacheDir), probe(BUILD))).toMatchObject({ build: BUILD, remembered: true });
    expect(probes).toBe(1);
    const files = await readdir(cacheDir);
    expect(files).toHaveLength(1);
    expect((await stat(join(cacheDir, files[0]!))).mode & 0o777).toBe(0o600);
    expect((await stat(cacheDir)).mode & 0o777).toBe(0o700);
  });

  it('probes again once the binary is another file (an upgrade)', async () => {
    const cache = memoryQemuBuildCache();
    await probeQemuBinaryCached(binary, cache, probe(BUILD));
    await writeFile(binary, '#!/bin/sh\n# 7.2.23\n');
    const upgraded = { ...BUILD, version: { ...BUILD.version, micro: 23 } };
    expect(await probeQemuBinaryCached(binary, cache, probe(upgraded))).toEqual({ build: upgraded, remembered: false });
    expect(probes).toBe(2);
  });

  it('never remembers a build without a package, nor without a cache', async () => {
    const cache = diskQemuBuildCache(join(dir, 'cache'));
    const handBuilt = { ...BUILD, package: '' };
    for (let i = 0; i < 2; i++) expect((await probeQemuBinaryCached(binary, cache, probe(handBuilt))).remembered).toBe(false);
    for (let i = 0; i < 2; i++) expect((await probeQemuBinaryCached(binary, undefined, probe(BUILD))).remembered).toBe(false);
    expect(probes).toBe(4);
  });

  it('ignores a corrupt entry, an entry for another file, and one others can write', async () => {
    const cacheDir = join(dir, 'cache');
    await probeQemuBinaryCached(binary, diskQemuBuildCache(cacheDir), probe(BUILD));
    const [name] = await readdir(cacheDir);
    const file = join(cacheDir, name!);
    const key = (await binaryFileKey(binary))!;
    const bad = [
      '{"format":1,',
      JSON.stringify({ format: 1, fileKey: `${key}x`, build: BUILD }),
      JSON.stringify({ format: 1, fileKey: key, build: { ...BUILD, machines: 'all' } }),
      JSON.stringify({ format: 1, fileKey: key, build: { ...BUILD, package: '' } }),
    ];
    for (const body of bad) {
      await writeFile(file, body, { mode: 0o600 });
      expect((await probeQemuBinaryCached(binary, diskQemuBuildCache(cacheDir), probe(BUILD))).remembered).toBe(false);
    }
    // The last probe wrote the entry again, whole; a mode others can write is not trusted.
    expect((await probeQemuBinaryCached(binary, diskQemuBuildCache(cacheDir), probe(BUILD))).remembered).toBe(true);
    await chmod(file, 0o646);
    expect((await probeQemuBinaryCached(binary, diskQemuBuildCache(cacheDir), probe(BUILD))).remembered).toBe(false);
  });

  it('a probe that fails is not remembered and fails the same way', async () => {
    const cache = memoryQemuBuildCache();
    const failing = async (): Promise<QemuBuild> => {
      throw new Error('no such QEMU');
    };
    await expect(probeQemuBinaryCached(binary, cache, failing)).rejects.toThrow('no such QEMU');
    expect((await probeQemuBinaryCached(binary, cache, probe(BUILD))).remembered).toBe(false);
  });
});
