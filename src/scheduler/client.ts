/** A session with ferry-scheduler's API: calls with deadlines, and the watch stream. */
import type { WebSocket } from 'ws';
import { FerryError } from '../errors.js';
import { openSocket, RpcSession, type PeerLabel } from '../rpc/ws-client.js';
import { SCHEDULER_PROTOCOL_VERSION, type SchedulerMethod } from './protocol.js';

export class SchedulerCallError extends FerryError {
  override name = 'SchedulerCallError';
}

export class SchedulerClient {
  readonly #session: RpcSession;
  readonly #listeners = new Set<(e: Record<string, unknown>) => void>();
  readonly closed: Promise<void>;

  private constructor(ws: WebSocket, url: string) {
    this.#session = new RpcSession(ws, {
      version: SCHEDULER_PROTOCOL_VERSION,
      peer: schedulerPeer(url),
      onEvent: (e) => {
        if (typeof e !== 'object' || e === null) return;
        for (const l of this.#listeners) l(e as Record<string, unknown>);
      },
    });
    this.closed = this.#session.closed;
  }

  /** `heartbeatMs`: ping interval (default 10 s); a scheduler that stops answering is dropped within twice this. */
  static async connect(url: string, token: string, timeoutMs = 10_000, opts: { heartbeatMs?: number } = {}): Promise<SchedulerClient> {
    return openSocket(`${url}/v1`, { token, timeoutMs, peer: schedulerPeer(url), ...opts }, (ws) => new SchedulerClient(ws, url));
  }

  call(method: SchedulerMethod, params: Record<string, unknown> = {}, timeoutMs = 60_000, signal?: AbortSignal): Promise<unknown> {
    return this.#session.call(method, params, timeoutMs, signal);
  }

  async watch(listener: (e: Record<string, unknown>) => void): Promise<void> {
    this.#listeners.add(listener);
    await this.call('watch');
  }

  close(): void {
    this.#session.close();
  }
}

function schedulerPeer(url: string): PeerLabel {
  return { who: `the scheduler at ${url}`, code: 'SCHEDULER', error: (code, message, opts) => new SchedulerCallError(code, message, opts) };
}
