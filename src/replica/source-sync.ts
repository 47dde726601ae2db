/**
 * The source side of a sync, over the running VM's QMP. Each protected disk carries a persistent
 * dirty bitmap `ferry-replica-<k>` recording every write since the start of sync k, the replica's
 * consistent point. Sync k+1 is ONE transaction that, for every disk at the same instant, adds
 * bitmap k+1 and starts a blockdev-backup (sync `bitmap`, bitmap k, bitmap-mode `never`) into an
 * NBD client node of the standby's export. Backup is point-in-time (copy-before-write): what it
 * writes is the disks as they were at that instant, whatever the guest writes meanwhile.
 *
 * bitmap-mode `never` leaves bitmap k as it was plus every write during the job, so until the
 * standby says sync k+1 is consistent both bitmaps stand and either can serve the next sync:
 *   standby consistent at k+1 → sourceCommitBitmaps drops k
 *   the sync failed anywhere  → sourceAbortSync drops k+1 (k still covers everything since k)
 * The first sync has no bitmap to read: sync `full`.
 */
import { z } from 'zod';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { writeCredentialDirs, type HostTlsMaterial } from '../host/data-tls.js';
import { diskNodeName } from '../qemu/spec.js';
import { eventIs, type QmpClient } from '../qmp/index.js';
import { cancelJob, deleteNode } from '../engine/primitives.js';
import { errorText } from '../errors.js';
import { ReplicaError } from './errors.js';
import { SYNC_BITMAP_RE, SYNC_TLS_CREDS, SYNC_TLS_DIR, syncBitmapName, syncJobId, syncTargetNode } from './names.js';
import type { ReplicaTarget } from './standby-daemon.js';

const CMD = { timeoutMs: 30_000 };

/**
 * A sync whose backups copied nothing for this long is given up (SYNC_STALLED): a standby gone
 * silent (a link cut for good sends no RST) would otherwise hold the sync, its jobs and its NBD
 * nodes on the source for as long as TCP keeps retrying, and the loop with it (issue 17's cell
 * sync/link-cut-forever). A backup's offset moves every chunk (64 KiB: half a second even at
 * 1 Mbit/s), and a blip of a few seconds is retried by TCP well inside the bound.
 */
export const SYNC_STALL_MS = 20_000;
const STALL_POLL_MS = 1_000;

export interface SyncOutcome {
  seq: number;
  /** Wall clock just before the transaction: every write acknowledged before it is in the sync. */
  pointAt: number;
  /** The same instant on this process's monotonic clock (tests compare it with serial lines). */
  pointAtMono: number;
  /** Bytes the backups copied (the dirty chunks), over all disks. */
  bytes: number;
  durationMs: number;
}

/** The NBD client node a backup of `diskId` writes to; over TLS when `tlsHostname` is given (the standby's name its certificate must hold). */
export function syncTargetArguments(diskId: string, target: ReplicaTarget, tlsHostname?: string): Record<string, unknown> {
  return {
    driver: 'nbd',
    'node-name': syncTargetNode(diskId),
    server: { type: 'inet', host: target.host, port: String(target.port) },
    export: target.exports[diskId],
    ...(tlsHostname ? { 'tls-creds': SYNC_TLS_CREDS, 'tls-hostname': tlsHostname } : {}),
  };
}

/**
 * TLS for one sync: the host's certificate written into `<runDir>/replica-tls` (0700) and a
 * tls-creds-x509 client object (verify-peer: the standby's certificate must chain to the fleet CA
 * and name `hostname`). Whatever an earlier sync left is replaced; syncEndTls undoes it.
 */
export interface SyncTls {
  material: HostTlsMaterial;
  runDir: string;
  hostname: string;
}

async function syncBeginTls(q: QmpClient, tls: SyncTls): Promise<void> {
  await syncEndTls(q, tls.runDir);
  const { clientDir } = await writeCredentialDirs(join(tls.runDir, SYNC_TLS_DIR), tls.material);
  await q.executeRaw('object-add', { 'qom-type': 'tls-creds-x509', id: SYNC_TLS_CREDS, dir: clientDir, endpoint: 'client', 'verify-peer': true }, CMD);
}

/** The sync's TLS object (once no NBD node uses it) and its files go. Idempotent. */
export async function syncEndTls(q: QmpClient, runDir: string): Promise<void> {
  const objects = z.array(z.object({ name: z.string() }).passthrough()).parse(await q.executeRaw('qom-list', { path: '/objects' }, CMD));
  if (objects.some((o) => o.name === SYNC_TLS_CREDS)) await q.executeRaw('object-del', { id: SYNC_TLS_CREDS }, CMD);
  await rm(join(runDir, SYNC_TLS_DIR), { recursive: true, force: true });
}

/**
 * One sync: `previous` is the seq whose bitmap the source holds (null: a full copy). Resolves once
 * every backup completed and the NBD client nodes are gone; on any failure everything it made on
 * the source is undone (the new bitmap too) and it rejects with SYNC_FAILED.
 */
export async function sourceSync(
  q: QmpClient,
  input: { disks: readonly { id: string }[]; seq: number; previous: number | null; target: ReplicaTarget; tls?: SyncTls | undefined; timeoutMs: number; stallMs?: number; signal?: AbortSignal },
): Promise<SyncOutcome> {
  const { disks, seq, previous, target, tls } = input;
  const started = performance.now();
  try {
    for (const d of disks) await deleteNode(q, syncTargetNode(d.id), CMD.timeoutMs);
    if (tls) await syncBeginTls(q, tls);
    for (const d of disks) await q.executeRaw('blockdev-add', syncTargetArguments(d.id, target, tls?.hostname), CMD);
    const actions = disks.flatMap((d) => [
      { type: 'block-dirty-bitmap-add', data: { node: diskNodeName(d.id), name: syncBitmapName(seq), persistent: true } },
      {
        type: 'blockdev-backup',
        data: {
          'job-id': syncJobId(d.id),
          device: diskNodeName(d.id),
          target: syncTargetNode(d.id),
          ...(previous === null ? { sync: 'full' } : { sync: 'bitmap', bitmap: syncBitmapName(previous), 'bitmap-mode': 'never' }),
        },
      },
    ]);
    const since = q.eventCursor();
    const pointAt = Date.now();
    const pointAtMono = performance.now();
    // No 'grouped' completion: QEMU 7.2 refuses it beside block-dirty-bitmap-add; a failed job fails the sync anyway.
    await q.executeRaw('transaction', { actions }, CMD);
    let bytes = 0;
    const stalled = new AbortController();
    const waits = Promise.all(
      disks.map(async (d) => {
        const id = syncJobId(d.id);
        const ev = await q.waitForEvent((e) => (eventIs(e, 'BLOCK_JOB_COMPLETED') || eventIs(e, 'BLOCK_JOB_CANCELLED')) && e.data.device === id, {
          since,
          timeoutMs: input.timeoutMs,
          signal: input.signal ? AbortSignal.any([input.signal, stalled.signal]) : stalled.signal,
          what: `replica backup ${id} to complete`,
        });
        if (!eventIs(ev, 'BLOCK_JOB_COMPLETED') || ev.data.error !== undefined) {
          throw new ReplicaError('SYNC_FAILED', `backup of disk '${d.id}' for sync ${seq} ended without completing: ${eventIs(ev, 'BLOCK_JOB_COMPLETED') ? ev.data.error : 'cancelled'}`);
        }
        bytes += ev.data.len;
      }),
    );
    const watch = watchProgress(q, disks.map((d) => syncJobId(d.id)), { stallMs: input.stallMs ?? SYNC_STALL_MS, stop: stalled.signal });
    waits.catch(() => undefined);
    watch.catch(() => undefined);
    try {
      await Promise.race([waits, watch]);
    } catch (err) {
      if (err instanceof ReplicaError && err.code === 'SYNC_STALLED') await yankTargets(q, disks);
      throw err;
    } finally {
      stalled.abort();
    }
    for (const d of disks) await deleteNode(q, syncTargetNode(d.id), CMD.timeoutMs);
    if (tls) await syncEndTls(q, tls.runDir);
    return { seq, pointAt, pointAtMono, bytes, durationMs: Math.round(performance.now() - started) };
  } catch (err) {
    await sourceAbortSync(q, { disks, seq }).catch(() => undefined);
    if (tls) await syncEndTls(q, tls.runDir).catch(() => undefined);
    if (err instanceof ReplicaError) throw err;
    throw new ReplicaError('SYNC_FAILED', `sync ${seq} failed on the source: ${errorText(err)}`, { cause: err });
  }
}

/**
 * Rejects with SYNC_STALLED once no job of the sync moved its offset for `stallMs`; else it ends
 * quietly when `stop` fires (the sync settled first). A job QEMU no longer lists ended: its
 * event settles the sync.
 */
async function watchProgress(q: QmpClient, jobIds: readonly string[], opts: { stallMs: number; stop: AbortSignal }): Promise<void> {
  let last = new Map<string, number>();
  let movedAt = performance.now();
  while (!opts.stop.aborted) {
    await new Promise((r) => setTimeout(r, STALL_POLL_MS));
    if (opts.stop.aborted) break;
    const jobs = await q.execute('query-block-jobs', undefined, CMD).catch(() => undefined);
    if (!jobs) continue;
    const now = new Map(jobs.filter((j) => jobIds.includes(j.device)).map((j) => [j.device, j.offset] as const));
    if (now.size < jobIds.length || [...now].some(([id, offset]) => last.get(id) !== offset)) movedAt = performance.now();
    last = now;
    if (performance.now() - movedAt > opts.stallMs) {
      throw new ReplicaError('SYNC_STALLED', `the replica backups ${jobIds.join(', ')} copied nothing for ${Math.round(opts.stallMs / 1000)} s: the standby does not take the data (link or standby gone silent)`);
    }
  }
}

/**
 * A stalled sync's NBD client nodes are cut (QEMU's yank): their requests wait on a silent
 * connection, and the job's cancel and the node's deletion would wait with them.
 */
async function yankTargets(q: QmpClient, disks: readonly { id: string }[]): Promise<void> {
  for (const d of disks) {
    await q.executeRaw('yank', { instances: [{ type: 'block-node', 'node-name': syncTargetNode(d.id) }] }, CMD).catch(() => undefined);
  }
}

/** Undo of a sync on the source: its jobs cancelled, its target nodes and its new bitmap gone. Idempotent. */
export async function sourceAbortSync(q: QmpClient, input: { disks: readonly { id: string }[]; seq: number }): Promise<void> {
  for (const d of input.disks) {
    await cancelJob(q, syncJobId(d.id)).catch(() => undefined);
    await deleteNode(q, syncTargetNode(d.id), CMD.timeoutMs).catch(() => undefined);
    await removeBitmap(q, d.id, syncBitmapName(input.seq));
  }
}

/** The standby holds sync `seq` as its consistent point: every older replica bitmap goes. */
export async function sourceCommitBitmaps(q: QmpClient, input: { disks: readonly { id: string }[]; seq: number }): Promise<void> {
  for (const d of input.disks) {
    for (const b of await replicaBitmaps(q, d.id)) if (b.seq < input.seq) await removeBitmap(q, d.id, syncBitmapName(b.seq));
  }
}

/**
 * After a restart of whoever drives the syncs: keeps the bitmap of the standby's consistent seq if
 * every disk has it intact, and returns that seq; otherwise removes every replica bitmap and
 * returns null (the next sync is full).
 */
export async function sourceReconcileBitmaps(q: QmpClient, input: { disks: readonly { id: string }[]; consistentSeq: number | null }): Promise<number | null> {
  const keep = input.consistentSeq;
  let usable = keep !== null;
  for (const d of input.disks) {
    const b = (await replicaBitmaps(q, d.id)).find((x) => x.seq === keep);
    if (!b || b.inconsistent) usable = false;
  }
  for (const d of input.disks) {
    for (const b of await replicaBitmaps(q, d.id)) if (!usable || b.seq !== keep) await removeBitmap(q, d.id, syncBitmapName(b.seq));
  }
  return usable ? keep : null;
}

/** Unprotect: every replica bitmap removed from every disk. */
export async function sourceRemoveReplicaBitmaps(q: QmpClient, disks: readonly { id: string }[]): Promise<void> {
  for (const d of disks) for (const b of await replicaBitmaps(q, d.id)) await removeBitmap(q, d.id, syncBitmapName(b.seq));
}

const bitmapListSchema = z.array(
  z.object({ 'node-name': z.string().optional(), 'dirty-bitmaps': z.array(z.object({ name: z.string().optional(), inconsistent: z.boolean().optional(), count: z.number() })).optional() }).passthrough(),
);

/** The replica bitmaps on a disk's node, with their seq. */
export async function replicaBitmaps(q: QmpClient, diskId: string): Promise<{ seq: number; inconsistent: boolean; count: number }[]> {
  const nodes = bitmapListSchema.parse(await q.executeRaw('query-named-block-nodes', { flat: true }, CMD));
  const node = nodes.find((n) => n['node-name'] === diskNodeName(diskId));
  const out: { seq: number; inconsistent: boolean; count: number }[] = [];
  for (const b of node?.['dirty-bitmaps'] ?? []) {
    const m = b.name ? SYNC_BITMAP_RE.exec(b.name) : null;
    if (m) out.push({ seq: Number(m[1]), inconsistent: b.inconsistent ?? false, count: b.count });
  }
  return out;
}

async function removeBitmap(q: QmpClient, diskId: string, name: string): Promise<void> {
  const have = (await replicaBitmaps(q, diskId)).some((b) => syncBitmapName(b.seq) === name);
  if (have) await q.executeRaw('block-dirty-bitmap-remove', { node: diskNodeName(diskId), name }, CMD);
}
