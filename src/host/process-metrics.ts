/**
 * prom-client's process metrics (CPU, memory, event loop lag, file descriptors, GC), once per
 * process and prefix: collecting them starts observers that live as long as the process, so a
 * test process that starts many agents starts them once, not once per agent. Each daemon's
 * /metrics merges this registry with its own.
 */
import { collectDefaultMetrics, Registry } from 'prom-client';

const registries = new Map<string, Registry>();

export function processRegistry(prefix: string): Registry {
  let r = registries.get(prefix);
  if (!r) {
    r = new Registry();
    collectDefaultMetrics({ register: r, prefix });
    registries.set(prefix, r);
  }
  return r;
}

/** The text format of a daemon's own registry followed by the process metrics. */
export async function renderWithProcess(own: Registry, prefix: string): Promise<{ contentType: string; body: string }> {
  const [mine, proc] = await Promise.all([own.metrics(), processRegistry(prefix).metrics()]);
  return { contentType: own.contentType, body: `${mine}\n${proc}` };
}
