import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { loadAgentConfig } from '../../../src/agent/config.js';
import { TokenBucket } from '../../../src/agent/rate-limit.js';
import { tempDir } from '../../helpers/tmp.js';

describe('agent config: file, then environment, then flags', () => {
  test('each later source overrides the earlier one', async () => {
    const dir = await tempDir('ferry-cfg-');
    const file = join(dir, 'agent.json');
    await writeFile(file, JSON.stringify({ name: 'from-file', storageRoot: '/srv/file', listenPort: 1, tokens: { 'file-token-0123456789': 'cp' } }));
    const c = await loadAgentConfig(['--config', file, '--storage-root', '/srv/flag'], { FERRY_AGENT_NAME: 'from-env', FERRY_AGENT_STORAGE_ROOT: '/srv/env', FERRY_AGENT_LISTEN: '10.0.0.1:7000', FERRY_AGENT_TOKEN: 'env-token-0123456789' });
    expect(c).toMatchObject({ name: 'from-env', storageRoot: '/srv/flag', listenHost: '10.0.0.1', listenPort: 7000, stateDir: '/srv/flag/.ferry-agent' });
    expect(c.tokens).toEqual({ 'file-token-0123456789': 'cp', 'env-token-0123456789': 'operator' });
    expect(c.limits).toEqual({ requestsPerSecond: 50, burst: 100, sessionsPerPrincipal: 32 });
  });

  test.each([
    [['--storage-root', 'relative'], {}, /storageRoot: must be an absolute path/],
    [['--listen', 'nohost'], {}, /--listen: expected HOST:PORT, got 'nohost'/],
    [[], { FERRY_AGENT_LISTEN: 'x:99999', FERRY_AGENT_STORAGE_ROOT: '/s' }, /listenPort/],
    [['--bogus'], {}, /Unknown option '--bogus'/],
    [['--config', '/nonexistent/agent.json'], {}, /cannot read config \/nonexistent\/agent.json: ENOENT/],
    [['--storage-root', '/s'], { FERRY_AGENT_TOKEN: 'short' }, /tokens must be at least 16 characters/],
    [['--storage-root', '/s', '--migration-host', 'h18.example'], {}, /migrationHost: must be an IP address/],
  ])('refuses %j %j', async (argv, env, message) => {
    const err = await loadAgentConfig(argv, env).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(message);
    expect((err as Error).message).not.toContain('short'); // a token never shows in an error
  });

  test('a config file that is not a JSON object', async () => {
    const dir = await tempDir('ferry-cfg-');
    await writeFile(join(dir, 'a.json'), '[1,2]');
    await expect(loadAgentConfig(['--config', join(dir, 'a.json')], {})).rejects.toThrow(/is not valid: not a JSON object/);
    await writeFile(join(dir, 'b.json'), JSON.stringify({ storageRoot: '/s', tokens: {}, portRange: [30000, 20000] }));
    await expect(loadAgentConfig(['--config', join(dir, 'b.json')], {})).rejects.toThrow(/portRange: the first port must not be above the second/);
    await writeFile(join(dir, 'c.json'), JSON.stringify({ storageRoot: '/s', tokens: {}, migrationPeers: ['10.0.0.0/33'] }));
    await expect(loadAgentConfig(['--config', join(dir, 'c.json')], {})).rejects.toThrow(/migrationPeers.0: must be an IP address or a CIDR/);
    await writeFile(join(dir, 'd.json'), JSON.stringify({ storageRoot: '/s', tokens: {}, bootRoots: ['images'] }));
    await expect(loadAgentConfig(['--config', join(dir, 'd.json')], {})).rejects.toThrow(/bootRoots.0: must be an absolute path/);
  });
});

test('the token bucket allows a burst, then the sustained rate', () => {
  let now = 0;
  const b = new TokenBucket(2, 3, () => now);
  expect([b.take(), b.take(), b.take(), b.take()]).toEqual([true, true, true, false]);
  now += 500; // one token back at 2/s
  expect([b.take(), b.take()]).toEqual([true, false]);
  now += 10_000; // never more than the burst
  expect([b.take(), b.take(), b.take(), b.take()]).toEqual([true, true, true, false]);
});
