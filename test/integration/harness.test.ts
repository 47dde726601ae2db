/** The guest harness itself, on real QEMU: boot, workload, verification, and pause measurement. */
import { open } from 'node:fs/promises';
import { afterEach, expect, test } from 'vitest';
import { RECORD_SIZE, slot, slotCount } from '../../src/guest/record.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { tickerGap } from '../../src/measure/ticker.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';

afterEach(cleanupAll);

test('boot, two disks acknowledged, stop, verify; a flipped byte is caught', async () => {
  const { vm, spec } = await bootWorkloadGuest({
    disks: [
      { id: 'sys', format: 'qcow2', size: 32 << 20 },
      { id: 'raw1', format: 'raw', size: 16 << 20 },
    ],
    workload: { write: { rate: 0 }, tickMs: 50 },
  });
  await vm.serial.waitForLine((l) => /^ack raw1 (\d{3,})$/.test(l.text), { timeoutMs: 30_000, what: '100+ acks on raw1' });
  await vm.quit({ timeoutMs: 10_000 });
  expect(vm.running()).toBe(false);
  const acks = highestAcks(vm.serial.history());
  for (const d of spec.disks) {
    const r = await verifyDisk(d.path, { format: d.format, diskId: d.id, ackedSeq: acks.get(d.id)! });
    expect(r, d.id).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  }
  // Damage one acknowledged record in the raw image: the verifier must say which.
  const raw = spec.disks[1]!;
  const victim = Math.floor(acks.get('raw1')! / 2);
  const fh = await open(raw.path, 'r+');
  await fh.write(Buffer.from([0x00, 0xff, 0x00]), 0, 3, slot(victim, slotCount(16 << 20)) * RECORD_SIZE + 100);
  await fh.close();
  const r = await verifyDisk(raw.path, { format: 'raw', diskId: 'raw1', ackedSeq: acks.get('raw1')! });
  expect(r.ok).toBe(false);
  expect(r.corrupt).toEqual([{ seq: victim, reason: 'checksum mismatch' }]);
});

test('a stop/cont pause is measured by the ticker gap within one tick', async () => {
  const TICK = 20;
  const { vm } = await bootWorkloadGuest({ disks: [{ id: 'd0', format: 'raw', size: 4 << 20 }], workload: { tickMs: TICK } });
  await new Promise((r) => setTimeout(r, 500));
  const t0 = performance.now();
  await vm.qmp.execute('stop');
  const stopped = performance.now();
  await new Promise((r) => setTimeout(r, 1_500));
  const resumed = performance.now();
  await vm.qmp.execute('cont');
  await new Promise((r) => setTimeout(r, 500));
  const gap = tickerGap(vm.serial.history(), { from: t0 - 200 });
  // The real pause lies between the stop's reply and the cont's call; under TCG the first tick
  // after cont may take one more interval plus a little scheduling slack.
  const pause = resumed - stopped;
  expect(gap.maxGapMs).toBeGreaterThanOrEqual(pause - TICK);
  expect(gap.maxGapMs).toBeLessThanOrEqual(pause + TICK + 60);
});
