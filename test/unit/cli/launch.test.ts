/** bin/launch.mjs: the bins run dist/ only when it was built from the sources as they are now. */
import { mkdir, rm, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { distIsFresh, stampPath } from '../../../bin/launch.mjs';
import { tempDir } from '../../helpers/tmp.js';

/** A checkout with sources and tsconfigs last changed at `t0` (ms) and a build stamp of `built`. */
async function checkout(t0: number, built: number | string | undefined): Promise<string> {
  const root = await tempDir('ferry-launch-');
  await mkdir(join(root, 'src', 'sub'), { recursive: true });
  await mkdir(join(root, 'dist'));
  const files = ['src/a.ts', 'src/sub/b.ts', 'tsconfig.json', 'tsconfig.build.json'];
  for (const f of files) await writeFile(join(root, f), '');
  for (const p of [...files, 'src/sub', 'src']) await utimes(join(root, p), t0 / 1000, t0 / 1000);
  if (built !== undefined) await writeFile(stampPath(root), String(built));
  return root;
}

describe('distIsFresh', () => {
  const t0 = (Math.floor(Date.now() / 1000) - 60) * 1000; // whole seconds: utimes is exact then

  test('a build that started after the last change is fresh', async () => {
    expect(distIsFresh(await checkout(t0, t0 + 1_000))).toBe(true);
  });

  test.each([
    ['no stamp: never built, or a build failed or is under way', undefined],
    ['a stamp that is not a time', 'garbage'],
    ['a build that started in the same millisecond as the last change', t0],
  ])('%s: stale', async (_what, built) => {
    expect(distIsFresh(await checkout(t0, built))).toBe(false);
  });

  test.each([
    ['an edited source, deep down', async (root: string) => utimes(join(root, 'src/sub/b.ts'), new Date(), new Date())],
    ['a new source', async (root: string) => writeFile(join(root, 'src/sub/c.ts'), '')],
    ['a deleted source', async (root: string) => rm(join(root, 'src/a.ts'))],
    ['an edited tsconfig', async (root: string) => writeFile(join(root, 'tsconfig.build.json'), '{}')],
  ])('%s after the build: stale', async (_what, change) => {
    const root = await checkout(t0, t0 + 1_000);
    expect(distIsFresh(root)).toBe(true);
    await change(root);
    expect(distIsFresh(root)).toBe(false);
  });
});
