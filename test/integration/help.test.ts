/** Every bin, as a real process: `--help` and `-h` print the usage on stdout and exit 0. */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, test } from 'vitest';
import { distIsFresh } from '../../bin/launch.mjs';

const exec = promisify(execFile);
const REPO = join(import.meta.dirname, '..', '..');
const BINS = ['migrate-vm', 'ferry-agent', 'ferry-scheduler', 'ferry'] as const;

async function run(bin: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await exec(process.execPath, [join(REPO, 'bin', `${bin}.mjs`), ...args], { timeout: 20_000, env: { ...process.env, ...env } });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: e.code ?? -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

// The bins run dist/ when it is fresh (after `npm run build` or the set-up), else the sources;
// FERRY_FROM_SOURCE=1 forces the sources, so both ways are tested whenever dist/ is there.
const ways = [
  [distIsFresh() ? 'from dist/' : 'from the sources (dist/ missing or stale)', {}],
  ['from the sources', { FERRY_FROM_SOURCE: '1' }],
] as const;

describe.each(ways)('%s', (_way, env) => {
  test.each(BINS.flatMap((bin) => ['--help', '-h'].map((flag) => [bin, flag] as const)))('%s %s: the usage on stdout, exit 0', async (bin, flag) => {
    const r = await run(bin, [flag], env);
    expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: '' });
    expect(r.stdout).toMatch(new RegExp(`^usage: ${bin} `));
  });
});
