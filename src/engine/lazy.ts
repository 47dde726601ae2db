/**
 * Lazy mode's own phases: the source serves each disk read-only over NBD (prepare), and after
 * `cont` the destination hydrates its overlays from there (hydrate.ts) while the guest runs.
 * Read-only matters: a writable export could not be inactivated when the migration completes, and
 * the source must stop writing then.
 */
import { diskNodeName } from '../qemu/spec.js';
import { onFreePort, QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceExport, type SourceState } from './context.js';
import { hydrate, HydrationError } from './hydrate.js';
import { nbdServerArguments } from './data-path.js';
import { exportName } from './names.js';
import { stopNbdServer, unexport } from './primitives.js';
import { MigrationError, type MigrationPlan } from './types.js';
import { WireCounter } from './wire-counter.js';

export interface Hydrated {
  hydrationMs: number;
  hydratedWireBytes: number | undefined;
}

export async function sourceExportDisks(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<SourceExport> {
  const q = input.source.qmp;
  const src = ctx.req.source;
  ctx.undo.push("stop the source's NBD server", 'source', () => stopNbdServer(q, QMP_TIMEOUT_MS));
  const port = await onFreePort(ctx, (p) => q.execute('nbd-server-start', nbdServerArguments(src.exportHost, p, input.plan.dataTls.encrypted), ctx.call()), {
    host: src.exportHost,
    ports: src.candidateExportPorts(),
  });
  for (const disk of input.plan.disks) {
    const name = exportName(ctx.id, disk.id);
    ctx.undo.push(`remove source export ${name}`, 'source', () => unexport(q, name, QMP_TIMEOUT_MS));
    // QEMU >= 10.0 refuses I/O (EPERM) on an export whose node is inactive, as the source's are
    // once the migration completes, unless allowed; 7.2 has no such check and no such option.
    const inactive = input.source.caps.hasArgument('block-export-add', 'allow-inactive') ? { 'allow-inactive': true } : {};
    await q.execute('block-export-add', { type: 'nbd', id: name, 'node-name': diskNodeName(disk.id), name, writable: false, ...inactive }, ctx.call());
  }
  return { port };
}

/**
 * QEMU >= 10.0 answers only reads on an export whose node is inactive, as the source's are once
 * the migration completed, and block-stream also asks for block status (EPERM). Past the point
 * of no return the source's guest is stopped for good: its nodes are activated again only to
 * serve the read-only export. QEMU 7.2 serves inactive nodes fully and has no blockdev-set-active.
 */
export async function sourceReactivateDisks(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  if (!input.source.caps.hasCommand('blockdev-set-active')) return;
  for (const disk of input.plan.disks) {
    await input.source.qmp.executeRaw('blockdev-set-active', { 'node-name': diskNodeName(disk.id), active: true }, ctx.call());
  }
}

/** After hydration: the exports and the server go (the overlays no longer read from them). */
export async function sourceUnexportDisks(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  for (const disk of input.plan.disks) await unexport(input.source.qmp, exportName(ctx.id, disk.id), ctx.opts.commandTimeoutMs);
  await stopNbdServer(input.source.qmp, ctx.opts.commandTimeoutMs);
}

/**
 * The overlays pull what they lack from the source's export, while the wire bytes the source's NBD
 * server sends are counted. Past the point of no return, a failure is reported loudly and never
 * rolled back: the guest runs here and still needs the source.
 */
export async function destinationHydrate(ctx: MigrationContext, input: { dest: DestinationState; plan: MigrationPlan; sourceExport: SourceExport }): Promise<Hydrated> {
  const { dest, plan, sourceExport } = input;
  const started = performance.now();
  // The destination's own count, where its host can tell, sees only its QEMU's connections; the
  // source's sees every reader of the export. One counter for the whole hydration, never mixed.
  const peer = { host: ctx.req.source.exportHost, port: sourceExport.port };
  const byDestination = (await ctx.req.destination.nbdBytesReceived(peer, dest.vm.pid).catch(() => undefined)) !== undefined;
  const read = byDestination ? () => ctx.req.destination.nbdBytesReceived(peer, dest.vm.pid) : () => ctx.req.source.nbdBytesServed(sourceExport.port);
  const wire = new WireCounter(read, (before, now) => ctx.log.warn({ before, now }, 'the NBD connection to the source was re-established'));
  await wire.start();
  try {
    await hydrate(dest.vm.qmp, plan.disks, {
      bytesPerSec: ctx.opts.hydrationBytesPerSec,
      stallMs: ctx.opts.progressTimeoutMs + ctx.opts.nbdReconnectDelayS * 1000,
      attempts: ctx.opts.hydrationAttempts,
      timeoutMs: ctx.opts.commandTimeoutMs,
      pollMs: ctx.opts.progressIntervalMs,
      onPoll: async (disks) => {
        await wire.sample();
        ctx.emit({ event: 'hydration', migrationId: ctx.id, disks, wireBytes: wire.bytes(), elapsedMs: Math.round(performance.now() - started) });
      },
      // auto-finalize is off: a finished stream waits in 'pending' with its backing (and the NBD
      // connection whose byte counter we read) still attached. Count, then let go.
      beforeRelease: () => wire.sample(),
      onRetry: (attempt, why) => ctx.emit({ event: 'warning', migrationId: ctx.id, message: `hydration attempt ${attempt} failed (${why}); resuming` }),
    });
  } catch (err) {
    if (!(err instanceof HydrationError)) throw err;
    const d = ctx.req.destination.name;
    const s = ctx.req.source.name;
    throw new MigrationError(
      err.code,
      err.code === 'HYDRATION_STALLED'
        ? `${err.message}; the guest runs on ${d} and still reads unhydrated blocks from ${s}, which must stay up`
        : `${err.message}. The guest runs on ${d}; reads of blocks not yet hydrated fail with I/O errors until the source (${s}) serves its export again. Do not stop the source QEMU; see docs/migration.md, lazy mode.`,
      { phase: ctx.phase, cause: err, outcome: 'onDestinationNeedsSource' },
    );
  }
  const hydrationMs = Math.round(performance.now() - started);
  const hydratedWireBytes = wire.bytes();
  // The last sample may predate the streams' end: progress consumers get a final 100%.
  ctx.emit({ event: 'hydration', migrationId: ctx.id, disks: plan.disks.map((x) => ({ id: x.id, doneBytes: x.virtualSize, totalBytes: x.virtualSize })), wireBytes: hydratedWireBytes, elapsedMs: hydrationMs });
  return { hydrationMs, hydratedWireBytes };
}
