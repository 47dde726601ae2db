/**
 * An in-process fake QMP server for unit tests. It talks to the client over an in-memory stream
 * pair, so a test decides exactly how bytes are chunked, and it can replay transcripts recorded
 * from the real QEMU (fixtures/qmp/*.jsonl, written by scripts/record-qmp-fixtures.ts).
 */
import { readFileSync } from 'node:fs';
import { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';

export type TranscriptLine = { dir: 'send' | 'recv'; msg: Record<string, unknown> };

export function loadTranscript(name: string): TranscriptLine[] {
  const file = fileURLToPath(new URL(`../../../fixtures/qmp/${name}.jsonl`, import.meta.url));
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as TranscriptLine);
}

/** Two connected Duplex ends; what one writes, the other reads, chunk for chunk. */
function streamPair(): [Duplex, Duplex] {
  let a!: Duplex;
  let b!: Duplex;
  const mk = (peer: () => Duplex): Duplex =>
    new Duplex({
      read() {},
      write(chunk: Buffer, _enc, cb) {
        peer().push(chunk);
        cb();
      },
      final(cb) {
        peer().push(null);
        cb();
      },
      destroy(err, cb) {
        // Closing one end is seen by the other as the connection ending.
        const p = peer();
        if (!p.destroyed) p.push(null);
        cb(err);
      },
    });
  a = mk(() => b);
  b = mk(() => a);
  return [a, b];
}

export type Chunker = (bytes: Buffer) => Buffer[];
export const whole: Chunker = (b) => [b];
export const everyByte: Chunker = (b) => [...b].map((x) => Buffer.from([x]));

export class FakeQmp {
  /** The end handed to QmpClient.connect({ stream }). */
  readonly clientEnd: Duplex;
  readonly #server: Duplex;
  readonly received: Record<string, unknown>[] = [];
  #buf = '';
  #waiters: Array<() => void> = [];
  #onMessage: ((msg: Record<string, unknown>) => void) | undefined;
  chunker: Chunker = whole;

  constructor() {
    [this.clientEnd, this.#server] = streamPair();
    this.#server.on('data', (chunk: Buffer) => {
      this.#buf += chunk.toString('utf8');
      let nl: number;
      while ((nl = this.#buf.indexOf('\n')) >= 0) {
        const line = this.#buf.slice(0, nl);
        this.#buf = this.#buf.slice(nl + 1);
        const msg = JSON.parse(line) as Record<string, unknown>;
        this.received.push(msg);
        this.#onMessage?.(msg);
        for (const w of this.#waiters.splice(0)) w();
      }
    });
    this.#server.on('error', () => undefined);
  }

  /** Sends raw bytes to the client, cut by the chunker. */
  sendRaw(bytes: string | Buffer): void {
    if (this.#server.destroyed) return;
    for (const c of this.chunker(Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes, 'utf8'))) this.#server.write(c);
  }

  /** Sends messages, all in one write (then cut by the chunker). */
  send(...msgs: unknown[]): void {
    this.sendRaw(msgs.map((m) => JSON.stringify(m) + '\n').join(''));
  }

  greet(oob = true): void {
    this.send({ QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'fake' }, capabilities: oob ? ['oob'] : [] } });
  }

  /** Waits until the client has sent `n` messages in all. */
  async receivedCount(n: number): Promise<Record<string, unknown>[]> {
    while (this.received.length < n) await new Promise<void>((r) => this.#waiters.push(r));
    return this.received.slice(0, n);
  }

  /** Answers every message with `fn` (for scripted tests). */
  onMessage(fn: ((msg: Record<string, unknown>) => void) | undefined): void {
    this.#onMessage = fn;
  }

  /** Greets, then answers `qmp_capabilities` with success. */
  acceptNegotiation(): void {
    this.onMessage((m) => {
      if (m.execute === 'qmp_capabilities') this.send({ return: {}, id: m.id });
    });
    this.greet();
  }

  /**
   * Replays a recorded transcript: sends what QEMU sent, and for each message the client sends,
   * checks it names the command recorded next, then sends what QEMU sent after it, with reply ids
   * rewritten to the client's id. Messages QEMU sent after the last command are sent at once.
   */
  replay(transcript: TranscriptLine[], opts: { oneWrite?: boolean } = {}): void {
    let i = 0;
    const flushRecv = (idMap?: { from: unknown; to: unknown }): void => {
      const out: unknown[] = [];
      while (i < transcript.length && transcript[i]!.dir === 'recv') {
        const msg = transcript[i]!.msg;
        out.push(idMap && 'id' in msg && msg.id === idMap.from ? { ...msg, id: idMap.to } : msg);
        i++;
      }
      if (opts.oneWrite) this.send(...out);
      else for (const m of out) this.send(m);
    };
    this.onMessage((m) => {
      const expected = transcript[i];
      if (!expected || expected.dir !== 'send') throw new Error(`fake QMP: unexpected ${JSON.stringify(m)}: transcript has no more commands`);
      const cmd = m.execute ?? m['exec-oob'];
      if (cmd !== expected.msg.execute) throw new Error(`fake QMP: client sent ${String(cmd)}, transcript expects ${String(expected.msg.execute)}`);
      i++;
      flushRecv({ from: expected.msg.id, to: m.id });
    });
    flushRecv();
  }

  /** The server hangs up. */
  hangUp(): void {
    this.#server.end();
    this.#server.destroy();
  }
}
