/**
 * One temp dir per test run: TMPDIR points at a fresh folder for the run, so the test files and
 * every agent, scheduler, QEMU and tool they start make their temp files in it, and at the end it
 * must be empty. Whatever is left is listed, removed, and fails the run: every test removes what
 * it made, also when it fails. Other runs on the machine (other checkouts, other users) have their
 * own folders, so this check sees this run's leftovers only.
 */
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export default function setup(): () => void {
  const previous = process.env.TMPDIR;
  // Short: QEMU's and the agents' unix socket paths live below it (at most 107 bytes).
  const dir = mkdtempSync(join(tmpdir(), 'ferry-run-'));
  process.env.TMPDIR = dir;
  // What migrate-vm remembers between runs (docs/migration.md) goes to a cache home of the run's
  // own, removed at the end: no test writes the user's ~/.cache.
  const previousCache = process.env.XDG_CACHE_HOME;
  const cacheHome = mkdtempSync(join(tmpdir(), 'ferry-cache-'));
  process.env.XDG_CACHE_HOME = cacheHome;
  return () => {
    if (previous === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = previous;
    if (previousCache === undefined) delete process.env.XDG_CACHE_HOME;
    else process.env.XDG_CACHE_HOME = previousCache;
    rmSync(cacheHome, { recursive: true, force: true });
    // tsx-<uid> is tsx's compile cache, made by bins run from the sources: no test's leftover.
    const left = readdirSync(dir).filter((name) => !/^tsx-\d+$/.test(name));
    rmSync(dir, { recursive: true, force: true });
    if (left.length > 0) {
      const message = `the tests left ${left.length} entries in the temp dir (removed now): ${left.sort().join(', ')}`;
      // vitest reports an error thrown here but still exits 0; the exit code is what CI reads.
      process.stderr.write(`\nFAIL: ${message}\n`);
      process.exitCode = 1;
    }
  };
}
