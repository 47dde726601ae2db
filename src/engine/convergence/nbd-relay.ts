/**
 * QEMU 7.2's way to a mirror that converges: an NBD relay with TCP_NODELAY on the destination.
 *
 * Why: QEMU before 8.0 does not set TCP_NODELAY on the NBD connections its server accepts (8.0
 * got "nbd/server: push pending frames after sending reply"). Each reply to the mirror's writes
 * then waits for the ACK of the previous one, which the source's kernel delays by up to 40 ms;
 * with an O_DIRECT destination disk a mirror of a writing guest copies at a crawl and becomes
 * READY only by luck (issue 11; bench/mirror-ready.ts, mechanism `relay`).
 *
 * The fix, without touching QEMU or the host's network settings: the destination QEMU's NBD
 * server listens on a unix socket (no Nagle there), and this relay, on the destination host,
 * accepts the source's TCP connection with TCP_NODELAY set and carries the bytes both ways.
 * QEMU 7.2 cannot take a TCP_NODELAY listening socket of ours instead: its QMP takes an `fd`
 * address only by a name passed with `getfd` (SCM_RIGHTS), which Node cannot send.
 *
 * The relay must live until the mirrors are cancelled at switchover; if it dies, the source's
 * NBD node fails, the mirror fails, and the migration rolls back: nothing is lost.
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import { errorText } from '../../errors.js';
import type { Logger } from '../../log.js';
import { silentLogger } from '../../log.js';
import type { VersionInfo } from '../../qmp/index.js';
import { ConvergenceError } from './errors.js';

/** Whether a destination QEMU's NBD server needs the relay: it does before 8.0. */
export function nbdServerNeedsRelay(version: VersionInfo): boolean {
  return version.qemu.major < 8;
}

export interface NbdRelay extends AsyncDisposable {
  readonly host: string;
  /** The TCP port the source's NBD client connects to. */
  readonly port: number;
  /** Bytes carried from the source to QEMU (the mirror's writes) and back, over all connections. */
  readonly bytesToServer: number;
  readonly bytesFromServer: number;
  /** Connections accepted so far. */
  readonly connections: number;
  /** Stops listening and cuts every connection; idempotent. */
  close(): Promise<void>;
}

export interface NbdRelayOptions {
  /** Where the source connects (the destination's migration host). */
  host: string;
  /** Candidate TCP ports, tried in order; 50 at most. [0] lets the kernel choose. */
  ports: Iterable<number>;
  /** The unix socket QEMU's `nbd-server-start` listens on. */
  unixPath: string;
  signal?: AbortSignal;
  logger?: Logger;
}

export async function startNbdRelay(opts: NbdRelayOptions): Promise<NbdRelay> {
  const log = (opts.logger ?? silentLogger).child({ relay: opts.unixPath });
  const live = new Set<Socket>();
  let toServer = 0;
  let fromServer = 0;
  let accepted = 0;
  const server = createServer({ noDelay: true }, (tcp) => {
    accepted++;
    // Also set here: `noDelay` at createServer is Node >= 18.14 only.
    tcp.setNoDelay(true);
    const unix = connect(opts.unixPath);
    live.add(tcp).add(unix);
    const cut = (why: string) => (err?: Error): void => {
      if (err) log.warn({ err: errorText(err), why }, 'NBD relay connection failed');
      tcp.destroy();
      unix.destroy();
      live.delete(tcp);
      live.delete(unix);
    };
    tcp.on('data', (b: Buffer) => (toServer += b.length));
    unix.on('data', (b: Buffer) => (fromServer += b.length));
    tcp.pipe(unix);
    unix.pipe(tcp);
    tcp.once('error', cut('source side')).once('close', cut('source closed'));
    unix.once('error', cut('QEMU side')).once('close', cut('QEMU closed'));
  });
  const port = await listenOnOneOf(server, opts.host, opts.ports, opts.signal);
  log.debug({ host: opts.host, port }, 'NBD relay listening');
  let closing: Promise<void> | undefined;
  const relay: NbdRelay = {
    host: opts.host,
    port,
    get bytesToServer() {
      return toServer;
    },
    get bytesFromServer() {
      return fromServer;
    },
    get connections() {
      return accepted;
    },
    close: () => {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of live) s.destroy();
        live.clear();
      });
      return closing;
    },
    [Symbol.asyncDispose]: () => relay.close(),
  };
  return relay;
}

async function listenOnOneOf(server: Server, host: string, ports: Iterable<number>, signal?: AbortSignal): Promise<number> {
  let tried = 0;
  let last: unknown;
  for (const port of ports) {
    if (tried++ >= 50) break;
    if (signal?.aborted) throw new ConvergenceError('ABORTED', 'aborted while starting the NBD relay', { cause: signal.reason });
    try {
      await new Promise<void>((resolve, reject) => {
        const onError = (err: Error): void => reject(err);
        server.once('error', onError);
        server.listen({ host, port, exclusive: true }, () => {
          server.off('error', onError);
          resolve();
        });
      });
      const addr = server.address();
      if (addr && typeof addr !== 'string') return addr.port;
      throw new ConvergenceError('RELAY_NO_PORT', `the NBD relay on ${host}:${port} has no TCP address`);
    } catch (err) {
      if (err instanceof ConvergenceError) throw err;
      const code = typeof err === 'object' && err !== null && 'code' in err ? err.code : undefined;
      if (code !== 'EADDRINUSE' && code !== 'EACCES') {
        throw new ConvergenceError('RELAY_LISTEN_FAILED', `the NBD relay cannot listen on ${host}:${port}: ${errorText(err)}`, { cause: err, context: { host, port } });
      }
      last = err;
    }
  }
  throw new ConvergenceError('RELAY_NO_PORT', `no free port for the NBD relay on ${host} after ${tried} tries: ${errorText(last)}`, { cause: last, context: { host } });
}
