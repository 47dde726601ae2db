import { describe, expect, test } from 'vitest';
import { parseCli, parseSize, UsageError } from '../../../src/cli/args.js';
import { renderMirrorConvergence, renderProgress } from '../../../src/cli/progress.js';
import { MigrationOptionsSchema, type ProgressSnapshot } from '../../../src/engine/types.js';

const base = ['--spec', 'vm.json', '--to-dir', '/b'];

describe('parseCli', () => {
  test('a full command line', () => {
    const p = parseCli([...base, '--bandwidth', '500M', '--downtime-limit', '200', '--copy-mode', 'write-blocking', '--on-deadline', 'force', '--no-auto-converge', '--timeout', '60', '--json', '--port-range', '30000-30100']);
    expect(p).toEqual({
      kind: 'run',
      args: expect.objectContaining({
        source: { kind: 'local', specPath: 'vm.json', sourceQmp: undefined },
        destination: { kind: 'dir', toDir: '/b', migrationHost: '127.0.0.1', portRange: [30000, 30100] },
        json: true,
        options: { bandwidthBytesPerSec: 500 * 2 ** 20, downtimeLimitMs: 200, copyMode: 'write-blocking', onDeadline: 'force', autoConverge: false, totalTimeoutMs: 60_000 },
      }),
    });
  });

  test('--copy-mode auto is accepted, and the engine defaults to it', () => {
    expect(parseCli([...base, '--copy-mode', 'auto'])).toMatchObject({ args: { options: { copyMode: 'auto' } } });
    expect(MigrationOptionsSchema.parse({}).copyMode).toBe('auto');
  });

  test("the summary's mirrors line names the path and its times", () => {
    expect(renderMirrorConvergence({ path: 'auto:background+relay', relay: true, nbdPort: 20001, readyMs: 350 })).toMatch(/^auto:background\+relay, READY after 350 ms$/);
    expect(renderMirrorConvergence({ path: 'auto:active-sync', relay: false, nbdPort: 20001, readyMs: 190, switchedAtMs: 192, syncedAtMs: 300 })).toMatch(/^auto:active-sync, READY after .+, write-blocking at .+, actively-synced at .+$/);
  });

  test('agents over mutual TLS', () => {
    expect(parseCli(['--from', 'wss://a:7420', '--to', 'wss://b:7420', 'web1', '--tls-cert', 'c.pem', '--tls-key', 'k.pem', '--tls-ca', 'ca.pem'])).toMatchObject({
      args: { source: { url: 'wss://a:7420' }, destination: { url: 'wss://b:7420' }, tls: { cert: 'c.pem', key: 'k.pem', ca: 'ca.pem' } },
    });
  });

  test('agent to agent, and a local source into an agent', () => {
    expect(parseCli(['--from', 'ws://10.0.0.1:7420', '--to', 'ws://10.0.0.2:7420/', 'web1', '--keep-source-disks'])).toMatchObject({
      kind: 'run',
      args: { source: { kind: 'agent', url: 'ws://10.0.0.1:7420', vm: 'web1', keepDisks: true }, destination: { kind: 'agent', url: 'ws://10.0.0.2:7420' }, tokenFile: undefined },
    });
    expect(parseCli(['--spec', 'vm.json', '--to', 'ws://[::1]:7420', '--token-file', '/t'])).toMatchObject({
      kind: 'run',
      args: { source: { kind: 'local', specPath: 'vm.json' }, destination: { kind: 'agent', url: 'ws://[::1]:7420' }, tokenFile: '/t' },
    });
  });

  test('lazy mode and its knobs', () => {
    expect(parseCli([...base, '--mode', 'lazy', '--hydration-rate', '50M', '--nbd-reconnect', '5'])).toMatchObject({
      args: { options: { mode: 'lazy', hydrationBytesPerSec: 50 * 2 ** 20, nbdReconnectDelayS: 5 } },
    });
    expect(() => parseCli([...base, '--mode', 'fast'])).toThrow(/--mode: 'fast' is not one of precopy, lazy/);
    expect(() => parseCli([...base, '--hydration-rate', '5M'])).toThrow(/--hydration-rate goes with --mode lazy/);
    expect(() => parseCli([...base, '--mode', 'lazy', '--nbd-reconnect', '999'])).toThrow(/--nbd-reconnect: 999 is out of range/);
  });

  const agents = ['--from', 'ws://a:7420', '--to', 'ws://b:7420'];
  test.each([
    [[...agents], /--from needs exactly one VM name after the flags, got none/],
    [[...agents, 'a', 'b'], /got a b/],
    [['--from', 'ws://a:7420', 'web1'], /--from needs --to ws:\/\/HOST/],
    [[...agents, '--spec', 'x.json', 'web1'], /--from and --spec exclude each other/],
    [[...agents, 'web1', '--port-range', '1-2'], /--port-range goes with --to-dir/],
    [[...agents, 'web1', '--to-dir', '/b'], /--to and --to-dir exclude each other/],
    [['--from', 'wss://a:7420', '--to', 'ws://b', 'web1'], /'wss:\/\/a:7420' is TLS: give --tls-cert, --tls-key and --tls-ca/],
    [[...agents, 'web1', '--tls-cert', 'c.pem'], /mutual TLS needs all of --tls-cert, --tls-key and --tls-ca \(got only --tls-cert\)/],
    [[...base, '--tls-cert', 'c', '--tls-key', 'k', '--tls-ca', 'a'], /--tls-\* go with --from\/--to/],
    [['--from', 'http://a:7420', '--to', 'ws://b', 'web1'], /is not an agent URL/],
    [['--from', 'ws://a:7420/v1', '--to', 'ws://b', 'web1'], /is not an agent URL/],
    [[...base, 'web1'], /unexpected argument 'web1'/],
    [[...base, '--token-file', '/t'], /--token-file goes with --from\/--to/],
    [[...base, '--keep-source-disks'], /--keep-source-disks goes with --from/],
  ])('refuses %j', (argv, message) => {
    expect(() => parseCli(argv)).toThrow(UsageError);
    expect(() => parseCli(argv)).toThrow(message);
  });

  test.each([
    [['--to-dir', '/b'], /--spec is required/],
    [['--spec', 'x'], /--to-dir is required/],
    [[...base, '--bandwidth', 'fast'], /--bandwidth: 'fast' is not a size/],
    [[...base, '--bandwidth', '0'], /--bandwidth: must be more than 0/],
    [[...base, '--bandwidth', '-5M'], /--bandwidth/],
    [[...base, '--downtime-limit', '0'], /--downtime-limit: 0 is out of range/],
    [[...base, '--downtime-limit', '1.5'], /--downtime-limit: '1.5' is not a whole number/],
    [[...base, '--copy-mode', 'fast'], /--copy-mode: 'fast' is not one of/],
    [[...base, '--on-deadline', 'panic'], /--on-deadline/],
    [[...base, '--port-range', '9-1'], /--port-range/],
    [[...base, '--downtime-limit', '500', '--max-downtime', '100'], /--max-downtime must not be below/],
    [[...base, '--frobnicate'], /Unknown option '--frobnicate'/],
    [[...base, '--spec'], /--spec/],
    // A hostile run (issue 15, defect 16): each refused here, by the flag the user typed.
    [[...base, '--migration-host', '::::'], /--migration-host: '::::' is not an IP address/],
    [[...base, '--migration-host', 'dead'], /--migration-host: 'dead' is not an IP address/],
    [[...base, '--migration-host', '999.999.999.999'], /--migration-host: '999.999.999.999' is not an IP address/],
    [[...base, '--migration-host', '10.0.0.1 '], /--migration-host/],
    [[...base, '--bandwidth', '99999999999999999999'], /--bandwidth: '99999999999999999999' is too large/],
    [[...base, '--bandwidth', '9999999T'], /--bandwidth: '9999999T' is too large/],
    [[...base, '--mode', 'lazy', '--hydration-rate', '1e30'], /--hydration-rate/],
  ])('refuses %j', (argv, message) => {
    expect(() => parseCli(argv)).toThrow(UsageError);
    expect(() => parseCli(argv)).toThrow(message);
  });

  test('--migration-host takes an IPv4 or IPv6 address', () => {
    for (const host of ['10.0.0.17', '::1', 'fd00::17']) {
      expect(parseCli([...base, '--migration-host', host])).toMatchObject({ args: { destination: { migrationHost: host } } });
    }
  });

  test('help and version', () => {
    expect(parseCli(['--help'])).toEqual({ kind: 'help' });
    expect(parseCli(['--version'])).toEqual({ kind: 'version' });
  });

  test('sizes are binary', () => {
    expect(parseSize('x', '1G')).toBe(2 ** 30);
    expect(parseSize('x', '10MiB')).toBe(10 * 2 ** 20);
    expect(parseSize('x', '1048576')).toBe(2 ** 20);
    expect(parseSize('x', '8191T')).toBe(8191 * 2 ** 40);
    expect(() => parseSize('--bandwidth', '8192T')).toThrow(/--bandwidth: '8192T' is too large \(at most 8191T\)/);
  });
});

test('the progress line shows phase, bytes, rate and ETA', () => {
  const p: ProgressSnapshot = {
    phase: 'ram',
    elapsedMs: 1500,
    disks: [],
    diskCopiedBytes: 200 * 2 ** 20,
    diskTotalBytes: 200 * 2 ** 20,
    ram: { status: 'active', transferredBytes: 64 * 2 ** 20, remainingBytes: 64 * 2 ** 20, totalBytes: 256 * 2 ** 20, mbps: 800, dirtyPagesRate: 0, dirtySyncCount: 1, expectedDowntimeMs: undefined },
    rateBytesPerSec: 100 * 2 ** 20,
    etaMs: 640,
    downtimeLimitMs: 300,
  };
  const line = renderProgress(p, 10);
  // 200 MiB disk + 64 MiB RAM done of 328 MiB: 80%
  expect(line).toMatch(/^ram\s+\[########\.\.\]/);
  expect(line).toContain('disk 200.0 MiB/200.0 MiB');
  expect(line).toContain('ram 64.0 MiB (64.0 MiB left)');
  expect(line).toContain('100.0 MiB/s');
  expect(line).toContain('eta 640 ms');
});
