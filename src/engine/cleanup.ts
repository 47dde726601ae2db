/**
 * Cleanup, after the destination runs the guest (libvirt's qemuMigrationSrcConfirm): every step
 * is a tidy step, whose failure is a warning and never fails the migration, and none carries the
 * cancel signal. The NBD plumbing goes after `cont` (but the destination's NBD server, stopped
 * just before it), so it adds nothing to the pause.
 */
import { errorText } from '../errors.js';
import { diskNodeName } from '../qemu/spec.js';
import { QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceState } from './context.js';
import { destinationEndDataTls, sourceEndDataTls } from './data-path.js';
import { destinationCloseRelay } from './destination-prepare.js';
import { sourceUnexportDisks } from './lazy.js';
import { sourceDetachTargets, sourceDismissMirrors } from './source-mirror.js';
import type { MigrationPlan } from './types.js';

/** pre-copy: the completed mirrors, the source's NBD client nodes, the relay (the NBD server stopped before `cont`). */
export async function cleanupPrecopy(ctx: MigrationContext, input: { source: SourceState; dest: DestinationState; plan: MigrationPlan }): Promise<void> {
  await ctx.tidy('dismiss the completed mirrors', () => sourceDismissMirrors(ctx, input));
  await ctx.tidy('detach the source NBD nodes', () => sourceDetachTargets(ctx, input));
  await ctx.tidy('close the NBD relay', () => destinationCloseRelay(ctx, input.dest));
}

/** lazy: the source's exports and NBD server (every overlay stands alone by now). */
export async function cleanupLazy(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  await ctx.tidy("stop the source's NBD export", () => sourceUnexportDisks(ctx, input));
}

/** Both modes' last steps: the bitmaps checked, the source QEMU gone, the destination handed to its host. */
export async function cleanupFinish(ctx: MigrationContext, input: { source: SourceState; dest: DestinationState; plan: MigrationPlan }): Promise<{ disk: string; name: string }[]> {
  const bitmaps = await destinationBitmaps(ctx, input.dest, input.plan);
  await ctx.tidy("end the destination's data-path TLS", () => destinationEndDataTls(ctx, input));
  await ctx.tidy("end the source's data-path TLS", () => sourceEndDataTls(ctx, input));
  await sourceRetire(ctx, input.source);
  await ctx.tidy('release the destination QEMU to its host', () => input.dest.vm.release());
  return bitmaps;
}

async function sourceRetire(ctx: MigrationContext, source: SourceState): Promise<void> {
  try {
    await ctx.req.source.retireSource(source.qmp, { timeoutMs: QMP_TIMEOUT_MS });
  } catch (err) {
    // The guest runs on the destination; a source that lingers paused in postmigrate is
    // harmless to the guest but the operator must know.
    ctx.warn(`the source QEMU did not exit cleanly: ${errorText(err)}`);
  } finally {
    await source.qmp.close();
  }
}

/** The bitmaps that arrived; one that did not is a warning the operator's backups depend on. */
async function destinationBitmaps(ctx: MigrationContext, dest: DestinationState, plan: MigrationPlan): Promise<{ disk: string; name: string }[]> {
  if (plan.bitmaps.length === 0) return [];
  try {
    const nodes = await dest.vm.qmp.execute('query-named-block-nodes', { flat: true }, ctx.call());
    const found = plan.disks.flatMap((d) =>
      (nodes.find((n) => n['node-name'] === diskNodeName(d.id))?.['dirty-bitmaps'] ?? []).flatMap((b) => (b.name ? [{ disk: d.id, name: b.name }] : [])),
    );
    for (const b of plan.bitmaps) {
      if (!found.some((f) => f.disk === b.disk && f.name === b.name)) ctx.warn(`dirty bitmap '${b.name}' of disk '${b.disk}' did not arrive on the destination`);
    }
    return found;
  } catch (err) {
    ctx.warn(`could not check the destination's dirty bitmaps: ${errorText(err)}`);
    return [];
  }
}
