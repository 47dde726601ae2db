import { mkdir, mkdtemp, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { buildArgv, diskBlockdevs } from '../../../src/qemu/argv.js';
import { parseVmSpec, retargetSpec, SpecError, type VmSpecInput } from '../../../src/qemu/spec.js';

const good: VmSpecInput = {
  name: 'vm1',
  memoryMiB: 256,
  disks: [
    { id: 'root', path: '/srv/a/root.qcow2', format: 'qcow2' },
    { id: 'data', path: '/srv/a/data.raw', format: 'raw', cache: 'writeback' },
  ],
  boot: { kernel: '/boot/vmlinuz', initrd: '/boot/initrd', append: 'console=ttyS0' },
  runDir: '/srv/a/run',
};

function refusal(input: unknown, opts?: { allowedRoots?: string[] }): SpecError {
  try {
    parseVmSpec(input, opts);
  } catch (err) {
    expect(err).toBeInstanceOf(SpecError);
    return err as SpecError;
  }
  throw new Error('expected a SpecError');
}

describe('parseVmSpec', () => {
  test('a good spec parses, with defaults', () => {
    expect(parseVmSpec(good)).toMatchObject({ vcpus: 1, machine: 'q35', accel: 'tcg', disks: [{ cache: 'none' }, { cache: 'writeback' }] });
  });

  test.each([
    [{ ...good, memoryMiB: 0 }, 'memoryMiB'],
    [{ ...good, memoryMiB: 10 ** 9 }, 'memoryMiB'],
    [{ ...good, disks: [] }, 'disks'],
    [{ ...good, disks: [good.disks[0], { ...good.disks[0], path: '/srv/a/x.qcow2' }] }, 'disks.1.id'],
    [{ ...good, disks: [{ ...good.disks[0], path: 'relative.qcow2' }] }, 'disks.0.path'],
    [{ ...good, disks: [{ ...good.disks[0], format: 'vmdk' }] }, 'disks.0.format'],
    [{ ...good, disks: [{ ...good.disks[0], id: 'Bad_Id' }] }, 'disks.0.id'],
    [{ ...good, disks: [{ ...good.disks[0], virtualSize: 1000 }] }, 'disks.0.virtualSize'],
    [{ ...good, boot: { disk: 'nope' } }, 'boot.disk'],
    [{ ...good, name: '../etc' }, 'name'],
    [{ ...good, surprise: 1 }, '(root)'],
  ])('refuses %#, naming %s', (input, field) => {
    const e = refusal(input);
    expect(e.field).toBe(field);
    expect(e.message).toContain(field);
    expect(e.userError).toBe(true);
  });

  describe('allowed roots', () => {
    let root: string;
    beforeAll(async () => {
      root = await mkdtemp(join(tmpdir(), 'ferry-roots-'));
      await mkdir(join(root, 'store'));
      await symlink('/etc', join(root, 'store', 'escape'));
    });
    afterAll(async () => rm(root, { recursive: true, force: true }));
    const spec = (p: string): VmSpecInput => ({ ...good, disks: [{ id: 'root', path: p, format: 'qcow2' }], runDir: join(root, 'store', 'run') });

    test('inside is fine', () => {
      expect(() => parseVmSpec(spec(join(root, 'store', 'vm', 'root.qcow2')), { allowedRoots: [join(root, 'store')] })).not.toThrow();
    });
    test.each([
      ['a path elsewhere', '/var/lib/other.qcow2'],
      ['.. out of the root', 'store/../outside.qcow2'],
      ['a symlink that leads out', 'store/escape/passwd'],
    ])('refuses %s', (_what, p) => {
      const e = refusal(spec(p.startsWith('/') ? p : join(root, p)), { allowedRoots: [join(root, 'store')] });
      expect(e.field).toBe('disks.0.path');
      expect(e.message).toMatch(/outside the allowed roots/);
    });
  });
});

test('argv: stable node-names and devices, cache modes, incoming', () => {
  const spec = parseVmSpec(good);
  const argv = buildArgv(spec, { incoming: 'defer', startPaused: true });
  const joined = argv.join(' ');
  expect(joined).toContain('-blockdev driver=file,node-name=file-root,filename=/srv/a/root.qcow2,cache.direct=on,cache.no-flush=off,aio=native');
  expect(joined).toContain('-blockdev driver=qcow2,node-name=disk-root,file=file-root');
  expect(joined).toContain('-device virtio-blk-pci,drive=disk-root,id=dev-root,serial=root,write-cache=on');
  expect(joined).toContain('node-name=file-data,filename=/srv/a/data.raw,cache.direct=off');
  expect(argv.slice(-3)).toEqual(['-incoming', 'defer', '-S']);
  expect(joined).toContain('-kernel /boot/vmlinuz -initrd /boot/initrd -append console=ttyS0');
  expect(argv).toContain('unix:/srv/a/run/qmp.sock,server=on,wait=off');
  expect(argv).toContain('unix:/srv/a/run/launcher-qmp.sock,server=on,wait=off');
});

test('argv: bufferedDisks opens an O_DIRECT disk without it (aio=threads); the write cache and the rest stay', () => {
  const spec = parseVmSpec(good);
  const joined = buildArgv(spec, { bufferedDisks: true }).join(' ');
  expect(joined).toContain('-blockdev driver=file,node-name=file-root,filename=/srv/a/root.qcow2,cache.direct=off,cache.no-flush=off,aio=threads');
  expect(joined).toContain('-blockdev driver=qcow2,node-name=disk-root,file=file-root,cache.direct=off');
  expect(joined).toContain('-device virtio-blk-pci,drive=disk-root,id=dev-root,serial=root,write-cache=on');
});

test('diskBlockdevs: the -blockdev nodes as QMP objects, a comma in a path doubled only on the command line', () => {
  const d = parseVmSpec({ ...good, disks: [{ id: 'root', path: '/srv/a,b/root.raw', format: 'raw', discard: true }] }).disks[0]!;
  expect(diskBlockdevs(d)).toEqual({
    file: { driver: 'file', 'node-name': 'file-root', filename: '/srv/a,b/root.raw', cache: { direct: true, 'no-flush': false }, aio: 'native', discard: 'unmap' },
    format: { driver: 'raw', 'node-name': 'disk-root', file: 'file-root', cache: { direct: true, 'no-flush': false }, discard: 'unmap' },
  });
  expect(buildArgv(parseVmSpec({ ...good, disks: [{ id: 'root', path: '/srv/a,b/root.raw', format: 'raw' }] })).join(' ')).toContain('filename=/srv/a,,b/root.raw,');
});

test('retargetSpec moves the disks and the run dir, nothing else', () => {
  const spec = parseVmSpec(good);
  const t = retargetSpec(spec, { dir: '/srv/b', runDir: '/srv/b/run-vm1' });
  expect(t.disks.map((d) => d.path)).toEqual(['/srv/b/root.qcow2', '/srv/b/data.raw']);
  expect(t.runDir).toBe('/srv/b/run-vm1');
  expect({ ...t, disks: [], runDir: '' }).toEqual({ ...spec, disks: [], runDir: '' });
});

test('paths are normalised lexically: one file, one spelling (symlinks are left alone)', () => {
  const spec = parseVmSpec({
    ...good,
    disks: [{ ...good.disks[0], path: '/srv/a/../a/./root.qcow2' }, { ...good.disks[1], path: '/srv//a/data.raw' }],
    boot: { kernel: '/boot/./vmlinuz', initrd: '/boot/x/../initrd' },
    runDir: '/srv/a/run/',
  });
  expect(spec.disks.map((d) => d.path)).toEqual(['/srv/a/root.qcow2', '/srv/a/data.raw']);
  expect(spec.boot).toMatchObject({ kernel: '/boot/vmlinuz', initrd: '/boot/initrd' });
  expect(spec.runDir).toBe('/srv/a/run');
});
