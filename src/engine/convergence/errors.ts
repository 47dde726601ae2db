/**
 * Errors of the mirror-convergence helpers (src/engine/convergence/):
 *
 *   FerryError
 *   └── ConvergenceError          code:
 *         REOPEN_FAILED             blockdev-reopen refused; context: nodes, QEMU's class/desc
 *         REOPEN_UNVERIFIED         the reopen returned but a node does not show the mode asked for
 *         JOB_CHANGE_UNSUPPORTED    the QEMU has no block-job-change (it is 8.2 or later)
 *         JOB_CHANGE_FAILED         block-job-change refused; context: job
 *         NOT_SYNCED                the mirrors were not actively-synced in time; context: jobs seen
 *         MIRROR_GONE               a mirror vanished or failed while we waited; context: job
 *         ABORTED                   the caller's signal fired
 */
import { FerryError } from '../../errors.js';

export class ConvergenceError extends FerryError {
  override name = 'ConvergenceError';
}
