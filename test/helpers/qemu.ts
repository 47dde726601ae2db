/**
 * Which QEMUs a test can use. The system's (7.2 on Debian 12) is always there; QEMU 10.0 is there
 * when the bootstrap unpacked it (`node scripts/bootstrap.mjs --qemu10`, run by `npm test`).
 * The 10.0 test leg (.ci/run) sets FERRY_QEMU to it, so every launch without an explicit binary
 * uses it.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';

const root = join(import.meta.dirname, '..', '..');

/** The bootstrap's wrapper for QEMU 10.0 (scripts/qemu10.mjs), or undefined when not unpacked. */
export const qemu10Binary: string | undefined = ((): string | undefined => {
  const p = join(root, '.cache', 'qemu-10.0', 'bin', 'qemu-system-x86_64');
  return existsSync(p) ? p : undefined;
})();

export const QEMU10_MISSING = 'QEMU 10.0 is not unpacked here (node scripts/bootstrap.mjs --qemu10)';

/** The system's QEMU, whatever FERRY_QEMU says: a mixed pair needs both. */
export const systemQemuBinary = 'qemu-system-x86_64';
