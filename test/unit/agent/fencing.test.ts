/** The agent's fencing epochs: raised by a later claim, stale sessions refused and counted, persisted. */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import { Fences } from '../../../src/agent/fencing.js';
import { silentLogger } from '../../../src/log.js';
import { tempDir } from '../../helpers/tmp.js';

test('a later epoch raises the fence; the older session may no longer mutate; refusals are counted and survive a restart', async () => {
  const dir = await tempDir('ferry-fence-');
  const f = new Fences(dir, silentLogger);
  const old = f.present('scheduler', 'vm1', 5);
  expect(old.raised).toBe(true);
  expect(f.staleReason(old.fence, 'dest.kill')).toBeUndefined();
  const now = f.present('scheduler', 'vm1', 9);
  expect(now.raised).toBe(true);
  expect(f.present('scheduler', 'vm1', 7).raised).toBe(false); // never lowered
  expect(() => f.check(old.fence, 'dest.kill')).toThrow(expect.objectContaining({ code: 'STALE_EPOCH', message: expect.stringMatching(/epoch 5 for VM 'vm1', but this agent has seen epoch 9/) }));
  expect(f.staleReason(now.fence, 'QMP cont')).toBeUndefined();
  // Another VM, another principal: their own epochs.
  expect(f.staleReason(f.present('scheduler', 'vm2', 1).fence, 'x')).toBeUndefined();
  expect(f.staleReason(f.present('other', 'vm1', 1).fence, 'x')).toBeUndefined();
  expect(f.staleReason(undefined, 'migrate-vm has no fence')).toBeUndefined();
  expect(f.status()).toEqual({ staleRefused: 1, epochs: { 'scheduler/vm1': 9, 'scheduler/vm2': 1, 'other/vm1': 1 } });
  const again = new Fences(dir, silentLogger);
  expect(again.status()).toEqual(f.status());
  expect(again.isStale(old.fence)).toBe(true);
});

test('an unreadable fencing file is set aside, not trusted and not deleted', async () => {
  const dir = await tempDir('ferry-fence-');
  await writeFile(join(dir, 'fencing.json'), '{"epochs": {"a/b": -1}}');
  const f = new Fences(dir, silentLogger);
  expect(f.status()).toEqual({ staleRefused: 0, epochs: {} });
  expect(await readFile(join(dir, 'fencing.json.bad'), 'utf8')).toContain('a/b');
});
