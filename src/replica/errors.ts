/**
 * Errors of standby replication (issue 12). One root with a stable code:
 *
 *   ReplicaError
 *     SPACE            the standby lacks room for the replica (before protection starts)
 *     SYNC_FAILED      a sync did not complete; the previous consistent point stands
 *     SYNC_STALLED     a sync whose backups copied nothing for SYNC_STALL_MS: given up, as SYNC_FAILED
 *     NO_REPLICA       no consistent point exists (first sync not done, or replica released)
 *     SOURCE_RUNNING   recover refused: the source still runs the guest
 *     DAEMON           the standby's qemu-storage-daemon did not start or answer
 *     MANIFEST         the replica's manifest does not parse (set aside, never deleted)
 */
import { FerryError } from '../errors.js';

export class ReplicaError extends FerryError {
  override name = 'ReplicaError';
}
