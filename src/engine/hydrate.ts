/**
 * Hydration until done, the one loop behind lazy mode's live hydration and the crash recovery's
 * (recover.ts). block-stream per disk pulls what the overlay lacks from its backing (the source's
 * export), at a rate cap; a stream that fails, or vanishes, is started again (it skips what already
 * arrived). It is done only when every overlay has lost its backing: proof, read from QEMU, that no
 * block is left on the source. No AbortSignal: it runs past the point of no return, where the guest
 * needs every block; only the stall deadline and the attempts bound it.
 */
import { FerryError } from '../errors.js';
import { eventIs, QmpTimeoutError, type QmpClient } from '../qmp/index.js';
import { diskNodeName } from '../qemu/spec.js';
import { streamJobId } from './names.js';

export class HydrationError extends FerryError {
  override name = 'HydrationError';
}

export interface HydrateDisk {
  id: string;
  virtualSize: number;
}

export interface DiskHydration {
  id: string;
  doneBytes: number;
  totalBytes: number;
}

export interface HydrateOptions {
  /** Cap per stream, bytes/s; undefined: as fast as it goes. */
  bytesPerSec?: number | undefined;
  /** Fail when no byte moved for this long, ms. */
  stallMs: number;
  /** Streams started per disk before giving up. */
  attempts: number;
  /** Deadline of each QMP command, ms. */
  timeoutMs: number;
  /** Interval between polls, ms (a job event wakes the poll early). */
  pollMs: number;
  /** Called at each poll with every disk's progress. */
  onPoll?: (disks: DiskHydration[]) => Promise<void> | void;
  /** Called once the streams ended, before they let go of their backing (the NBD connection). */
  beforeRelease?: () => Promise<void> | void;
  /** A failed attempt that will be retried. */
  onRetry?: (attempt: number, why: string) => void;
}

/** Streams every disk until its overlay stands alone. Throws HydrationError (HYDRATION_STALLED, HYDRATION_FAILED). */
export async function hydrate(q: QmpClient, disks: HydrateDisk[], opts: HydrateOptions): Promise<void> {
  const call = { timeoutMs: opts.timeoutMs };
  let pending = disks.map((d) => d.id);
  for (let attempt = 1; pending.length > 0; attempt++) {
    const since = q.eventCursor();
    await startStreams(q, pending, opts);
    const ended = await waitStreamsEnded(q, disks, pending, since, opts);
    await opts.beforeRelease?.();
    const failed = await releaseStreams(q, ended, call);
    // A stream that vanished (cancelled, dismissed by someone else) or ended early left the
    // overlay backed: only the block graph proves the data is all here.
    const nodes = await q.execute('query-named-block-nodes', { flat: true }, call);
    for (const id of pending) {
      const backed = nodes.find((n) => n['node-name'] === diskNodeName(id))?.backing_file;
      if (backed && !failed.some((f) => f.id === id)) failed.push({ id, error: 'the stream ended but the overlay still has its backing' });
    }
    pending = failed.map((f) => f.id);
    if (pending.length === 0) return;
    const why = failed.map((f) => `${f.id}: ${f.error}`).join('; ');
    if (attempt >= opts.attempts) throw new HydrationError('HYDRATION_FAILED', `hydration failed after ${attempt} attempts (${why})`, { context: { disks: pending } });
    opts.onRetry?.(attempt, why);
    await new Promise((r) => setTimeout(r, 1_000));
  }
}

/** A stream per disk; one already there (a dead engine's, still running) is adopted, not doubled. */
async function startStreams(q: QmpClient, ids: string[], opts: HydrateOptions): Promise<void> {
  const call = { timeoutMs: opts.timeoutMs };
  const jobs = await q.execute('query-jobs', undefined, call);
  for (const id of ids) {
    const jobId = streamJobId(id);
    const old = jobs.find((j) => j.id === jobId);
    if (old && old.status !== 'concluded' && old.status !== 'null') continue;
    if (old) await q.execute('job-dismiss', { id: jobId }, call);
    await q.execute(
      'block-stream',
      { 'job-id': jobId, device: diskNodeName(id), 'auto-finalize': false, 'auto-dismiss': false, ...(opts.bytesPerSec ? { speed: opts.bytesPerSec } : {}) },
      call,
    );
  }
}

/**
 * Polls until every stream has ended (pending: waiting for finalize with its backing still
 * attached; concluded; or gone). Returns the streams that are still there to release.
 */
async function waitStreamsEnded(q: QmpClient, disks: HydrateDisk[], pending: string[], since: number, opts: HydrateOptions): Promise<{ id: string; status: string }[]> {
  const call = { timeoutMs: opts.timeoutMs };
  let lastDone = -1;
  let lastMoved = performance.now();
  let cursor = since;
  for (;;) {
    const blockJobs = await q.execute('query-block-jobs', undefined, call);
    const progress = disks.map((d) => {
      const job = blockJobs.find((j) => j.device === streamJobId(d.id));
      const finished = !pending.includes(d.id) || job?.status === 'pending' || job?.status === 'concluded';
      return { id: d.id, doneBytes: finished && !job?.len ? d.virtualSize : (job?.offset ?? 0), totalBytes: job?.len || d.virtualSize };
    });
    await opts.onPoll?.(progress);
    const jobs = await q.execute('query-jobs', undefined, call);
    const ours = pending.map((id) => ({ id, status: jobs.find((j) => j.id === streamJobId(id))?.status }));
    if (ours.every((o) => o.status === undefined || o.status === 'pending' || o.status === 'concluded')) {
      return ours.flatMap((o) => (o.status === undefined ? [] : [{ id: o.id, status: o.status }]));
    }
    const done = progress.reduce((sum, d) => sum + d.doneBytes, 0);
    if (done !== lastDone) {
      lastDone = done;
      lastMoved = performance.now();
    } else if (performance.now() - lastMoved > opts.stallMs) {
      throw new HydrationError('HYDRATION_STALLED', `hydration made no progress for ${opts.stallMs} ms (at ${done} bytes)`, { context: { disks: pending } });
    }
    try {
      await q.waitForEvent((e) => e.event === 'JOB_STATUS_CHANGE' || e.event === 'BLOCK_JOB_ERROR', { since: cursor, timeoutMs: opts.pollMs });
    } catch (err) {
      if (!(err instanceof QmpTimeoutError)) throw err;
    }
    cursor = q.eventCursor();
  }
}

/** Finalizes the streams waiting in 'pending', waits for them to conclude, dismisses them; returns those that failed. */
async function releaseStreams(q: QmpClient, ended: { id: string; status: string }[], call: { timeoutMs: number }): Promise<{ id: string; error: string }[]> {
  const since = q.eventCursor();
  for (const e of ended) if (e.status === 'pending') await q.execute('job-finalize', { id: streamJobId(e.id) }, call);
  for (const e of ended) {
    if (e.status !== 'pending') continue;
    const id = streamJobId(e.id);
    await q.waitForEvent((ev) => eventIs(ev, 'JOB_STATUS_CHANGE') && ev.data.id === id && ev.data.status === 'concluded', { since, timeoutMs: call.timeoutMs, what: `stream ${id} to conclude` });
  }
  const failed: { id: string; error: string }[] = [];
  const final = await q.execute('query-jobs', undefined, call);
  for (const e of ended) {
    const job = final.find((j) => j.id === streamJobId(e.id));
    if (job?.error) failed.push({ id: e.id, error: job.error });
    if (job) await q.execute('job-dismiss', { id: streamJobId(e.id) }, call);
  }
  return failed;
}
