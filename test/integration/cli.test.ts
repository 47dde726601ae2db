/** migrate-vm as an operator runs it: a real process, real sockets, a real guest. */
import { execFile, spawn } from 'node:child_process';
import { readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, describe, expect, test } from 'vitest';
import { verifyDisk } from '../../src/guest/verify.js';
import { highestAcks } from '../../src/guest/serial.js';
import { bootWorkloadGuest, cleanupAll, makeTempDir } from '../helpers/guest.js';

const exec = promisify(execFile);
const BIN = join(import.meta.dirname, '..', '..', 'bin', 'migrate-vm.mjs');

/** Where the runs keep what they remember (docs/migration.md): a temp dir, never the user's ~/.cache. */
let cacheHome: string | undefined;

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  cacheHome ??= await makeTempDir('ferry-test-cache-');
  try {
    const r = await exec(process.execPath, [BIN, ...args], { timeout: 120_000, env: { ...process.env, XDG_CACHE_HOME: cacheHome } });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

afterEach(async () => {
  await cleanupAll();
  cacheHome = undefined;
});

describe('migrate-vm', () => {
  test('bad input: exit 2, one clear line, no stack trace', async () => {
    const dir = await makeTempDir();
    const bad = join(dir, 'bad.json');
    await writeFile(bad, JSON.stringify({ name: 'x', memoryMiB: 0, disks: [], boot: { disk: 'a' }, runDir: dir }));
    const cases: [string[], RegExp][] = [
      [['--spec', join(dir, 'missing.json'), '--to-dir', dir], /--spec: cannot read .*missing\.json/],
      [['--spec', bad, '--to-dir', dir], /invalid VM spec: memoryMiB/],
      [['--spec', bad, '--to-dir', dir, '--bandwidth', 'lots'], /--bandwidth: 'lots' is not a size/],
    ];
    for (const [args, message] of cases) {
      const r = await cli(args);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(message);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    }
  });

  test('refusals against a running guest, a dry run, then a real migration with --json', async () => {
    const { vm, spec, hostA, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'root', format: 'qcow2', size: 64 << 20 }],
      workload: { write: { rate: 50 }, tickMs: 50 },
    });
    const specPath = join(hostA, 'vm.json');
    await writeFile(specPath, JSON.stringify(spec));

    // The source socket does not exist.
    let r = await cli(['--spec', specPath, '--source-qmp', join(hostA, 'nope.sock'), '--to-dir', hostB]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/cannot reach the source VM's QMP.*nope\.sock/);
    // The destination is a file, not a folder.
    const file = join(hostA, 'file');
    await writeFile(file, '');
    r = await cli(['--spec', specPath, '--to-dir', file]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/not a directory/);
    expect(r.stderr).not.toMatch(/\n\s+at /);

    // Dry run: the plan, and nothing changed.
    r = await cli(['--spec', specPath, '--to-dir', hostB, '--dry-run']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/disk root: qcow2, 64\.0 MiB virtual/);
    expect(r.stdout).toMatch(/nothing was changed/);
    expect(await readdir(hostB)).toEqual([]);
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
    // The dry run probed the source's schema and the destination's binary, and remembered both
    // (a packaged QEMU), 0600 under a 0700 dir; the run below reads them instead of probing.
    const remembered = join(cacheHome!, 'ferry');
    expect((await stat(remembered)).mode & 0o777).toBe(0o700);
    const files = (await readdir(remembered)).sort();
    expect(files).toHaveLength(2);
    expect(files[0]).toMatch(/^qemu-build-[0-9a-f]{16}\.json$/);
    expect(files[1]).toMatch(/^qmp-schema-\d+\.\d+\.\d+-[0-9a-f]{16}\.json$/);
    for (const f of files) expect((await stat(join(remembered, f))).mode & 0o777).toBe(0o600);

    r = await cli(['--spec', specPath, '--to-dir', hostB, '--json']);
    expect(r.code, r.stderr).toBe(0);
    const events = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    const summary = events.at(-1)!;
    expect(summary).toMatchObject({ event: 'summary', ok: true });
    for (const k of ['totalMs', 'downtimeMs', 'diskBytes', 'ramBytes']) expect(typeof summary[k]).toBe('number');
    // Two local folders: TLS on the data path by default, with a throwaway CA made for the run.
    expect(summary.dataTls).toEqual({ encrypted: true, source: { identity: 'CN=ferry-source', hostname: '127.0.0.1' }, destination: { identity: 'CN=ferry-destination', hostname: '127.0.0.1' } });
    expect(events.filter((e) => e.event === 'phase').map((e) => e.phase)).toContain('switchover');
    await vm.exited;

    // The destination QEMU outlived the CLI; stop it by its pid file and verify the disk.
    const runDir = (await readdir(hostB)).find((f) => f.startsWith('run-'))!;
    const pid = Number((await exec('cat', [join(hostB, runDir, 'qemu.pid')])).stdout.trim());
    process.kill(pid, 0);
    process.kill(pid, 'SIGKILL');
    const acked = highestAcks(vm.serial.history()).get('root')!;
    const report = await verifyDisk(join(hostB, 'root.qcow2'), { format: 'qcow2', diskId: 'root', ackedSeq: acked });
    expect(report.ok).toBe(true);
  });

  test('a hostile run: each refusal is one line naming the flag, exit 2, nothing created', async () => {
    const { vm, spec, hostA, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'root', format: 'qcow2', size: 32 << 20 }],
      workload: { write: { rate: 20 }, tickMs: 50 },
    });
    // The same disk spelled another way is the same disk: the dry run passes.
    const specPath = join(hostA, 'vm.json');
    await writeFile(specPath, JSON.stringify({ ...spec, disks: [{ ...spec.disks[0]!, path: `${hostA}/../host-a/./root.qcow2` }] }));
    let r = await cli(['--spec', specPath, '--to-dir', hostB, '--dry-run']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/nothing was changed/);

    const oneLine = (out: { stderr: string }): string[] => out.stderr.trim().split('\n');
    const cases: [string[], RegExp][] = [
      [['--migration-host', '::::', '--dry-run'], /--migration-host: '::::' is not an IP address/],
      [['--migration-host', 'dead', '--dry-run'], /--migration-host: 'dead' is not an IP address/],
      [['--migration-host', '999.999.999.999'], /--migration-host: '999.999.999.999' is not an IP address/],
      [['--bandwidth', '9999999T'], /--bandwidth: '9999999T' is too large/],
    ];
    for (const [flags, message] of cases) {
      r = await cli(['--spec', specPath, '--to-dir', hostB, ...flags]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(message);
      expect(r.stderr).not.toMatch(/bandwidthBytesPerSec/);
      expect(await readdir(hostB)).toEqual([]);
    }

    // A preflight refusal with stderr not a TTY (a pipe here): one line, no rollback story.
    await writeFile(specPath, JSON.stringify({ ...spec, memoryMiB: spec.memoryMiB * 2 }));
    for (const extra of [[], ['--dry-run']]) {
      r = await cli(['--spec', specPath, '--to-dir', hostB, ...extra]);
      expect(r.code, r.stderr).toBe(2);
      expect(oneLine(r), r.stderr).toHaveLength(1);
      expect(r.stderr).toMatch(/^migrate-vm: .*spec does not match the running source: it has \d+ MiB of RAM/);
      expect(r.stderr).not.toMatch(/rolling back|rolled back|\{/);
      expect(await readdir(hostB)).toEqual([]);
    }
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
  });

  test('SIGINT during the mirror: exit 130, rolled back, the guest still runs and writes on the source', async () => {
    const { vm, spec, hostA, hostB } = await bootWorkloadGuest({
      disks: [{ id: 'root', format: 'qcow2', size: 256 << 20, fillMiB: 100 }],
      workload: { write: { rate: 50 }, tickMs: 50 },
    });
    const specPath = join(hostA, 'vm.json');
    await writeFile(specPath, JSON.stringify(spec));
    cacheHome ??= await makeTempDir('ferry-test-cache-');
    const child = spawn(process.execPath, [BIN, '--spec', specPath, '--to-dir', hostB, '--json', '--bandwidth', '10M'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, XDG_CACHE_HOME: cacheHome } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b: Buffer) => {
      stdout += b.toString();
      if (stdout.includes('"phase":"mirror"') && child.exitCode === null && !child.killed) child.kill('SIGINT');
    });
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    expect(code, stderr).toBe(130);
    expect(stderr).toMatch(/SIGINT: cancelling, rolling back/);
    const summary = JSON.parse(stdout.trim().split('\n').at(-1)!) as Record<string, unknown>;
    expect(summary).toMatchObject({ event: 'summary', ok: false, code: 'CANCELLED', outcome: 'rolledBack', guestOn: 'source' });
    expect((await vm.qmp.execute('query-status')).status).toBe('running');
    expect(await readdir(hostB)).toEqual([]);
    const before = highestAcks(vm.serial.history()).get('root')!;
    await vm.serial.waitForLine((l) => l.text.startsWith('ack root ') && Number(l.text.split(' ')[2]) > before + 5, { timeoutMs: 20_000, what: 'acks after the cancel' });
  });
});
