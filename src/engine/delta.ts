/**
 * Evacuation by delta (issue 12): a protected VM migrates to the host that holds its standby
 * replica, and only what changed since the replica's consistent point crosses the wire (plus
 * RAM). What the engine needs of that replica is this interface; src/replica/ implements it.
 *
 * The destination's disks are fresh qcow2 overlays on the replica's chains (destination-delta.ts),
 * so a rolled-back evacuation removes them and the replica is as it was. The source's bitmap
 * `ferry-replica-<seq>` records every write since that point; repeated blockdev-backup passes
 * (source-delta.ts) copy the dirty blocks into the destination's exports while the guest runs,
 * and the last pass runs in the pause at pre-switchover, like RAM pre-copy's last round.
 */

export interface DeltaReplica {
  /** The replica's consistent seq: the source's bitmap ferry-replica-<seq> covers every write since. */
  readonly seq: number;
  /**
   * On the destination host: the replica lets go of its chains and a qcow2 overlay on each disk's
   * chain top is made at `path` (the destination disk). Refuses if a path exists.
   */
  prepareOverlays(disks: { id: string; path: string; virtualSize: number }[], opts: { signal?: AbortSignal }): Promise<void>;
  /** Undo of prepareOverlays: overlays removed, the replica served again. Idempotent, never cancelled. */
  restore(paths: string[]): Promise<void>;
}

/** Names of the source's per-pass bitmaps: non-persistent, gone when the source QEMU goes. */
export const deltaBitmapName = (pass: number): string => `ferry-delta-${pass}`;
export const deltaJobId = (diskId: string): string => `ferry-delta-${diskId}`;
/** The replica's bitmaps (src/replica/names.ts) and the passes': not a user's, never migrated. */
export const isFerryReplicationBitmap = (name: string): boolean => /^ferry-(replica|delta)-\d+$/.test(name);
