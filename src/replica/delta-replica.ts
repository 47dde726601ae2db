/**
 * A StandbyReplica as the engine's DeltaReplica (src/engine/delta.ts), on the host that holds it:
 * the daemon lets go of the chains and each destination disk is a qcow2 overlay on its chain top.
 * After a successful evacuation the replica is the VM's disk (released, never removed by
 * unprotect); a rolled-back one removes the overlays and serves the replica again.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import { dirname } from 'node:path';
import { promisify } from 'node:util';
import type { DeltaReplica } from '../engine/delta.js';
import { ReplicaError } from './errors.js';
import type { StandbyReplica } from './standby-daemon.js';

const run = promisify(execFile);

export function replicaDelta(replica: StandbyReplica, opts: { allowReleased?: boolean } = {}): DeltaReplica {
  const consistent = replica.manifest.consistent;
  if (!consistent || (replica.manifest.state !== 'active' && !opts.allowReleased)) {
    throw new ReplicaError('NO_REPLICA', `the replica of ${replica.manifest.vm} has no consistent point to evacuate onto`, { userError: true });
  }
  return {
    seq: consistent.seq,
    prepareOverlays: async (disks) => {
      for (const d of disks) if (existsSync(d.path)) throw new ReplicaError('EXISTS', `destination disk ${d.path} exists`, { userError: true });
      const { tops } = await replica.release();
      for (const d of disks) {
        const top = tops[d.id];
        if (!top) throw new ReplicaError('NO_REPLICA', `the replica has no disk '${d.id}'`);
        await mkdir(dirname(d.path), { recursive: true });
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', top, '-F', 'qcow2', d.path, String(d.virtualSize)]);
      }
    },
    restore: async (paths) => {
      for (const p of paths) await rm(p, { force: true });
      await replica.reactivate();
    },
  };
}
