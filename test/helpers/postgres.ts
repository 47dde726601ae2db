/**
 * A throwaway PostgreSQL cluster for a test: Debian's postgresql binaries, a cluster made with
 * initdb in a temp dir, run as `nobody` (PostgreSQL refuses root), listening only on a unix
 * socket in that dir (no TCP at all, so trust auth reaches no one else). `stop` removes it all.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chown, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);
export const PG_BIN = '/usr/lib/postgresql/15/bin';
const NOBODY = { uid: 65534, gid: 65534 };

export function postgresAvailable(): boolean {
  return ['initdb', 'pg_ctl', 'postgres'].every((b) => existsSync(join(PG_BIN, b)));
}

export interface TestPostgres {
  url: string;
  /** pg_ctl restart -m fast: every connection is cut, the server is back once this resolves. */
  restart(opts?: { downMs?: number }): Promise<void>;
  stop(): Promise<void>;
}

/** fsync off by default: a test's cluster is thrown away; a benchmark asks for it on. */
export async function startPostgres(opts: { fsync?: boolean } = {}): Promise<TestPostgres> {
  // Under /tmp itself: the test run's own temp dir is root's (0700), which nobody cannot enter.
  const dir = await mkdtemp('/tmp/ferry-pg-');
  await chown(dir, NOBODY.uid, NOBODY.gid);
  const data = join(dir, 'data');
  const port = 20_000 + Math.floor(Math.random() * 20_000);
  const as = { ...NOBODY, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C', HOME: dir }, cwd: dir, timeout: 60_000 };
  const pgCtl = (...args: string[]): Promise<unknown> => run(join(PG_BIN, 'pg_ctl'), ['-D', data, '-l', join(dir, 'log'), ...args], as);
  const options = `-k ${dir} -p ${port} -c listen_addresses= -c fsync=${opts.fsync ? 'on' : 'off'} -c max_connections=100`;
  try {
    await run(join(PG_BIN, 'initdb'), ['-D', data, '-U', 'ferry', '--auth=trust', '-E', 'UTF8', '--no-sync'], as);
    await pgCtl('-o', options, '-w', '-t', '30', 'start');
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    url: `postgresql://ferry@localhost:${port}/postgres?host=${encodeURIComponent(dir)}`,
    restart: async (opts = {}) => {
      await pgCtl('-m', 'fast', '-w', '-t', '30', 'stop');
      if (opts.downMs) await new Promise((r) => setTimeout(r, opts.downMs));
      await pgCtl('-o', options, '-w', '-t', '30', 'start');
    },
    stop: async () => {
      await pgCtl('-m', 'immediate', '-w', '-t', '30', 'stop').catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    },
  };
}
