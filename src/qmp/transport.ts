/**
 * Where a QMP session runs: a UNIX socket, TCP, or a stream someone else connected (the agent
 * tunnels QMP over a WebSocket and hands us the Duplex). The protocol layer sees only a Duplex.
 */
import { connect as netConnect, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { errorText } from '../errors.js';
import { QmpConnectError } from './errors.js';

export type QmpTarget = { path: string } | { host: string; port: number } | { stream: Duplex };

/** A target in words, for messages: `unix:/run/vm.qmp`, `tcp:127.0.0.1:4444`, `stream`. */
export function describeTarget(target: QmpTarget): string {
  if ('path' in target) return `unix:${target.path}`;
  if ('host' in target) return `tcp:${target.host}:${target.port}`;
  return 'stream';
}

const hints: Record<string, string> = {
  ENOENT: 'no such socket (is QEMU running with -qmp unix:...,server=on?)',
  ECONNREFUSED: 'connection refused (nothing is listening there)',
  EACCES: 'permission denied',
  ENOTSOCK: 'not a socket',
};

/**
 * Opens the socket. Rejects with QmpConnectError naming the target, or with `signal.reason` if the
 * signal fires first (the caller decides whether that was its timeout or its caller's abort).
 */
export function openStream(target: QmpTarget, signal: AbortSignal): Promise<Duplex> {
  if ('stream' in target) {
    if (target.stream.destroyed) return Promise.reject(new QmpConnectError('cannot use the given QMP stream: it is already destroyed'));
    return Promise.resolve(target.stream);
  }
  const where = describeTarget(target);
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<Duplex>((resolve, reject) => {
    const sock: Socket = 'path' in target ? netConnect({ path: target.path }) : netConnect({ host: target.host, port: target.port });
    const onAbort = (): void => {
      cleanup();
      sock.destroy();
      reject(signal.reason);
    };
    const onError = (err: NodeJS.ErrnoException): void => {
      cleanup();
      sock.destroy();
      const hint = (err.code && hints[err.code]) ?? errorText(err);
      reject(
        new QmpConnectError(`cannot connect to QMP at ${where}: ${hint}`, {
          cause: err,
          context: { target: where, errno: err.code },
          // A wrong path or port is the caller's mistake, not ferry's.
          userError: err.code === 'ENOENT' || err.code === 'ECONNREFUSED',
        }),
      );
    };
    const onConnect = (): void => {
      cleanup();
      resolve(sock);
    };
    const cleanup = (): void => {
      signal.removeEventListener('abort', onAbort);
      sock.off('error', onError);
      sock.off('connect', onConnect);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    sock.once('error', onError);
    sock.once('connect', onConnect);
  });
}
