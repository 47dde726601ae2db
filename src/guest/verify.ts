import { open, type FileHandle } from 'node:fs/promises';
import { FerryError } from '../errors.js';
import { RECORD_SIZE, checkRecord, slot, slotCount } from './record.js';

export class VerifyError extends FerryError {
  override name = 'VerifyError';
}

export interface VerifyReport {
  diskId: string;
  ackedSeq: number;
  /** Highest n such that every record 0..n is present and intact (-1: not even record 0). */
  highestContiguous: number;
  missing: number[];
  missingCount: number;
  corrupt: { seq: number; reason: string }[];
  corruptCount: number;
  /** Valid records past the last ack (written, not yet acknowledged when the log ended). */
  beyondAck: number;
  ok: boolean;
}

const LIST_CAP = 20;

/** Reads guest bytes at a virtual offset of a disk image. */
interface ImageReader {
  size: number;
  read(offset: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}

/**
 * Checks that every record 0..ackedSeq the guest acknowledged on `diskId` is in the image, intact.
 * Reads only the slots it needs, so a few thousand records take milliseconds on any disk size.
 */
export async function verifyDisk(
  path: string,
  opts: { format: 'raw' | 'qcow2'; diskId: string; ackedSeq: number },
): Promise<VerifyReport> {
  const img = opts.format === 'qcow2' ? await openQcow2(path) : await openRaw(path);
  try {
    const nslots = slotCount(img.size);
    const report: VerifyReport = {
      diskId: opts.diskId,
      ackedSeq: opts.ackedSeq,
      highestContiguous: -1,
      missing: [],
      missingCount: 0,
      corrupt: [],
      corruptCount: 0,
      beyondAck: 0,
      ok: true,
    };
    let contiguous = true;
    const lastSeq = Math.min(nslots - 1, opts.ackedSeq);
    for (let seq = 0; seq <= lastSeq; seq++) {
      const offset = slot(seq, nslots) * RECORD_SIZE;
      const check = checkRecord(await img.read(offset, RECORD_SIZE), seq, offset, opts.diskId);
      if (check.ok) {
        if (contiguous) report.highestContiguous = seq;
        continue;
      }
      contiguous = false;
      if (check.reason === 'missing (zeros)') {
        report.missingCount++;
        if (report.missing.length < LIST_CAP) report.missing.push(seq);
      } else {
        report.corruptCount++;
        if (report.corrupt.length < LIST_CAP) report.corrupt.push({ seq, reason: check.reason });
      }
    }
    // Records written after the last ack are allowed to be absent; count the ones that made it.
    for (let seq = opts.ackedSeq + 1; seq < nslots; seq++) {
      const offset = slot(seq, nslots) * RECORD_SIZE;
      if (!checkRecord(await img.read(offset, RECORD_SIZE), seq, offset, opts.diskId).ok) break;
      report.beyondAck++;
    }
    report.ok = report.missingCount === 0 && report.corruptCount === 0 && report.highestContiguous >= opts.ackedSeq;
    return report;
  } finally {
    await img.close();
  }
}

async function openRaw(path: string): Promise<ImageReader> {
  const fh = await openImage(path);
  const size = (await fh.stat()).size;
  return {
    size,
    read: async (offset, length) => readAt(fh, offset, length),
    close: () => fh.close(),
  };
}

async function openImage(path: string): Promise<FileHandle> {
  try {
    return await open(path, 'r');
  } catch (err) {
    throw new VerifyError('IMAGE_UNREADABLE', `cannot open ${path}: ${(err as Error).message}`, { cause: err, userError: true });
  }
}

async function readAt(fh: FileHandle, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
    if (bytesRead === 0) break; // past the end: the rest reads as zeros
    done += bytesRead;
  }
  return buf;
}

/**
 * A minimal qcow2 reader (version 2 and 3): L1 and L2 tables, zero clusters, unallocated ranges
 * as zeros. Refuses what it cannot read faithfully: compression, encryption, backing files,
 * external data files.
 */
async function openQcow2(path: string): Promise<ImageReader> {
  const fh = await openImage(path);
  try {
    const h = await readAt(fh, 0, 104);
    const fail = (msg: string): never => {
      throw new VerifyError('QCOW2_UNSUPPORTED', `${path}: ${msg}`, { userError: true });
    };
    if (h.readUInt32BE(0) !== 0x514649fb) fail('not a qcow2 image');
    const version = h.readUInt32BE(4);
    if (version !== 2 && version !== 3) fail(`qcow2 version ${version} is not supported`);
    if (h.readBigUInt64BE(8) !== 0n) fail('images with a backing file are not supported');
    const clusterBits = h.readUInt32BE(20);
    const size = Number(h.readBigUInt64BE(24));
    if (h.readUInt32BE(32) !== 0) fail('encrypted images are not supported');
    const l1Size = h.readUInt32BE(36);
    const l1Offset = Number(h.readBigUInt64BE(40));
    if (version === 3) {
      const incompatible = h.readBigUInt64BE(72);
      if (incompatible & 0b100n) fail('images with an external data file are not supported');
      if (incompatible & 0b1000n) fail('compressed images (zstd) are not supported');
    }
    const clusterSize = 2 ** clusterBits;
    const l2Entries = clusterSize / 8;
    const l1 = await readAt(fh, l1Offset, l1Size * 8);
    const OFFSET_MASK = 0x00fffffffffffe00n;
    const l2Cache = new Map<number, Buffer>();

    const readCluster = async (vcluster: number, within: number, length: number): Promise<Buffer> => {
      const l1Index = Math.floor(vcluster / l2Entries);
      if (l1Index >= l1Size) return Buffer.alloc(length);
      const l2Offset = Number(l1.readBigUInt64BE(l1Index * 8) & OFFSET_MASK);
      if (l2Offset === 0) return Buffer.alloc(length);
      let l2 = l2Cache.get(l2Offset);
      if (!l2) {
        l2 = await readAt(fh, l2Offset, clusterSize);
        l2Cache.set(l2Offset, l2);
      }
      const entry = l2.readBigUInt64BE((vcluster % l2Entries) * 8);
      if (entry & (1n << 62n)) fail('compressed clusters are not supported');
      if (entry & 1n) return Buffer.alloc(length); // zero cluster (v3)
      const hostOffset = Number(entry & OFFSET_MASK);
      if (hostOffset === 0) return Buffer.alloc(length);
      return readAt(fh, hostOffset + within, length);
    };

    return {
      size,
      read: async (offset, length) => {
        const parts: Buffer[] = [];
        let pos = offset;
        const end = offset + length;
        while (pos < end) {
          const vcluster = Math.floor(pos / clusterSize);
          const within = pos % clusterSize;
          const n = Math.min(clusterSize - within, end - pos);
          parts.push(await readCluster(vcluster, within, n));
          pos += n;
        }
        return Buffer.concat(parts);
      },
      close: () => fh.close(),
    };
  } catch (err) {
    await fh.close();
    throw err;
  }
}
