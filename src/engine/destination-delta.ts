/**
 * Destination prepare, delta evacuation: instead of empty target disks, overlays on the replica's
 * chains, made by the replica's owner (DeltaReplica.prepareOverlays). The undo, registered first,
 * removes them and serves the replica again, so a failed evacuation leaves the standby as it was.
 */
import type { MigrationContext } from './context.js';
import type { DeltaReplica } from './delta.js';
import type { MigrationPlan } from './types.js';

export async function destinationDeltaDisks(ctx: MigrationContext, input: { plan: MigrationPlan; delta: DeltaReplica }): Promise<void> {
  const disks = input.plan.disks.map((d) => ({ id: d.id, path: d.destinationPath, virtualSize: d.virtualSize }));
  ctx.undo.push('remove the overlays on the replica and serve it again', 'destination', () => input.delta.restore(disks.map((d) => d.path)));
  await input.delta.prepareOverlays(disks, { signal: ctx.signal });
}
