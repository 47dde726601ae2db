/**
 * How a pre-copy migration's mirrors are made to converge (issue 11), decided from what the two
 * QEMUs are, each side's piece in its own module:
 *
 *   relay        the destination's QEMU is older than 8.0: its NBD server does not set
 *                TCP_NODELAY, so it listens on a unix socket behind nbd-relay.ts (on the
 *                destination host), and the source's NBD client connects to the relay
 *   active-sync  the source's QEMU has block-job-change (8.2+): copy-mode `auto` runs the bulk copy
 *                in background mode and switches to write-blocking (active-sync.ts)
 *
 * Both can apply (a 10.0 source, a 7.2 destination); neither is needed on the way to READY when
 * both are recent, but active-sync keeps the mirrors synced up to the switchover.
 */
import type { QmpCapabilities, VersionInfo } from '../../qmp/index.js';
import type { MirrorConvergence } from '../types.js';
import { canChangeCopyMode } from './active-sync.js';
import { nbdServerNeedsRelay } from './nbd-relay.js';

export { canChangeCopyMode, convergeActively, switchToWriteBlocking, waitActivelySynced, type ActiveSyncJob, type ActiveSyncOptions } from './active-sync.js';
export { ConvergenceError } from './errors.js';
export { nbdServerNeedsRelay, startNbdRelay, type NbdRelay, type NbdRelayOptions } from './nbd-relay.js';

export type CopyModeChoice = 'auto' | 'background' | 'write-blocking';

export interface ConvergencePlan {
  /** Serve the destination's NBD exports through the relay. */
  relay: boolean;
  /** The copy-mode given to blockdev-mirror. */
  mirrorCopyMode: 'background' | 'write-blocking';
  /** After the mirrors start: convergeActively (background, then write-blocking). */
  activeSync: boolean;
  /** For the summary: which path, in words. */
  path: MirrorConvergence['path'];
}

/**
 * The plan for `copyMode` given the source's capabilities and the destination's version. An
 * explicit `background` or `write-blocking` is what QEMU does, nothing added (no relay). With
 * `auto` on a source without block-job-change the bulk copy stays background: behind the relay
 * a 7.2 mirror converges without costing the guest (bench/mirror-ready.ts).
 */
export function planConvergence(copyMode: CopyModeChoice, source: QmpCapabilities, destinationVersion: VersionInfo): ConvergencePlan {
  if (copyMode !== 'auto') return { relay: false, mirrorCopyMode: copyMode, activeSync: false, path: copyMode };
  const relay = nbdServerNeedsRelay(destinationVersion);
  const plus = relay ? '+relay' : '';
  if (canChangeCopyMode(source)) return { relay, mirrorCopyMode: 'background', activeSync: true, path: `auto:active-sync${plus}` };
  return { relay, mirrorCopyMode: 'background', activeSync: false, path: relay ? 'auto:background+relay' : 'auto:background' };
}
