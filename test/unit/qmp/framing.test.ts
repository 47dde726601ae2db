import { describe, expect, it } from 'vitest';
import { LineDecoder } from '../../../src/qmp/framing.js';
import { loadTranscript } from './fake-qmp.js';

function decodeAll(chunks: Buffer[], dec = new LineDecoder()): string[] {
  const lines: string[] = [];
  for (const c of chunks) dec.push(c, (l) => lines.push(l));
  return lines;
}

describe('LineDecoder', () => {
  const recorded = loadTranscript('session')
    .filter((l) => l.dir === 'recv')
    .map((l) => JSON.stringify(l.msg));
  const bytes = Buffer.from(recorded.join('\n') + '\n', 'utf8');

  it('yields every recorded message whole when all arrive in one chunk', () => {
    expect(decodeAll([bytes])).toEqual(recorded);
  });

  it('yields the same messages when the stream is split at every byte', () => {
    expect(decodeAll([...bytes].map((b) => Buffer.from([b])))).toEqual(recorded);
  });

  it('yields the same messages for every single split position', () => {
    for (let cut = 1; cut < bytes.length; cut += 7) {
      expect(decodeAll([bytes.subarray(0, cut), bytes.subarray(cut)])).toEqual(recorded);
    }
  });

  it('decodes a multi-byte UTF-8 character split across chunks', () => {
    const line = JSON.stringify({ return: { desc: 'déjà vu ✓ 😀 über' }, id: 'x' });
    const buf = Buffer.from(line + '\n', 'utf8');
    for (let cut = 1; cut < buf.length; cut++) {
      expect(decodeAll([buf.subarray(0, cut), buf.subarray(cut)])).toEqual([line]);
    }
    expect(decodeAll([...buf].map((b) => Buffer.from([b])))).toEqual([line]);
  });

  it('handles CRLF and blank lines', () => {
    expect(decodeAll([Buffer.from('{"a":1}\r\n\n  \n{"b":2}\n')])).toEqual(['{"a":1}', '{"b":2}']);
  });

  it('holds an unfinished line until its newline arrives', () => {
    const dec = new LineDecoder();
    expect(decodeAll([Buffer.from('{"a":')], dec)).toEqual([]);
    expect(dec.pendingBytes).toBe(5);
    expect(decodeAll([Buffer.from('1}\n{"b"')], dec)).toEqual(['{"a":1}']);
    expect(dec.pendingBytes).toBe(4);
  });

  it('assembles a multi-megabyte message from 64 KiB chunks in linear time', () => {
    const big = JSON.stringify({ return: 'x'.repeat(8 * 1024 * 1024), id: 'big' });
    const buf = Buffer.from(big + '\n');
    const chunks: Buffer[] = [];
    for (let i = 0; i < buf.length; i += 65536) chunks.push(buf.subarray(i, i + 65536));
    const started = performance.now();
    const lines = decodeAll(chunks);
    expect(performance.now() - started).toBeLessThan(1_000);
    expect(lines).toHaveLength(1);
    expect(lines[0]!.length).toBe(big.length);
  });

  it('refuses a line beyond its limit', () => {
    const dec = new LineDecoder({ maxLineBytes: 100 });
    expect(() => decodeAll([Buffer.alloc(101, 0x61)], dec)).toThrow(RangeError);
  });
});
