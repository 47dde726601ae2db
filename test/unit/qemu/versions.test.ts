import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { defaultQemuBinary, LaunchError } from '../../../src/qemu/launcher.js';
import {
  checkQemuPair,
  compareRelease,
  destinationMachine,
  probeQemuBinary,
  probeRunningQemu,
  QemuVersionError,
  resolveMachine,
  type QemuBuild,
  type RunningQemu,
} from '../../../src/qemu/versions.js';
import type { QmpClient } from '../../../src/qmp/index.js';

/** Real replies of the system's 7.2 and backports' 10.0, each started with -machine q35. */
interface Recording {
  'query-version': { qemu: { major: number; minor: number; micro: number }; package: string };
  'query-machines': unknown[];
  'qom-get /machine type': string;
}
const recorded = (v: string): Recording =>
  JSON.parse(readFileSync(join(import.meta.dirname, '..', '..', '..', 'fixtures', 'qemu', `q35-${v}.json`), 'utf8')) as Recording;
const r72 = recorded('7.2');
const r100 = recorded('10.0');

/** A source QMP that answers from a recording; `qomType` overrides what the VM runs. */
function fakeQmp(r: Recording, qomType: unknown = r['qom-get /machine type']): Pick<QmpClient, 'executeRaw'> {
  return {
    executeRaw: async (command: string) => {
      if (command === 'query-version') return r['query-version'];
      if (command === 'query-machines') return r['query-machines'];
      if (command === 'qom-get') return qomType;
      throw new Error(`unexpected ${command}`);
    },
  };
}
const opts = { timeoutMs: 1_000 };

async function build(r: Recording): Promise<QemuBuild> {
  const { machine: _m, ...b } = await probeRunningQemu(fakeQmp(r), opts);
  return b;
}

describe('machine types', () => {
  test('q35 is an alias: pc-q35-7.2 on 7.2, pc-q35-10.0 on 10.0; a versioned name stands for itself', async () => {
    const b72 = await build(r72);
    const b100 = await build(r100);
    expect(resolveMachine(b72.machines, 'q35')).toBe('pc-q35-7.2');
    expect(resolveMachine(b100.machines, 'q35')).toBe('pc-q35-10.0');
    expect(resolveMachine(b100.machines, 'pc-q35-7.2')).toBe('pc-q35-7.2');
    expect(resolveMachine(b72.machines, 'pc-q35-10.0')).toBeUndefined();
  });

  test('the source machine type is what QOM says the VM runs', async () => {
    expect((await probeRunningQemu(fakeQmp(r72), opts)).machine).toBe('pc-q35-7.2');
    expect((await probeRunningQemu(fakeQmp(r100), opts)).machine).toBe('pc-q35-10.0');
    // A 10.0 running the 7.2 type (a VM migrated forward once).
    const migrated = await probeRunningQemu(fakeQmp(r100, 'pc-q35-7.2-machine'), opts);
    expect(migrated).toMatchObject({ version: { major: 10, minor: 0 }, machine: 'pc-q35-7.2' });
  });

  test('a QOM type that is no machine of that QEMU is a probe failure, not a guess', async () => {
    for (const bad of ['pc-q35-99.0-machine', 42, null]) {
      const err = await probeRunningQemu(fakeQmp(r72, bad), opts).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(QemuVersionError);
      expect(err).toMatchObject({ code: 'QEMU_PROBE_FAILED' });
    }
  });
});

describe('destinationMachine', () => {
  test('7.2 -> 10.0: the destination is pinned to the source type', async () => {
    expect(destinationMachine(await probeRunningQemu(fakeQmp(r72), opts), await build(r100))).toEqual({ machine: 'pc-q35-7.2' });
  });

  test('same release: pinned as well (q35 would resolve the same, the exact name is never worse)', async () => {
    expect(destinationMachine(await probeRunningQemu(fakeQmp(r72), opts), await build(r72))).toEqual({ machine: 'pc-q35-7.2' });
    expect(destinationMachine(await probeRunningQemu(fakeQmp(r100), opts), await build(r100))).toEqual({ machine: 'pc-q35-10.0' });
  });

  test('10.0 -> 7.2 is refused, naming both versions and the machine type', async () => {
    const d = destinationMachine(await probeRunningQemu(fakeQmp(r100), opts), await build(r72));
    expect(d).toEqual({
      problem:
        "the source runs QEMU 10.0.2 with machine type pc-q35-10.0; the destination's QEMU 7.2.22 is older, and QEMU migrates only to the same or a newer release: upgrade the destination's QEMU or choose another destination",
    });
  });

  test('10.0 running pc-q35-7.2 -> 7.2 is refused too: backward is unsupported whatever the type', async () => {
    const d = destinationMachine(await probeRunningQemu(fakeQmp(r100, 'pc-q35-7.2-machine'), opts), await build(r72));
    expect(d).toMatchObject({ problem: expect.stringContaining('is older') });
  });

  test('an older micro release of the same minor is not older: 7.2.22 -> 7.2.5', async () => {
    const src = await probeRunningQemu(fakeQmp(r72), opts);
    const dest = { ...(await build(r72)), version: { major: 7, minor: 2, micro: 5 } };
    expect(destinationMachine(src, dest)).toEqual({ machine: 'pc-q35-7.2' });
  });

  test('a newer destination without the source type is refused', async () => {
    const src: RunningQemu = { ...(await build(r72)), machine: 'pc-q35-7.2' };
    const dest = await build(r100);
    const trimmed = { ...dest, machines: dest.machines.filter((m) => m.name !== 'pc-q35-7.2') };
    expect(destinationMachine(src, trimmed)).toEqual({
      problem: "the source runs QEMU 7.2.22 with machine type pc-q35-7.2; the destination's QEMU 10.0.2 has no machine type pc-q35-7.2",
    });
  });

  test('compareRelease orders by major, then minor, ignoring micro', () => {
    expect(compareRelease({ major: 10, minor: 0, micro: 0 }, { major: 7, minor: 2, micro: 22 })).toBeGreaterThan(0);
    expect(compareRelease({ major: 7, minor: 2, micro: 0 }, { major: 7, minor: 2, micro: 22 })).toBe(0);
    expect(compareRelease({ major: 9, minor: 2, micro: 0 }, { major: 10, minor: 0, micro: 0 })).toBeLessThan(0);
  });
});

describe('checkQemuPair', () => {
  test('a destination that cannot be probed ahead still gets the exact type, with no problem', async () => {
    const pair = await checkQemuPair(fakeQmp(r72), {}, opts);
    expect(pair).toMatchObject({ machine: 'pc-q35-7.2', problems: [], destination: undefined });
  });

  test('forward: pinned; backward: a problem and no machine', async () => {
    const b100 = await build(r100);
    const b72 = await build(r72);
    expect(await checkQemuPair(fakeQmp(r72), { probeQemu: async () => b100 }, opts)).toMatchObject({ machine: 'pc-q35-7.2', problems: [] });
    const back = await checkQemuPair(fakeQmp(r100), { probeQemu: async () => b72 }, opts);
    expect(back.machine).toBeUndefined();
    expect(back.problems).toHaveLength(1);
    expect(back.problems[0]).toContain("the destination's QEMU 7.2.22 is older");
  });

  test('a destination probe that fails is a preflight problem naming why', async () => {
    const pair = await checkQemuPair(fakeQmp(r72), { probeQemu: () => Promise.reject(new Error('spawn /nope ENOENT')) }, opts);
    expect(pair.problems).toEqual(['cannot tell which QEMU the destination runs: spawn /nope ENOENT']);
    expect(pair.machine).toBeUndefined();
  });
});

describe('choosing the binary', () => {
  test('FERRY_QEMU: unset or empty is the system QEMU, an absolute path or a command name is taken', () => {
    expect(defaultQemuBinary({})).toBe('qemu-system-x86_64');
    expect(defaultQemuBinary({ FERRY_QEMU: '' })).toBe('qemu-system-x86_64');
    expect(defaultQemuBinary({ FERRY_QEMU: '/opt/qemu10/bin/qemu-system-x86_64' })).toBe('/opt/qemu10/bin/qemu-system-x86_64');
    expect(defaultQemuBinary({ FERRY_QEMU: 'qemu-kvm' })).toBe('qemu-kvm');
  });

  test('FERRY_QEMU relative with a slash is refused: it would depend on the working directory', () => {
    expect(() => defaultQemuBinary({ FERRY_QEMU: '.cache/qemu-10.0/bin/qemu-system-x86_64' })).toThrow(LaunchError);
    expect(() => defaultQemuBinary({ FERRY_QEMU: './qemu' })).toThrow(/FERRY_QEMU=\.\/qemu: must be an absolute path or a command name on PATH/);
  });

  test('probing a binary that does not exist names it', async () => {
    const err = await probeQemuBinary('/nonexistent/qemu-system-x86_64', opts).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QemuVersionError);
    expect(err).toMatchObject({ code: 'QEMU_PROBE_FAILED', context: { binary: '/nonexistent/qemu-system-x86_64' } });
    expect((err as Error).message).toContain('cannot ask /nonexistent/qemu-system-x86_64 what it is');
  });
});

describe('LocalDestination.probeQemu', () => {
  test('a bad FERRY_QEMU is a preflight problem naming it, not a crash', async () => {
    const { LocalDestination } = await import('../../../src/engine/local-endpoint.js');
    const before = process.env.FERRY_QEMU;
    process.env.FERRY_QEMU = 'relative/qemu';
    try {
      const pair = await checkQemuPair(fakeQmp(r72), new LocalDestination({ dir: '/nonexistent' }), opts);
      expect(pair.problems).toEqual(['cannot tell which QEMU the destination runs: FERRY_QEMU=relative/qemu: must be an absolute path or a command name on PATH']);
    } finally {
      if (before === undefined) delete process.env.FERRY_QEMU;
      else process.env.FERRY_QEMU = before;
    }
  });
});
