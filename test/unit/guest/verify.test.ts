import { execFile } from 'node:child_process';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { RECORD_SIZE, encodeRecord, slot, slotCount } from '../../../src/guest/record.js';
import { verifyDisk, VerifyError } from '../../../src/guest/verify.js';

const run = promisify(execFile);
const SIZE = 4 << 20; // 1024 slots
let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-verify-'));
});
afterEach(async () => rm(dir, { recursive: true, force: true }));

/** A raw image holding records 0..last of `disk`, as the guest would have written them. */
async function rawImage(last: number, disk = 'd0'): Promise<string> {
  const path = join(dir, 'disk.raw');
  await writeFile(path, Buffer.alloc(0));
  await run('truncate', ['-s', String(SIZE), path]);
  const fh = await open(path, 'r+');
  const n = slotCount(SIZE);
  for (let seq = 0; seq <= last; seq++) {
    const off = slot(seq, n) * RECORD_SIZE;
    await fh.write(encodeRecord(seq, off, disk), 0, RECORD_SIZE, off);
  }
  await fh.close();
  return path;
}

async function patch(path: string, offset: number, bytes: Buffer): Promise<void> {
  const fh = await open(path, 'r+');
  await fh.write(bytes, 0, bytes.length, offset);
  await fh.close();
}

describe('verifyDisk', () => {
  test('every acknowledged record present: ok, with the unacknowledged tail counted', async () => {
    const path = await rawImage(300);
    const r = await verifyDisk(path, { format: 'raw', diskId: 'd0', ackedSeq: 250 });
    expect(r).toMatchObject({ ok: true, highestContiguous: 250, missingCount: 0, corruptCount: 0, beyondAck: 50 });
  });

  test('a flipped byte in an acknowledged record is reported as corrupt, with its seq', async () => {
    const path = await rawImage(100);
    const off = slot(37, slotCount(SIZE)) * RECORD_SIZE;
    await patch(path, off + 2000, Buffer.from([0xde, 0xad]));
    const r = await verifyDisk(path, { format: 'raw', diskId: 'd0', ackedSeq: 100 });
    expect(r.ok).toBe(false);
    expect(r.highestContiguous).toBe(36);
    expect(r.corrupt).toEqual([{ seq: 37, reason: 'checksum mismatch' }]);
  });

  test('a lost write is a hole', async () => {
    const path = await rawImage(100);
    await patch(path, slot(60, slotCount(SIZE)) * RECORD_SIZE, Buffer.alloc(RECORD_SIZE));
    const r = await verifyDisk(path, { format: 'raw', diskId: 'd0', ackedSeq: 100 });
    expect(r).toMatchObject({ ok: false, highestContiguous: 59, missing: [60], missingCount: 1 });
  });

  test('records of another disk do not count', async () => {
    const path = await rawImage(10, 'other');
    const r = await verifyDisk(path, { format: 'raw', diskId: 'd0', ackedSeq: 10 });
    expect(r.ok).toBe(false);
    expect(r.corrupt[0]).toEqual({ seq: 0, reason: "belongs to disk 'other'" });
  });

  test('qcow2 (v3 and v2) reads the same as raw, including a damaged record', async () => {
    const raw = await rawImage(200);
    await patch(raw, slot(150, slotCount(SIZE)) * RECORD_SIZE + 10, Buffer.from([1]));
    const expected = await verifyDisk(raw, { format: 'raw', diskId: 'd0', ackedSeq: 200 });
    for (const compat of ['1.1', '0.10']) {
      const q = join(dir, `disk-${compat}.qcow2`);
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', `compat=${compat},cluster_size=65536`, raw, q]);
      expect(await verifyDisk(q, { format: 'qcow2', diskId: 'd0', ackedSeq: 200 })).toEqual(expected);
    }
    expect(expected.corrupt).toEqual([{ seq: 150, reason: 'checksum mismatch' }]);
  });

  test('qcow2 zero clusters read as zeros: the record is missing', async () => {
    const raw = await rawImage(20);
    const q = join(dir, 'z.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, q]);
    const off = slot(5, slotCount(SIZE)) * RECORD_SIZE;
    await run('qemu-io', ['-f', 'qcow2', '-c', `write -z ${off - (off % 65536)} 64k`, q]);
    const r = await verifyDisk(q, { format: 'qcow2', diskId: 'd0', ackedSeq: 20 });
    expect(r.missing).toContain(5);
  });

  test('refuses what it cannot read faithfully', async () => {
    const raw = await rawImage(5);
    const compressed = join(dir, 'c.qcow2');
    await run('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, compressed]);
    await expect(verifyDisk(compressed, { format: 'qcow2', diskId: 'd0', ackedSeq: 5 })).rejects.toThrow(/compressed clusters are not supported/);
    const overlay = join(dir, 'o.qcow2');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', compressed, '-F', 'qcow2', overlay]);
    await expect(verifyDisk(overlay, { format: 'qcow2', diskId: 'd0', ackedSeq: 5 })).rejects.toThrow(/backing file/);
    await expect(verifyDisk(raw, { format: 'qcow2', diskId: 'd0', ackedSeq: 5 })).rejects.toThrow(/not a qcow2 image/);
    await expect(verifyDisk(join(dir, 'nope'), { format: 'raw', diskId: 'd0', ackedSeq: 5 })).rejects.toBeInstanceOf(VerifyError);
  });
});
