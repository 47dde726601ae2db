/**
 * Destination prepare (libvirt's qemuMigrationDstPrepare): sparse target disks (lazy: overlays
 * backed by the source's export), a QEMU started with -incoming defer -S, and for pre-copy an NBD
 * server with one writable export per disk for the mirrors. Each undo is registered before the
 * side effect it undoes, so a lost reply still leaves nothing behind.
 */
import { FerryError } from '../errors.js';
import { diskNodeName } from '../qemu/spec.js';
import type { IncomingVm } from './endpoint.js';
import { onFreePort, STOP_DESTINATION, type DestinationState, type MigrationContext, type SourceExport } from './context.js';
import { destinationTlsPeer, nbdServerArguments } from './data-path.js';
import { missingDataTls } from '../host/data-tls.js';
import { exportName } from './names.js';
import { stopNbdServer } from './primitives.js';
import { targetSpec } from './source-preflight.js';
import { MigrationError, type MigrationPlan } from './types.js';

export async function destinationPrepare(ctx: MigrationContext, input: { plan: MigrationPlan; sourceExport: SourceExport | undefined }): Promise<DestinationState> {
  const { plan, sourceExport } = input;
  const d = ctx.req.destination;
  const spec = targetSpec(ctx, input.plan.destinationMachine);
  for (const [i, disk] of plan.disks.entries()) {
    const backingNbd = sourceExport
      ? {
          host: ctx.req.source.exportHost,
          port: sourceExport.port,
          export: exportName(ctx.id, disk.id),
          reconnectDelayS: ctx.opts.nbdReconnectDelayS,
          ...(plan.dataTls.encrypted ? { tlsHostname: plan.dataTls.source.hostname } : {}),
        }
      : undefined;
    const undo = `remove destination disk ${spec.disks[i]!.id}`;
    ctx.undo.push(undo, 'destination', () => d.removeDisk(disk.destinationPath));
    await d.createDisk({ path: disk.destinationPath, format: disk.format, virtualSize: disk.virtualSize, ...(backingNbd ? { backingNbd } : {}) }, { signal: ctx.signal }).catch((err: unknown) => {
      // A clear refusal (the file exists, a bad path) made nothing: the file is not ours to remove.
      if (err instanceof FerryError && err.userError) ctx.undo.drop(undo);
      throw err;
    });
  }
  ctx.undo.push('remove destination run dir', 'destination', () => d.removeRunDir(spec));
  // Registered before the start: a start whose reply is lost may still have left a QEMU running.
  let started: IncomingVm | undefined;
  ctx.undo.push(STOP_DESTINATION, 'destination', async () => {
    if (!started) return d.abandonIncoming(spec);
    await started.qmp.close().catch(() => undefined);
    if (started.running()) await started.kill();
  });
  const tlsPeer = destinationTlsPeer(plan);
  const vm = await d.startIncoming(spec, { timeoutMs: 30_000, signal: ctx.signal, ...(tlsPeer ? { dataTls: tlsPeer } : {}) });
  started = vm;
  const caps = await vm.qmp.probeCapabilities(ctx.call());
  const tlsMissing = plan.dataTls.encrypted ? missingDataTls(caps) : [];
  if (tlsMissing.length > 0) {
    throw new MigrationError('DATA_TLS_UNAVAILABLE', `the destination QEMU lacks ${tlsMissing.join(', ')} for data-path TLS`, { phase: ctx.phase, userError: true });
  }
  const needs = sourceExport ? ['migrate-incoming', 'block-stream'] : ['nbd-server-start', 'block-export-add', 'migrate-incoming'];
  for (const cmd of needs) {
    if (!caps.hasCommand(cmd)) throw new MigrationError('DESTINATION_UNSUPPORTED', `destination QEMU lacks ${cmd}${sourceExport ? ' (lazy mode)' : ''}`, { phase: ctx.phase });
  }
  if (plan.bitmaps.length > 0 && !caps.migrationCapabilities.has('dirty-bitmaps')) {
    // Found before any byte is copied; the rollback removes the QEMU and files just made.
    throw new MigrationError('BITMAPS_UNSUPPORTED', 'the source disks carry dirty bitmaps but the destination QEMU lacks the dirty-bitmaps migration capability', {
      phase: ctx.phase,
      userError: true,
    });
  }
  const state: DestinationState = { spec, vm, caps, nbdPort: undefined };
  if (sourceExport) return state;
  return { ...state, nbdPort: await destinationExportDisks(ctx, state, plan) };
}

/**
 * An NBD server and a writable export per disk. Exporting a node of a QEMU in -incoming defer
 * activates it for writing; that is what lets the mirror fill it before the migration stream arrives.
 */
async function destinationExportDisks(ctx: MigrationContext, dest: Omit<DestinationState, 'nbdPort'>, plan: MigrationPlan): Promise<number> {
  const q = dest.vm.qmp;
  const host = ctx.req.destination.migrationHost;
  // No undo of their own: the rollback kills this QEMU first, and its server and exports with it.
  const port = await onFreePort(ctx, (p) => q.execute('nbd-server-start', nbdServerArguments(host, p, plan.dataTls.encrypted), ctx.call()), {
    host,
    ports: ctx.req.destination.candidatePorts(),
  });
  for (const disk of plan.disks) {
    const name = exportName(ctx.id, disk.id);
    await q.execute('block-export-add', { type: 'nbd', id: name, 'node-name': diskNodeName(disk.id), name, writable: true }, ctx.call());
  }
  return port;
}

/** After `cont` (pre-copy): the mirrors are done, the exports and the NBD server go. */
export async function destinationStopNbd(ctx: MigrationContext, dest: DestinationState): Promise<void> {
  await stopNbdServer(dest.vm.qmp, ctx.opts.commandTimeoutMs);
}
