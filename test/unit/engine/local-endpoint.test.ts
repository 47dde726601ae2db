/** LocalSource.sourceGone: proof that the source QEMU exited, or false. */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { LocalSource } from '../../../src/engine/local-endpoint.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('LocalSource.sourceGone', () => {
  test('a socket that is not there (its QEMU exited) is proof', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-gone-'));
    dirs.push(dir);
    expect(await new LocalSource({ qmpSocket: join(dir, 'qmp.sock') }).sourceGone()).toBe(true);
  });

  test('a socket someone listens on but that does not answer is not: maybe frozen, not gone', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-gone-'));
    dirs.push(dir);
    const path = join(dir, 'qmp.sock');
    const server = createServer(() => undefined);
    await new Promise<void>((r) => server.listen(path, r));
    try {
      expect(await new LocalSource({ qmpSocket: path }).sourceGone()).toBe(false);
    } finally {
      server.close();
    }
  }, 10_000);
});
