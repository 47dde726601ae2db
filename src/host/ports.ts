/** Every port of the range once, from a random start, so concurrent migrations rarely collide. */
export function* randomOrder([lo, hi]: [number, number]): Iterable<number> {
  const span = hi - lo + 1;
  const start = Math.floor(Math.random() * span);
  for (let i = 0; i < span; i++) yield lo + ((start + i) % span);
}
