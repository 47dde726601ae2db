/**
 * The total timeout (--timeout) fires however long the migration waits. On Node 20 a timeout
 * signal that only AbortSignal.any() refers to is garbage-collected with its timer, and then it
 * never fires: the fault matrix's mirror/slow-link ran minutes past `--timeout 20`.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { expect, test } from 'vitest';
import { MigrationContext } from '../../../src/engine/context.js';
import { MigrationOptionsSchema } from '../../../src/engine/types.js';
import { parseVmSpec } from '../../../src/qemu/spec.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

const spec = parseVmSpec({ name: 'vm', memoryMiB: 64, disks: [{ id: 'root', path: '/x/root.qcow2', format: 'qcow2' }], boot: { kernel: '/k' }, runDir: '/x/run' });

test.each([false, true])('the total timeout aborts the migration signal with collections going on (caller signal: %s)', async (withCaller) => {
  const caller = new AbortController();
  const ctx = new MigrationContext({ spec, source: {} as never, destination: {} as never, ...(withCaller ? { signal: caller.signal } : {}) }, MigrationOptionsSchema.parse({ totalTimeoutMs: 300 }));
  const collecting = setInterval(gc, 20);
  try {
    const aborted = await new Promise<boolean>((resolve) => {
      ctx.signal.addEventListener('abort', () => resolve(true), { once: true });
      setTimeout(() => resolve(ctx.signal.aborted), 2_000);
    });
    expect(aborted).toBe(true);
  } finally {
    clearInterval(collecting);
  }
});
