import { randomBytes } from 'node:crypto';

// QEMU node-names and job ids are at most 31 characters; disk ids are at most 16.

export function newMigrationId(): string {
  return randomBytes(4).toString('hex');
}

/** The destination's NBD export of a disk: unique per migration so a stale client cannot attach. */
export function exportName(migrationId: string, diskId: string): string {
  return `${EXPORT_PREFIX}${migrationId}-${diskId}`;
}

/** Prefixes of what ferry creates inside QEMU: recovery finds its own things by them. */
export const EXPORT_PREFIX = 'ferry-';
export const TARGET_NODE_PREFIX = 'ferry-nbd-';
export const MIRROR_JOB_PREFIX = 'ferry-mirror-';
export const STREAM_JOB_PREFIX = 'ferry-stream-';

/** The source's NBD client node that the mirror writes into. */
export function targetNodeName(diskId: string): string {
  return `${TARGET_NODE_PREFIX}${diskId}`;
}

export function mirrorJobId(diskId: string): string {
  return `${MIRROR_JOB_PREFIX}${diskId}`;
}

/** lazy mode: the destination's background copy of one disk from the source's export. */
export function streamJobId(diskId: string): string {
  return `${STREAM_JOB_PREFIX}${diskId}`;
}
