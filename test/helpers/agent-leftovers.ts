/**
 * What real agents may leave running after a test: the QEMUs their records name, and the replica
 * daemons (qemu-storage-daemon) that outlive their agents by design, named by their manifests.
 * Read from the storage roots after the agents closed, so afterAll can kill them by PID.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';

export async function agentLeftoverPids(roots: string[]): Promise<number[]> {
  const pids: number[] = [];
  for (const root of roots) {
    for (const f of await readdir(join(root, '.ferry-agent', 'vms')).catch(() => [] as string[])) {
      const rec = JSON.parse(await readFile(join(root, '.ferry-agent', 'vms', f), 'utf8').catch(() => '{}')) as { pid?: number };
      if (rec.pid) pids.push(rec.pid);
    }
    for (const d of await readdir(join(root, 'replicas')).catch(() => [] as string[])) {
      const m = JSON.parse(await readFile(join(root, 'replicas', d, 'manifest.json'), 'utf8').catch(() => '{}')) as { daemon?: { pid?: number } | null };
      if (m.daemon?.pid) pids.push(m.daemon.pid);
    }
  }
  return pids;
}
