/**
 * QEMU 7.2's way to a mirror that converges: the destination's disks are opened WITHOUT O_DIRECT
 * while the mirror fills them (launchVm's `bufferedDisks`), and get the spec's cache mode back
 * with `blockdev-reopen` once the guest runs there.
 *
 * Why: QEMU 7.2's NBD server does not set TCP_NODELAY on the socket it accepts. With an O_DIRECT
 * target each write's reply leaves while the previous segment is unacknowledged and waits out the
 * client's delayed ACK (~40 ms); a mirror of a writing guest then copies at a crawl and becomes
 * READY only at an instant when nothing is dirty and nothing in flight, which comes by luck
 * (issue 11; bench/mirror-ready.ts measures it). Through the page cache the replies go at once.
 *
 * Safe: a buffered node still honours flushes (cache.no-flush stays as the spec says), and the
 * mirror flushes its target before READY and again before it completes at switchover, so every
 * write the guest had acknowledged is on the destination's disk when the guest moves there.
 *
 * When: after `cont` on the destination (past the point of no return, as a tidy-up step). The
 * reopen drains the node's I/O for a few ms (3-27 ms measured, exported and in -incoming) and must
 * not add to the pause; a failure leaves the guest running with a safe cache mode, so it is a
 * warning, never a rollback. aio stays `threads`: file-posix cannot change it on reopen.
 */
import { errorText } from '../../errors.js';
import { QmpCommandError, type QmpClient } from '../../qmp/index.js';
import { cacheOptions, diskBlockdevs } from '../../qemu/argv.js';
import { diskNodeName, fileNodeName, type DiskSpec } from '../../qemu/spec.js';
import { ConvergenceError } from './errors.js';

/** The disks whose spec asks for O_DIRECT: the ones a buffered start changes, and a reopen restores. */
export function directDisks(disks: readonly DiskSpec[]): DiskSpec[] {
  return disks.filter((d) => cacheOptions(d.cache).direct);
}

export interface RestoreCacheResult {
  /** Disk ids reopened with O_DIRECT; empty when no disk's spec asks for it (nothing sent). */
  reopened: string[];
  /** How long QEMU took (the node's I/O is drained meanwhile). */
  ms: number;
}

/**
 * One `blockdev-reopen` (one transaction: all nodes or none) putting each O_DIRECT disk of
 * `disks` back to its spec's cache mode, then `query-named-block-nodes` to prove it. `disks`
 * must be the spec the destination was launched from with `bufferedDisks: true`.
 */
export async function restoreCacheModes(
  qmp: QmpClient,
  disks: readonly DiskSpec[],
  opts: { timeoutMs: number; signal?: AbortSignal },
): Promise<RestoreCacheResult> {
  const todo = directDisks(disks);
  if (todo.length === 0) return { reopened: [], ms: 0 };
  const call = { timeoutMs: opts.timeoutMs, ...(opts.signal ? { signal: opts.signal } : {}) };
  const options = todo.flatMap((d) => {
    const nodes = diskBlockdevs(d);
    // Opened with aio=threads (buffered); file-posix refuses to change aio on reopen.
    return [{ ...nodes.file, aio: 'threads' }, nodes.format];
  });
  const nodeNames = todo.flatMap((d) => [fileNodeName(d.id), diskNodeName(d.id)]);
  const started = performance.now();
  try {
    await qmp.executeRaw('blockdev-reopen', { options }, call);
  } catch (err) {
    throw new ConvergenceError('REOPEN_FAILED', `blockdev-reopen of ${nodeNames.join(', ')} with O_DIRECT failed: ${errorText(err)}`, {
      cause: err,
      context: { nodes: nodeNames, ...(err instanceof QmpCommandError ? { errorClass: err.errorClass, desc: err.desc } : {}) },
    });
  }
  const ms = performance.now() - started;
  const seen = await qmp.execute('query-named-block-nodes', { flat: true }, call);
  for (const name of nodeNames) {
    const node = seen.find((n) => n['node-name'] === name);
    if (!node?.cache.direct) {
      throw new ConvergenceError('REOPEN_UNVERIFIED', `after blockdev-reopen node ${name} is ${node ? 'still without O_DIRECT' : 'gone'}`, {
        context: { node: name, cache: node?.cache },
      });
    }
  }
  return { reopened: todo.map((d) => d.id), ms: Math.round(ms) };
}
