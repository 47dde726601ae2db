/**
 * A TCP proxy on loopback that can stop forwarding without closing anything: after `blackhole()`
 * both directions are read and dropped, so each end sees a connection that is open and silent,
 * as with a peer whose host froze or a network that partitioned (a half-open connection).
 */
import { createConnection, createServer, type Server, type Socket } from 'node:net';

export interface Link {
  client: Socket;
  upstream: Socket;
  /** performance.now() when the upstream end (the server) closed its side, if it did. */
  upstreamClosedAt?: number;
  /** performance.now() when the downstream end (the client) closed its side, if it did. */
  clientClosedAt?: number;
}

export interface BlackholeProxy {
  port: number;
  links: Link[];
  /** From now on nothing crosses, in either direction, on every link (and new ones). */
  blackhole(): void;
  /** Resolves when some link's `which` end has closed (its peer dropped it); the time, ms. */
  closed(which: 'upstream' | 'client', timeoutMs: number): Promise<number>;
  close(): Promise<void>;
}

export async function startBlackholeProxy(target: { host: string; port: number }): Promise<BlackholeProxy> {
  let dark = false;
  const links: Link[] = [];
  const waiters = new Set<() => void>();
  const changed = (): void => {
    for (const w of waiters) w();
  };
  const server: Server = createServer((client) => {
    const upstream = createConnection(target);
    const link: Link = { client, upstream };
    links.push(link);
    const pipe = (from: Socket, to: Socket): void => {
      from.on('data', (b: Buffer) => void (dark || to.destroyed || to.write(b)));
      from.on('end', () => void (dark || to.end()));
      from.on('error', () => undefined);
    };
    pipe(client, upstream);
    pipe(upstream, client);
    upstream.on('close', () => {
      link.upstreamClosedAt = performance.now();
      if (!dark) client.destroy();
      changed();
    });
    client.on('close', () => {
      link.clientClosedAt = performance.now();
      if (!dark) upstream.destroy();
      changed();
    });
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('the proxy has no TCP address');
  return {
    port: address.port,
    links,
    blackhole: () => void (dark = true),
    closed: (which, timeoutMs) =>
      new Promise<number>((resolve, reject) => {
        const at = (): number | undefined => links.map((l) => (which === 'upstream' ? l.upstreamClosedAt : l.clientClosedAt)).find((t) => t !== undefined);
        const check = (): void => {
          const t = at();
          if (t === undefined) return;
          clearTimeout(timer);
          waiters.delete(check);
          resolve(t);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`no ${which} end closed within ${timeoutMs} ms (${links.length} links)`));
        }, timeoutMs);
        waiters.add(check);
        check();
      }),
    close: async () => {
      for (const l of links) {
        l.client.destroy();
        l.upstream.destroy();
      }
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
