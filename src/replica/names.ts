/** Names of the QEMU objects replication makes, built here only. */

/** The source's persistent dirty bitmap that records writes since the start of sync `seq`. */
export const syncBitmapName = (seq: number): string => `ferry-replica-${seq}`;
export const SYNC_BITMAP_RE = /^ferry-replica-(\d+)$/;

/** The source's NBD client node a sync's backup of `diskId` writes into. */
export const syncTargetNode = (diskId: string): string => `ferry-replica-target-${diskId}`;
/** The source's backup job of one disk in one sync. */
export const syncJobId = (diskId: string): string => `ferry-replica-${diskId}`;
/** The standby's export of the overlay that receives sync `seq` of `diskId`. */
export const syncExportName = (vm: string, diskId: string, seq: number): string => `replica-${vm}-${diskId}-${seq}`;
/** The standby daemon's node of one layer (0 = base) of a disk's replica chain. */
export const layerNode = (diskId: string, seq: number): string => `r-${diskId}-${seq}`;
/**
 * The source QEMU's tls-creds-x509 (client) for a sync over TLS: its own id, not the migration's
 * (src/host/data-tls.ts), so a sync and a migration's objects never replace each other.
 */
export const SYNC_TLS_CREDS = 'ferry-replica-tls';
/** The folder of that object's files in the VM's run dir (0700), there only during a sync. */
export const SYNC_TLS_DIR = 'replica-tls';
