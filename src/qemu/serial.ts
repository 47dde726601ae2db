import { connect, type Socket } from 'node:net';
import { StringDecoder } from 'node:string_decoder';
import { FerryError } from '../errors.js';

export interface SerialLine {
  text: string;
  /** Host arrival time, performance.now() ms: the guest's own clock stops when QEMU pauses it. */
  at: number;
}

type Waiter = { pred: (l: SerialLine) => boolean; resolve: (l: SerialLine) => void };

/**
 * The guest's serial console, read from QEMU's chardev socket and split into lines as they
 * arrive (a line may span chunks, a chunk may hold many lines or end inside a UTF-8 character).
 */
export class SerialConsole {
  readonly #lines: SerialLine[] = [];
  readonly #waiters = new Set<Waiter>();
  readonly #decoder = new StringDecoder('utf8');
  #partial = '';
  #socket: Socket | undefined;
  #closed = false;
  static readonly MAX_LINES = 200_000;

  /** Feeds raw bytes; exported for tests that split input at every byte. */
  push(chunk: Buffer | string, at = performance.now()): void {
    const text = this.#partial + (typeof chunk === 'string' ? chunk : this.#decoder.write(chunk));
    const parts = text.split('\n');
    this.#partial = parts.pop() ?? '';
    for (const raw of parts) {
      const line = { text: raw.replace(/\r$/, ''), at };
      this.#lines.push(line);
      if (this.#lines.length > SerialConsole.MAX_LINES) this.#lines.splice(0, this.#lines.length - SerialConsole.MAX_LINES);
      for (const w of this.#waiters) {
        if (w.pred(line)) {
          this.#waiters.delete(w);
          w.resolve(line);
        }
      }
    }
  }

  history(): readonly SerialLine[] {
    return this.#lines;
  }

  /** Resolves with the first line, already received or to come, that matches. */
  waitForLine(
    pred: (l: SerialLine) => boolean,
    opts: { timeoutMs: number; signal?: AbortSignal; what?: string; since?: number },
  ): Promise<SerialLine> {
    const from = opts.since ?? 0;
    const seen = this.#lines.find((l, i) => i >= from && pred(l));
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const done = (): void => {
        clearTimeout(timer);
        opts.signal?.removeEventListener('abort', onAbort);
        this.#waiters.delete(waiter);
      };
      const waiter: Waiter = { pred, resolve: (l) => (done(), resolve(l)) };
      const onAbort = (): void => {
        done();
        reject(new FerryError('SERIAL_ABORTED', `aborted waiting for ${opts.what ?? 'a serial line'}`, { cause: opts.signal?.reason }));
      };
      const timer = setTimeout(() => {
        done();
        const last = this.#lines.at(-1)?.text ?? '(nothing)';
        reject(new FerryError('SERIAL_TIMEOUT', `timed out after ${opts.timeoutMs} ms waiting for ${opts.what ?? 'a serial line'}; last line: ${last}`));
      }, opts.timeoutMs);
      this.#waiters.add(waiter);
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      if (opts.signal?.aborted) onAbort();
    });
  }

  /** Index for `since`: lines from now on. */
  cursor(): number {
    return this.#lines.length;
  }

  attach(path: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => {
        s.off('error', reject);
        s.on('error', () => undefined);
        resolve();
      });
      s.once('error', reject);
      s.on('data', (b: Buffer) => this.push(b));
      s.on('close', () => {
        this.#closed = true;
      });
      this.#socket = s;
    });
  }

  get closed(): boolean {
    return this.#closed;
  }

  close(): void {
    this.#socket?.destroy();
  }
}
