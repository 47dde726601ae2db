/**
 * Errors of the mirror-convergence helpers (src/engine/convergence/):
 *
 *   FerryError
 *   └── ConvergenceError          code:
 *         JOB_CHANGE_UNSUPPORTED    the QEMU has no block-job-change (it is 8.2 or later)
 *         JOB_CHANGE_FAILED         block-job-change refused; context: job
 *         NOT_SYNCED                the mirrors were not actively-synced in time; context: jobs seen
 *         MIRROR_GONE               a mirror vanished or failed while we waited; context: job
 *         BAD_REPLY                 QEMU's reply did not parse
 *         RELAY_NO_PORT             the NBD relay found no free port among the candidates
 *         RELAY_LISTEN_FAILED       the NBD relay cannot listen (bad host, ...); context: host, port
 *         ABORTED                   the caller's signal fired
 */
import { FerryError } from '../../errors.js';

export class ConvergenceError extends FerryError {
  override name = 'ConvergenceError';
}
