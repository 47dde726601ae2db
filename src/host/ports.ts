import { createServer } from 'node:net';

/** Every port of the range once, from a random start, so concurrent migrations rarely collide. */
export function* randomOrder([lo, hi]: [number, number]): Iterable<number> {
  const span = hi - lo + 1;
  const start = Math.floor(Math.random() * span);
  for (let i = 0; i < span; i++) yield lo + ((start + i) % span);
}

/** A TCP port free on loopback right now (the kernel picks it): for tests and benchmarks. */
export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((res, rej) => s.once('error', rej).listen({ host: '127.0.0.1', port: 0 }, res));
  const a = s.address();
  await new Promise((r) => s.close(r));
  if (!a || typeof a === 'string') throw new Error('no address');
  return a.port;
}
