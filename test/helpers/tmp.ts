/**
 * Temp folders for tests that need no QEMU: removed when the test ends, passed or failed
 * (onTestFinished), so nothing is left in the temp dir. Tests that boot guests use makeTempDir
 * in ./guest.ts, whose cleanupAll also reaps the QEMUs.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { onTestFinished } from 'vitest';

export async function tempDir(prefix = 'ferry-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  onTestFinished(() => rm(dir, { recursive: true, force: true }));
  return dir;
}
