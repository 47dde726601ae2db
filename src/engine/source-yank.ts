/**
 * The rollback's cut of the source from a destination that is dead or cannot be reached. The
 * source's NBD client waits for replies on a connection nobody answers (a partition sends no
 * RST), and every block operation on the source (a mirror's cancel, blockdev-del, the drain
 * inside `cont`) waits with it until TCP gives up. QEMU's `yank` (6.0) shuts such connections
 * down at once: in-flight requests fail, and the steps after it succeed. Only ferry's own NBD
 * client nodes and the migration are yanked, and only instances QEMU lists (`query-yank`): yank
 * refuses the whole list if one of them is not registered.
 *
 * With OOB negotiated the yank goes out-of-band, one instance per command, named blindly: a
 * destination that fell silent inside the switchover leaves the source's main loop waiting on
 * the NBD client (the guest's stop drains its requests, the BQL held), so no in-band command,
 * `query-yank` included, is answered until TCP gives up. QEMU runs an OOB `yank` in the
 * monitor's own thread; an instance that is not registered is refused alone.
 */
import { z } from 'zod';
import { QmpCommandError, type QmpCapabilities, type QmpClient } from '../qmp/index.js';
import { TARGET_NODE_PREFIX, targetNodeName } from './names.js';

const YankInstanceSchema = z.union([
  z.object({ type: z.literal('block-node'), 'node-name': z.string() }).loose(),
  z.object({ type: z.literal('migration') }).loose(),
  z.object({ type: z.string() }).loose(),
]);
const QueryYankSchema = z.array(YankInstanceSchema);

export type YankInstance = { type: 'block-node'; 'node-name': string } | { type: 'migration' };

/** ferry's yankable connections to the destination, out of what `query-yank` lists. */
export function destinationYankInstances(listed: unknown): YankInstance[] {
  const out: YankInstance[] = [];
  for (const i of QueryYankSchema.parse(listed)) {
    if (i.type === 'migration') out.push({ type: 'migration' });
    else if (i.type === 'block-node' && 'node-name' in i && typeof i['node-name'] === 'string' && i['node-name'].startsWith(TARGET_NODE_PREFIX)) {
      out.push({ type: 'block-node', 'node-name': i['node-name'] });
    }
  }
  return out;
}

/**
 * Yanks the source's connections to the destination (`diskIds`: the plan's disks, whose NBD
 * client nodes an OOB yank names). Returns what it yanked (empty: nothing to yank, or a QEMU
 * < 6.0 without the command, where the steps after it wait as before).
 */
export async function sourceYankDestination(q: QmpClient, caps: QmpCapabilities, opts: { timeoutMs: number; diskIds?: readonly string[] }): Promise<YankInstance[]> {
  if (!caps.hasCommand('yank')) return [];
  if (q.oob) return yankOutOfBand(q, opts.diskIds ?? [], opts);
  if (!caps.hasCommand('query-yank')) return [];
  const instances = destinationYankInstances(await q.executeRaw('query-yank', undefined, opts));
  if (instances.length === 0) return [];
  await q.executeRaw('yank', { instances }, opts);
  return instances;
}

async function yankOutOfBand(q: QmpClient, diskIds: readonly string[], opts: { timeoutMs: number }): Promise<YankInstance[]> {
  const candidates: YankInstance[] = [{ type: 'migration' }, ...diskIds.map((id): YankInstance => ({ type: 'block-node', 'node-name': targetNodeName(id) }))];
  const results = await Promise.allSettled(candidates.map((i) => q.executeOob('yank', { instances: [i] }, opts)));
  const yanked = candidates.filter((_, k) => results[k]?.status === 'fulfilled');
  // QEMU's refusal of an instance it does not have (no migration yet, a node already gone) is
  // an answer; a silent monitor or a broken session is a failure of the cut itself.
  const failure = results.find((r): r is PromiseRejectedResult => r.status === 'rejected' && !(r.reason instanceof QmpCommandError));
  if (failure && yanked.length === 0) throw failure.reason;
  return yanked;
}
