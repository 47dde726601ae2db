/**
 * Dead-peer detection for a WebSocket, both ends (the agent's and the scheduler's servers ping
 * their callers, the callers ping them): a ping every `intervalMs`, and a peer that has answered
 * none since the previous one is dropped (`terminate`, no closing handshake: a half-open peer
 * would never answer it). A peer that goes silent is therefore dropped within 2 x intervalMs.
 * ws answers pings by itself (autoPong), so a peer needs no code of its own to stay alive.
 */
import type { WebSocket } from 'ws';

/** Ping interval when the caller gives none: a half-open peer is dropped within 20 s. */
export const DEFAULT_HEARTBEAT_MS = 10_000;

/** Sockets this module dropped, and how long their peer had been silent, ms. */
const dropped = new WeakMap<WebSocket, number>();

/** How long the peer of `ws` had answered no ping when keepAlive dropped it, or undefined. */
export function silenceBeforeDrop(ws: WebSocket): number | undefined {
  return dropped.get(ws);
}

/**
 * Pings the peer of `ws` until the socket closes; `onDrop` hears of a drop before the socket's
 * 'close' event fires. Returns the function that stops it (the close stops it too).
 */
export function keepAlive(ws: WebSocket, opts: { intervalMs: number; onDrop?: (silentMs: number) => void }): () => void {
  let lastPong = performance.now();
  let answered = true;
  const onPong = (): void => {
    answered = true;
    lastPong = performance.now();
  };
  const timer = setInterval(() => {
    if (ws.readyState !== ws.OPEN) return;
    if (!answered) {
      const silentMs = Math.round(performance.now() - lastPong);
      dropped.set(ws, silentMs);
      stop();
      opts.onDrop?.(silentMs);
      ws.terminate();
      return;
    }
    answered = false;
    ws.ping();
  }, opts.intervalMs);
  // A heartbeat alone never keeps a process alive: the socket itself does, while it is open.
  timer.unref();
  const stop = (): void => {
    clearInterval(timer);
    ws.off('pong', onPong);
  };
  ws.on('pong', onPong);
  ws.once('close', stop);
  return stop;
}
