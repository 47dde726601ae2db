import { FerryError } from '../errors.js';

/**
 * The agent's refusals and failures. Stable codes a caller may branch on, among them:
 *   VM_NOT_FOUND, VM_EXISTS, VM_RUNNING, VM_NOT_RUNNING, NOT_MIGRATED, NOT_INCOMING, GUEST_RUNS_HERE
 *   PATH_REFUSED      a path outside the roots, through a symbolic link, or the root itself
 *   RUNDIR_REFUSED    a run dir that would hold (or sit inside) what is not this VM's own
 *   NOT_YOURS         a path or VM of another principal
 *   PATH_IN_USE       a disk another VM of yours uses while it runs
 *   EXTRA_ARGS_REFUSED raw QEMU options in a spec that came over the API
 *   RELAY_EXISTS      dest.startNbdRelay for a VM that has one already
 */
export class AgentError extends FerryError {
  override name = 'AgentError';
}
