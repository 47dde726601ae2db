/**
 * The guest's disk records, defined once for TypeScript; images/guest/ferry-guest.c is the same
 * definition in C (a unit test checks the two agree byte for byte).
 *
 * 4096 bytes, little-endian, at byte offset slot(seq) * 4096:
 *   0 "FERRYREC" | 8 seq u64 | 16 offset u64 | 24 disk id (16 bytes, NUL padded) |
 *   40..4092 payload: xorshift64 stream seeded with seq ^ PAYLOAD_SEED | 4092 CRC-32 of 0..4092
 */
export const RECORD_SIZE = 4096;
export const MAGIC = Buffer.from('FERRYREC', 'latin1');
const STRIDE = 1000003;
const PAYLOAD_SEED = 0x9e3779b97f4a7c15n;
const MASK64 = (1n << 64n) - 1n;

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** CRC-32 as zlib computes it (IEEE 802.3, reflected). */
export function crc32(buf: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function gcd(a: number, b: number): number {
  while (b) [a, b] = [b, a % b];
  return a;
}

/** Record slots a disk of this size holds. */
export function slotCount(diskBytes: number): number {
  return Math.floor(diskBytes / RECORD_SIZE);
}

/**
 * Where record `seq` lives: a fixed permutation that scatters writes over the whole disk.
 * (seq mod n) * 1000003 < 2^32 * 2^20 stays exact in a double, so no BigInt is needed.
 */
export function slot(seq: number, nslots: number): number {
  const stride = gcd(STRIDE, nslots) === 1 ? STRIDE : 1;
  return ((seq % nslots) * stride) % nslots;
}

export function encodeRecord(seq: number, offset: number, diskId: string): Buffer {
  const buf = Buffer.alloc(RECORD_SIZE);
  MAGIC.copy(buf, 0);
  buf.writeBigUInt64LE(BigInt(seq), 8);
  buf.writeBigUInt64LE(BigInt(offset), 16);
  buf.write(diskId.slice(0, 16), 24, 'latin1');
  let x = BigInt(seq) ^ PAYLOAD_SEED;
  if (x === 0n) x = 1n;
  const word = Buffer.alloc(8);
  for (let i = 40; i < 4092; i += 8) {
    x ^= (x << 13n) & MASK64;
    x ^= x >> 7n;
    x ^= (x << 17n) & MASK64;
    word.writeBigUInt64LE(x);
    word.copy(buf, i, 0, Math.min(8, 4092 - i));
  }
  buf.writeUInt32LE(crc32(buf.subarray(0, 4092)), 4092);
  return buf;
}

export type RecordCheck = { ok: true } | { ok: false; reason: string };

/** Checks a record read from `offset` against what record `seq` of `diskId` must be. */
export function checkRecord(buf: Uint8Array, seq: number, offset: number, diskId: string): RecordCheck {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  if (b.length < RECORD_SIZE) return { ok: false, reason: 'short read' };
  if (!b.subarray(0, 8).equals(MAGIC)) {
    return { ok: false, reason: b.subarray(0, RECORD_SIZE).every((v) => v === 0) ? 'missing (zeros)' : 'bad magic' };
  }
  const crc = crc32(b.subarray(0, 4092));
  if (crc !== b.readUInt32LE(4092)) return { ok: false, reason: 'checksum mismatch' };
  const gotSeq = Number(b.readBigUInt64LE(8));
  if (gotSeq !== seq) return { ok: false, reason: `holds seq ${gotSeq}` };
  if (Number(b.readBigUInt64LE(16)) !== offset) return { ok: false, reason: 'offset field mismatch' };
  const id = b.subarray(24, 40).toString('latin1').replace(/\0+$/, '');
  if (id !== diskId.slice(0, 16)) return { ok: false, reason: `belongs to disk '${id}'` };
  return { ok: true };
}
