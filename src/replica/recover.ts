/**
 * Failover: the VM boots on the standby from the replica's last consistent point, when its source
 * host is gone. Refused, changing nothing, unless the source can be shown not to run the guest
 * (SourceEndpoint.sourceGone: its socket refuses, its agent says the QEMU died): never two copies.
 */
import type { SourceEndpoint } from '../engine/endpoint.js';
import type { VmSpec } from '../qemu/spec.js';
import { ReplicaError } from './errors.js';
import type { StandbyReplica } from './standby-daemon.js';

export interface RecoveredPoint {
  seq: number;
  /** Wall clock of the consistent point the VM booted from. */
  pointAt: number;
  /** failedAt - pointAt: the writes of this window are lost (the RPO at failure). */
  rpoMs: number;
  /** The spec the VM was started with: its disks are the replica's chains. */
  spec: VmSpec;
}

/**
 * Checks the source is gone, releases the replica (daemon quits, chains committed) and returns
 * the spec to boot; the caller starts it (an agent through its own launcher, a test directly).
 * `failedAt`: when the source was last known to run the guest (default: now, an upper bound).
 */
export async function prepareRecovery(input: {
  spec: VmSpec;
  source: Pick<SourceEndpoint, 'sourceGone' | 'name'>;
  replica: StandbyReplica;
  runDir: string;
  failedAt?: number;
}): Promise<RecoveredPoint> {
  if (!(await input.source.sourceGone())) {
    throw new ReplicaError('SOURCE_RUNNING', `refusing to recover ${input.spec.name} from its replica: the source ${input.source.name} still runs it (or cannot be shown not to); migrate it instead`, {
      userError: true,
    });
  }
  const consistent = input.replica.manifest.consistent;
  if (!consistent) throw new ReplicaError('NO_REPLICA', `the replica of ${input.spec.name} has no consistent point: nothing to recover from`, { userError: true });
  const { tops } = await input.replica.release();
  const spec: VmSpec = {
    ...input.spec,
    runDir: input.runDir,
    disks: input.spec.disks.map((d) => {
      const path = tops[d.id];
      if (!path) throw new ReplicaError('NO_REPLICA', `the replica of ${input.spec.name} has no disk '${d.id}'`);
      return { ...d, path, format: 'qcow2' as const };
    }),
  };
  const failedAt = input.failedAt ?? Date.now();
  return { seq: consistent.seq, pointAt: consistent.pointAt, rpoMs: Math.max(0, failedAt - consistent.pointAt), spec };
}
