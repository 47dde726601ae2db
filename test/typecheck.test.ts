/**
 * The typecheck as a test of the suite, so `npm test` fails, and counts a failure, on a type
 * error anywhere in src/, test/, bench/ or scripts/, the type-level tests included (the
 * `@ts-expect-error` lines of test/unit/qmp/types.test.ts fail only under tsc). A test rather
 * than a step before vitest: every other test still runs and reports when the types are wrong.
 */
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';

const exec = promisify(execFile);
const REPO = join(import.meta.dirname, '..');

test('tsc -p tsconfig.json --noEmit finds no type error', { timeout: 300_000 }, async () => {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  const r = await exec(process.execPath, [tsc, '-p', join(REPO, 'tsconfig.json'), '--noEmit', '--pretty', 'false'], { cwd: REPO, timeout: 280_000, maxBuffer: 16 << 20 }).then(
    (ok) => ({ code: 0, output: ok.stdout + ok.stderr }),
    (err: { code?: number | string; killed?: boolean; stdout?: string; stderr?: string }) => ({ code: err.killed ? 'timed out after 280 s' : err.code, output: `${err.stdout ?? ''}${err.stderr ?? ''}` }),
  );
  expect(r, r.output).toEqual({ code: 0, output: '' });
});
