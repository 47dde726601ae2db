import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { checkRecord, crc32, encodeRecord, slot } from '../../../src/guest/record.js';

const run = promisify(execFile);

describe('record format', () => {
  test('CRC-32 matches zlib on known vectors', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(crc32(Buffer.alloc(0))).toBe(0);
    expect(crc32(Buffer.from('The quick brown fox jumps over the lazy dog'))).toBe(0x414fa339);
  });

  test.each([16384, 16383, 1000003 * 2, 7, 1])('slot() is a permutation of %i slots', (n) => {
    const count = Math.min(n, 20000);
    const seen = new Set<number>();
    for (let s = 0; s < count; s++) seen.add(slot(s, n));
    expect(seen.size).toBe(count);
    for (const v of seen) expect(v).toBeLessThan(n);
  });

  test('a record checks out, and each kind of damage is named', () => {
    const rec = encodeRecord(42, 8192, 'data');
    expect(checkRecord(rec, 42, 8192, 'data')).toEqual({ ok: true });
    expect(checkRecord(rec, 43, 8192, 'data')).toEqual({ ok: false, reason: 'holds seq 42' });
    expect(checkRecord(rec, 42, 4096, 'data')).toEqual({ ok: false, reason: 'offset field mismatch' });
    expect(checkRecord(rec, 42, 8192, 'logs')).toEqual({ ok: false, reason: "belongs to disk 'data'" });
    expect(checkRecord(Buffer.alloc(4096), 42, 8192, 'data')).toEqual({ ok: false, reason: 'missing (zeros)' });
    const flipped = Buffer.from(rec);
    flipped[1000] = flipped[1000]! ^ 0xff;
    expect(checkRecord(flipped, 42, 8192, 'data')).toEqual({ ok: false, reason: 'checksum mismatch' });
  });

  describe('the C workload writes the same bytes', () => {
    let dir: string;
    let bin: string;
    beforeAll(async () => {
      dir = await mkdtemp(join(tmpdir(), 'ferry-guest-c-'));
      bin = join(dir, 'ferry-guest');
      await run('gcc', ['-O2', '-o', bin, join(import.meta.dirname, '..', '..', '..', 'images', 'guest', 'ferry-guest.c')]);
    });
    afterAll(async () => rm(dir, { recursive: true, force: true }));

    test.each([
      [0, 0, 'vda'],
      [12345, 4096 * 777, 'data'],
      [2 ** 33 + 5, 4096 * 3, 'sixteen-chars-id'],
    ])('seq %i offset %i disk %s', async (seq, offset, disk) => {
      const { stdout } = await run(bin, ['--record', String(seq), String(offset), disk], { encoding: 'buffer' });
      expect(Buffer.compare(stdout, encodeRecord(seq, offset, disk))).toBe(0);
    });
  });
});
