/**
 * QEMU >= 8.2's way to a mirror that converges (as Proxmox does): the bulk copy runs in
 * background mode, costing the guest nothing; once the first pass is done (BLOCK_JOB_READY), or
 * when READY has not come within a short bound, `block-job-change` turns each mirror to
 * write-blocking: from then on every guest write waits for the destination, nothing new gets
 * dirty, and the mirror soon reports `actively-synced` in query-block-jobs. It stays so until
 * switchover, so the cancel at switchover has nothing left to copy. The engine
 * (source-mirror.ts) waits for it beside the RAM phase when READY came first, and here
 * (convergeActively) when the bound passed without.
 *
 * There is no event for actively-synced: it is polled (query-block-jobs, every `pollMs`).
 */
import { z } from 'zod';
import { errorText } from '../../errors.js';
import { eventIs, QmpCommandError, QmpTimeoutError, type QmpCapabilities, type QmpClient } from '../../qmp/index.js';
import { ConvergenceError } from './errors.js';

/** Whether this QEMU can change a running mirror's copy mode (8.2 and later). */
export function canChangeCopyMode(caps: QmpCapabilities): boolean {
  return caps.hasCommand('block-job-change');
}

const mirrorJobSchema = z.looseObject({
  device: z.string(),
  type: z.string(),
  ready: z.boolean().optional(),
  status: z.string().optional(),
  'actively-synced': z.boolean().optional(),
});
const blockJobsSchema = z.array(mirrorJobSchema);

export interface ActiveSyncJob {
  job: string;
  /** READY came (in background mode) before the switch; false: the bound passed first. */
  readyBeforeSwitch: boolean;
  /** ms from the call to the block-job-change reply, and to actively-synced seen. */
  switchedAtMs: number;
  syncedAtMs: number;
}

export interface ActiveSyncOptions {
  /** Event cursor of the source taken before the blockdev-mirror commands. */
  since: number;
  /** How long to wait for READY in background mode before switching anyway. */
  readyBoundMs: number;
  /** Deadline for the whole: switch and actively-synced. */
  timeoutMs: number;
  signal?: AbortSignal;
  /** query-block-jobs interval while waiting for actively-synced; default 20 ms. */
  pollMs?: number;
  /** Called as each mirror is switched (for the summary: which path, and when). */
  onSwitch?: (e: { job: string; readyBeforeSwitch: boolean; atMs: number }) => void;
}

/**
 * Background until READY or `readyBoundMs`, then write-blocking, then actively-synced, for every
 * job in `jobIds` (mirrors started with copy-mode background by this QMP session's QEMU).
 * Resolves when every job is ready and actively-synced.
 */
export async function convergeActively(qmp: QmpClient, jobIds: readonly string[], opts: ActiveSyncOptions): Promise<ActiveSyncJob[]> {
  const started = performance.now();
  const switched = await switchToWriteBlocking(qmp, jobIds, opts);
  const remainingMs = Math.max(1_000, opts.timeoutMs - (performance.now() - started));
  const offset = Math.round(performance.now() - started);
  const synced = await waitActivelySynced(qmp, jobIds, { ...opts, timeoutMs: remainingMs });
  return jobIds.map((job) => ({ job, readyBeforeSwitch: switched.get(job)!.readyBeforeSwitch, switchedAtMs: switched.get(job)!.atMs, syncedAtMs: offset + synced.get(job)! }));
}

/**
 * Each job, once READY (or once `readyBoundMs` passed without), turned to write-blocking with
 * block-job-change. Resolves with when each was switched (ms from the call) and whether READY
 * came first.
 */
export async function switchToWriteBlocking(qmp: QmpClient, jobIds: readonly string[], opts: ActiveSyncOptions): Promise<Map<string, { readyBeforeSwitch: boolean; atMs: number }>> {
  const started = performance.now();
  const deadline = started + opts.timeoutMs;
  const signal = opts.signal;
  const call = (): { timeoutMs: number; signal?: AbortSignal } => ({ timeoutMs: Math.max(1_000, deadline - performance.now()), ...(signal ? { signal } : {}) });
  const switched = new Map<string, { readyBeforeSwitch: boolean; atMs: number }>();
  await Promise.all(
    jobIds.map(async (job) => {
      const readyBeforeSwitch = await qmp
        .waitForEvent((e) => eventIs(e, 'BLOCK_JOB_READY') && e.data.device === job, {
          since: opts.since,
          timeoutMs: opts.readyBoundMs,
          ...(signal ? { signal } : {}),
          what: `mirror ${job} to be READY`,
        })
        .then(
          () => true,
          (err: unknown) => {
            if (err instanceof QmpTimeoutError) return false;
            throw err;
          },
        );
      try {
        await qmp.executeRaw('block-job-change', { id: job, type: 'mirror', 'copy-mode': 'write-blocking' }, call());
      } catch (err) {
        throw new ConvergenceError('JOB_CHANGE_FAILED', `block-job-change of mirror ${job} to write-blocking failed: ${errorText(err)}`, {
          cause: err,
          context: { job, ...(err instanceof QmpCommandError ? { errorClass: err.errorClass, desc: err.desc } : {}) },
        });
      }
      const atMs = Math.round(performance.now() - started);
      switched.set(job, { readyBeforeSwitch, atMs });
      opts.onSwitch?.({ job, readyBeforeSwitch, atMs });
    }),
  );
  return switched;
}

/**
 * Until every job is READY and actively-synced (polled: there is no event for it). Resolves with
 * when each was first seen so, ms from the call; throws if a job ends, the deadline passes, or
 * `signal` fires.
 */
export async function waitActivelySynced(qmp: QmpClient, jobIds: readonly string[], opts: Pick<ActiveSyncOptions, 'timeoutMs' | 'signal' | 'pollMs'>): Promise<Map<string, number>> {
  const started = performance.now();
  const deadline = started + opts.timeoutMs;
  const signal = opts.signal;
  const call = (): { timeoutMs: number; signal?: AbortSignal } => ({ timeoutMs: Math.max(1_000, deadline - performance.now()), ...(signal ? { signal } : {}) });
  const synced = new Map<string, number>();
  let last: z.infer<typeof blockJobsSchema> = [];
  for (;;) {
    if (signal?.aborted) throw new ConvergenceError('ABORTED', 'aborted waiting for the mirrors to be actively-synced', { cause: signal.reason });
    const parsed = blockJobsSchema.safeParse(await qmp.executeRaw('query-block-jobs', undefined, call()));
    if (!parsed.success) throw new ConvergenceError('BAD_REPLY', `query-block-jobs: unexpected reply: ${parsed.error.message}`);
    last = parsed.data;
    for (const job of jobIds) {
      const info = last.find((j) => j.device === job);
      if (!info || ['concluded', 'aborting', 'null'].includes(info.status ?? '')) {
        throw new ConvergenceError('MIRROR_GONE', `mirror ${job} ${info ? `is ${info.status}` : 'is gone'} while waiting for actively-synced`, { context: { job } });
      }
      if (info.ready && info['actively-synced'] && !synced.has(job)) synced.set(job, Math.round(performance.now() - started));
    }
    if (synced.size === jobIds.length) return synced;
    if (performance.now() > deadline) {
      throw new ConvergenceError(
        'NOT_SYNCED',
        `mirrors not actively-synced within ${opts.timeoutMs} ms; last seen: ${last.map((j) => `${j.device} ready=${j.ready ?? '?'} actively-synced=${j['actively-synced'] ?? '?'}`).join(', ') || 'no jobs'}`,
        { context: { jobs: last } },
      );
    }
    await sleep(opts.pollMs ?? 20, signal);
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done(): void {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}
