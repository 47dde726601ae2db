/** A session with ferry-scheduler's API: calls with deadlines, and the watch stream. */
import { WebSocket } from 'ws';
import { z } from 'zod';
import { FerryError } from '../errors.js';
import { SCHEDULER_PROTOCOL_VERSION, type SchedulerMethod } from './protocol.js';

export class SchedulerCallError extends FerryError {
  override name = 'SchedulerCallError';
}

const frameSchema = z.union([
  z.object({ v: z.literal(1), id: z.number(), ok: z.literal(true), result: z.unknown() }),
  z.object({ v: z.literal(1), id: z.union([z.number(), z.string(), z.null()]), ok: z.literal(false), error: z.object({ code: z.string(), message: z.string() }) }),
  z.object({ v: z.literal(1), event: z.record(z.string(), z.unknown()) }),
]);

export class SchedulerClient {
  readonly #ws: WebSocket;
  #next = 1;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  readonly #listeners = new Set<(e: Record<string, unknown>) => void>();
  readonly closed: Promise<void>;

  private constructor(ws: WebSocket, url: string) {
    this.#ws = ws;
    ws.on('message', (data: Buffer) => {
      let json: unknown;
      try {
        json = JSON.parse(data.toString('utf8'));
      } catch {
        return;
      }
      const f = frameSchema.safeParse(json);
      if (!f.success) return;
      if ('event' in f.data) {
        for (const l of this.#listeners) l(f.data.event);
        return;
      }
      const p = typeof f.data.id === 'number' ? this.#pending.get(f.data.id) : undefined;
      if (!p) return;
      this.#pending.delete(f.data.id as number);
      clearTimeout(p.timer);
      if (f.data.ok) p.resolve(f.data.result);
      else p.reject(new SchedulerCallError(f.data.error.code, f.data.error.message, { userError: true }));
    });
    this.closed = new Promise((resolve) =>
      ws.on('close', () => {
        for (const p of this.#pending.values()) {
          clearTimeout(p.timer);
          p.reject(new SchedulerCallError('SCHEDULER_DISCONNECTED', `scheduler ${url} closed the session`));
        }
        this.#pending.clear();
        resolve();
      }),
    );
  }

  static connect(url: string, token: string, timeoutMs = 10_000): Promise<SchedulerClient> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(`${url}/v1`, { headers: { authorization: `Bearer ${token}` }, handshakeTimeout: timeoutMs });
      ws.once('open', () => resolve(new SchedulerClient(ws, url)));
      ws.once('unexpected-response', (_q, res) => {
        reject(new SchedulerCallError('SCHEDULER_REFUSED', `scheduler ${url} refused the connection: HTTP ${res.statusCode}`, { userError: true }));
        ws.terminate();
      });
      ws.once('error', (err) => reject(new SchedulerCallError('SCHEDULER_UNREACHABLE', `cannot reach the scheduler at ${url}: ${err.message}`, { userError: true })));
    });
  }

  call(method: SchedulerMethod, params: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<unknown> {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new SchedulerCallError('SCHEDULER_TIMEOUT', `the scheduler did not answer ${method} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      this.#ws.send(JSON.stringify({ v: SCHEDULER_PROTOCOL_VERSION, id, method, params }));
    });
  }

  async watch(listener: (e: Record<string, unknown>) => void): Promise<void> {
    this.#listeners.add(listener);
    await this.call('watch');
  }

  close(): void {
    this.#ws.close();
  }
}
