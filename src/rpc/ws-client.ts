/**
 * The caller's side of ws-rpc.ts, shared by the agent's and the scheduler's clients: one
 * authenticated WebSocket, calls matched to answers by id, each with a deadline and an optional
 * AbortSignal; event frames (`{ v, event }`) handed to a listener; every pending call rejected
 * when the session closes, also when the peer stops answering pings (heartbeat.ts).
 * Errors carry stable codes `<PEER>_REFUSED | _UNREACHABLE | _TIMEOUT | _CANCELLED | _DISCONNECTED`,
 * built by the peer's own error class.
 */
import { WebSocket } from 'ws';
import { z } from 'zod';
import { errorText, type FerryError } from '../errors.js';
import { DEFAULT_HEARTBEAT_MS, keepAlive, silenceBeforeDrop } from './heartbeat.js';

export type PeerErrorFactory = (code: string, message: string, opts?: { userError?: boolean; cause?: unknown }) => FerryError;

export interface PeerLabel {
  /** How messages name the peer: `agent ws://h17:7420`. */
  who: string;
  /** Prefix of the error codes: AGENT, SCHEDULER. */
  code: string;
  error: PeerErrorFactory;
}

const frameSchema = z.union([
  z.object({ v: z.number(), id: z.union([z.string(), z.number(), z.null()]), ok: z.literal(true), result: z.unknown() }).strict(),
  z.object({ v: z.number(), id: z.union([z.string(), z.number(), z.null()]), ok: z.literal(false), error: z.object({ code: z.string(), message: z.string() }).strict() }).strict(),
  z.object({ v: z.number(), event: z.unknown() }).strict(),
]);

/**
 * Opens an authenticated WebSocket and hands it to `onOpen` synchronously, in the 'open' event:
 * the peer may send at once (QEMU greets), and ws can deliver that frame in the same tick as
 * 'open', before any awaiting code runs. A refusal at the upgrade and an unreachable peer are the
 * caller's to fix (userError) unless `userError: false` says the caller is the engine mid-flight.
 * From then on the peer is pinged every `heartbeatMs` (default 10 s) and a peer that stops
 * answering is dropped within twice that (heartbeat.ts).
 */
export function openSocket<T>(
  url: string,
  opts: { token: string; timeoutMs: number; peer: PeerLabel; tls?: Record<string, unknown>; userError?: boolean; heartbeatMs?: number; headers?: Record<string, string> },
  onOpen: (ws: WebSocket) => T,
): Promise<T> {
  const { peer } = opts;
  const userError = opts.userError ?? true;
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers: { ...opts.headers, authorization: `Bearer ${opts.token}` }, handshakeTimeout: opts.timeoutMs, ...opts.tls });
    ws.once('open', () => {
      keepAlive(ws, { intervalMs: opts.heartbeatMs ?? DEFAULT_HEARTBEAT_MS });
      resolve(onOpen(ws));
    });
    ws.once('unexpected-response', (_req, res) => {
      reject(peer.error(`${peer.code}_REFUSED`, `${peer.who} refused the connection: HTTP ${res.statusCode}`, { userError }));
      ws.terminate();
    });
    ws.once('error', (err) => reject(peer.error(`${peer.code}_UNREACHABLE`, `cannot reach ${peer.who}: ${err.message}`, { userError })));
  });
}

export class RpcSession {
  readonly #ws: WebSocket;
  readonly #version: number;
  readonly #peer: PeerLabel;
  #next = 1;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; done: () => void }>();
  #closed = false;
  /** Resolves when the session has closed, for whatever reason. */
  readonly closed: Promise<void>;

  constructor(ws: WebSocket, opts: { version: number; peer: PeerLabel; onEvent: (event: unknown) => void }) {
    this.#ws = ws;
    this.#version = opts.version;
    this.#peer = opts.peer;
    ws.on('message', (data: Buffer) => {
      let json: unknown;
      try {
        json = JSON.parse(data.toString('utf8'));
      } catch {
        return;
      }
      const f = frameSchema.safeParse(json);
      if (!f.success || f.data.v !== this.#version) return;
      if ('event' in f.data) return opts.onEvent(f.data.event);
      const p = typeof f.data.id === 'number' ? this.#pending.get(f.data.id) : undefined;
      if (!p) return;
      p.done();
      if (f.data.ok) p.resolve(f.data.result);
      else p.reject(this.#peer.error(f.data.error.code, f.data.error.message, { userError: true }));
    });
    this.closed = new Promise((resolve) =>
      ws.once('close', () => {
        this.#closed = true;
        const err = this.#disconnected();
        for (const p of [...this.#pending.values()]) {
          p.done();
          p.reject(err);
        }
        resolve();
      }),
    );
  }

  /**
   * Sends one request and waits for its answer, at most `timeoutMs`, or until `signal` aborts.
   * A timeout or an abort stops the wait, not the peer: the request may still be carried out.
   */
  call(method: string, params: Record<string, unknown>, timeoutMs: number, signal?: AbortSignal): Promise<unknown> {
    if (this.#closed) return Promise.reject(this.#disconnected());
    if (signal?.aborted) return Promise.reject(this.#cancelled(method, signal));
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const onAbort = (): void => {
        done();
        reject(this.#cancelled(method, signal!));
      };
      const timer = setTimeout(() => {
        done();
        reject(this.#peer.error(`${this.#peer.code}_TIMEOUT`, `${this.#peer.who} did not answer ${method} within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        this.#pending.delete(id);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#pending.set(id, { resolve, reject, done });
      this.#ws.send(JSON.stringify({ v: this.#version, id, method, params }));
    });
  }

  #cancelled(method: string, signal: AbortSignal): FerryError {
    return this.#peer.error(`${this.#peer.code}_CANCELLED`, `${method} to ${this.#peer.who} was cancelled: ${errorText(signal.reason)}`, { cause: signal.reason });
  }

  #disconnected(): FerryError {
    const silentMs = silenceBeforeDrop(this.#ws);
    return silentMs === undefined
      ? this.#peer.error(`${this.#peer.code}_DISCONNECTED`, `${this.#peer.who} closed the session`)
      : this.#peer.error(`${this.#peer.code}_DISCONNECTED`, `${this.#peer.who} answered no ping for ${silentMs} ms: the connection was dropped`);
  }

  close(): void {
    this.#ws.close();
  }
}
