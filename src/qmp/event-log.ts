/**
 * The events of one session: a bounded history with absolute positions (cursors), the waits
 * registered on it, and the iterators reading it.
 *
 * Why cursors: a command's reply and the event it causes can arrive in the same chunk (QEMU sends
 * STOP *before* the reply to `stop`). The reader handles every line of a chunk synchronously, so by
 * the time the code awaiting the reply resumes, the event is already in the past; a wait that only
 * looks forward would miss it and hang until its deadline. So: take `eventCursor()` before sending
 * the command, then `waitForEvent(pred, { since: cursor })` first searches the events received
 * from that position on, then waits for new ones. The history keeps the last `capacity` events;
 * a cursor older than that sees only what is left.
 */
import type { Logger } from '../log.js';
import { QmpAbortError, QmpDisconnectedError, type QmpError, QmpTimeoutError } from './errors.js';
import { describeEvent, type QmpEvent } from './events.js';

interface Waiter {
  what: string;
  predicate: (e: QmpEvent) => boolean;
  resolve(e: QmpEvent): void;
  reject(err: unknown): void;
}

interface Reader {
  queue: QmpEvent[];
  next: { resolve(r: IteratorResult<QmpEvent>): void; reject(err: unknown): void } | undefined;
  end(err?: unknown): void;
}

export class EventLog {
  readonly #capacity: number;
  readonly #ring: (QmpEvent | undefined)[];
  #count = 0;
  readonly #waiters = new Set<Waiter>();
  readonly #readers = new Set<Reader>();
  #ended: QmpError | undefined | null = null;
  readonly #log: Logger;
  readonly #where: string;

  constructor(opts: { capacity?: number; logger: Logger; where: string }) {
    this.#capacity = opts.capacity ?? 4096;
    this.#ring = new Array<QmpEvent | undefined>(this.#capacity);
    this.#log = opts.logger;
    this.#where = opts.where;
  }

  /** Position after the newest event: the cursor of the next event to arrive. */
  cursor(): number {
    return this.#count;
  }

  get last(): QmpEvent | undefined {
    return this.#count === 0 ? undefined : this.#ring[(this.#count - 1) % this.#capacity];
  }

  push(e: QmpEvent): void {
    this.#ring[this.#count % this.#capacity] = e;
    this.#count++;
    for (const w of this.#waiters) {
      let hit: boolean;
      try {
        hit = w.predicate(e);
      } catch (err) {
        w.reject(err);
        continue;
      }
      if (hit) w.resolve(e);
    }
    for (const r of this.#readers) {
      if (r.next) {
        const n = r.next;
        r.next = undefined;
        n.resolve({ value: e, done: false });
      } else {
        if (r.queue.length >= this.#capacity) {
          r.queue.shift();
          this.#log.warn({ event: e.event }, 'QMP event reader is not keeping up; dropped its oldest event');
        }
        r.queue.push(e);
      }
    }
  }

  /** Events from `since` on that are still held. */
  *#since(since: number): Generator<QmpEvent> {
    const from = Math.max(since, this.#count - this.#capacity, 0);
    if (from > since) this.#log.warn({ since, oldest: from }, 'event cursor is older than the history kept; some events are gone');
    for (let i = from; i < this.#count; i++) yield this.#ring[i % this.#capacity]!;
  }

  wait<E extends QmpEvent>(
    predicate: (e: QmpEvent) => boolean,
    opts: { timeoutMs: number; signal?: AbortSignal; since?: number; what?: string },
  ): Promise<E> {
    const what = opts.what ?? 'a matching QMP event';
    if (opts.since !== undefined) {
      try {
        for (const e of this.#since(opts.since)) if (predicate(e)) return Promise.resolve(e as E);
      } catch (err) {
        return Promise.reject(err);
      }
    }
    if (this.#ended !== null) {
      return Promise.reject(new QmpDisconnectedError(`QMP session to ${this.#where} has ended; cannot wait for ${what}`, { cause: this.#ended }));
    }
    const signal = opts.signal;
    if (signal?.aborted) return Promise.reject(new QmpAbortError(`aborted waiting for ${what}`, { cause: signal.reason }));
    const started = this.#count;
    return new Promise<E>((resolve, reject) => {
      const finish = (): void => {
        this.#waiters.delete(waiter);
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      const waiter: Waiter = {
        what,
        predicate,
        resolve: (e) => {
          finish();
          resolve(e as E);
        },
        reject: (err) => {
          finish();
          reject(err);
        },
      };
      const onAbort = (): void => waiter.reject(new QmpAbortError(`aborted waiting for ${what}`, { cause: signal?.reason }));
      const timer = setTimeout(() => {
        const last = this.last;
        const seen = this.#count - started;
        waiter.reject(
          new QmpTimeoutError(
            `timed out after ${opts.timeoutMs} ms waiting for ${what} on ${this.#where}; ` +
              `${seen} event(s) arrived meanwhile; last event seen: ${last ? describeEvent(last) : 'none'}`,
            { context: { what, timeoutMs: opts.timeoutMs, lastEvent: last?.event } },
          ),
        );
      }, opts.timeoutMs);
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiters.add(waiter);
    });
  }

  /** Events from now on; ends (done) when the session ends, throws QmpAbortError on abort. */
  reader(opts: { signal?: AbortSignal } = {}): AsyncIterableIterator<QmpEvent> {
    const signal = opts.signal;
    let failure: unknown;
    let done = false;
    const reader: Reader = {
      queue: [],
      next: undefined,
      end: (err?: unknown) => {
        if (done) return;
        done = true;
        this.#readers.delete(reader);
        signal?.removeEventListener('abort', onAbort);
        const n = reader.next;
        reader.next = undefined;
        if (n && err !== undefined) n.reject(err);
        else if (n) n.resolve({ value: undefined, done: true });
        else failure = err;
      },
    };
    const onAbort = (): void => reader.end(new QmpAbortError('aborted reading QMP events', { cause: signal?.reason }));
    if (this.#ended !== null) done = true;
    else if (signal?.aborted) {
      done = true;
      failure = new QmpAbortError('aborted reading QMP events', { cause: signal.reason });
    } else {
      this.#readers.add(reader);
      signal?.addEventListener('abort', onAbort, { once: true });
    }
    const iterator: AsyncIterableIterator<QmpEvent> = {
      next: () => {
        const queued = reader.queue.shift();
        if (queued) return Promise.resolve({ value: queued, done: false });
        if (failure !== undefined) {
          const err = failure;
          failure = undefined;
          return Promise.reject(err);
        }
        if (done) return Promise.resolve({ value: undefined, done: true });
        if (reader.next) return Promise.reject(new Error('QMP event iterator: next() called again before the previous one settled'));
        return new Promise((resolve, reject) => {
          reader.next = { resolve, reject };
        });
      },
      return: () => {
        reader.end();
        reader.queue.length = 0;
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /** The session ended: waits fail, readers finish after what they hold. */
  end(reason: QmpError | undefined): void {
    if (this.#ended !== null) return;
    this.#ended = reason;
    for (const w of this.#waiters) {
      w.reject(new QmpDisconnectedError(`QMP session to ${this.#where} ended while waiting for ${w.what}`, { cause: reason }));
    }
    for (const r of this.#readers) r.end();
  }
}
