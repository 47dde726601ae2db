/**
 * QMP's wire framing: one JSON document per line. Bytes arrive in arbitrary chunks; a line may
 * span many chunks and a chunk may hold many lines, and a chunk boundary may fall inside a
 * multi-byte UTF-8 character. So: keep the chunks of the unfinished line in a list, scan only the
 * newly arrived bytes for `\n`, and decode a line only once it is complete. Each byte is scanned
 * once and copied at most once, so a megabyte reply costs linear time however it is chunked.
 */
export class LineDecoder {
  #parts: Buffer[] = [];
  #partBytes = 0;
  readonly #maxLineBytes: number;

  constructor(opts: { maxLineBytes?: number } = {}) {
    this.#maxLineBytes = opts.maxLineBytes ?? 64 * 1024 * 1024;
  }

  /** Bytes held for a line not yet complete. */
  get pendingBytes(): number {
    return this.#partBytes;
  }

  /**
   * Feeds a chunk; calls `onLine` for each complete, non-blank line (without its `\n` or `\r`).
   * Throws RangeError when a line outgrows the limit (the caller ends the session).
   */
  push(chunk: Buffer, onLine: (line: string) => void): void {
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(10, start);
      if (nl < 0) break;
      let line: string;
      if (this.#partBytes === 0) {
        line = chunk.toString('utf8', start, nl);
      } else {
        this.#parts.push(chunk.subarray(start, nl));
        line = Buffer.concat(this.#parts, this.#partBytes + (nl - start)).toString('utf8');
        this.#parts = [];
        this.#partBytes = 0;
      }
      start = nl + 1;
      const trimmed = line.endsWith('\r') ? line.slice(0, -1) : line;
      if (trimmed.trim() !== '') onLine(trimmed);
    }
    if (start < chunk.length) {
      this.#parts.push(start === 0 ? chunk : chunk.subarray(start));
      this.#partBytes += chunk.length - start;
      if (this.#partBytes > this.#maxLineBytes) {
        const held = this.#partBytes;
        this.#parts = [];
        this.#partBytes = 0;
        throw new RangeError(`a QMP message exceeded ${this.#maxLineBytes} bytes (${held} bytes without a newline)`);
      }
    }
  }
}
