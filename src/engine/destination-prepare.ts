/**
 * Destination prepare (libvirt's qemuMigrationDstPrepare): sparse target disks (lazy: overlays
 * backed by the source's export), a QEMU started with -incoming defer -S, and for pre-copy an NBD
 * server with one writable export per disk for the mirrors. Each undo is registered before the
 * side effect it undoes, so a lost reply still leaves nothing behind.
 */
import { FerryError } from '../errors.js';
import { diskNodeName } from '../qemu/spec.js';
import type { IncomingVm, NbdRelayHandle } from './endpoint.js';
import { onFreePort, STOP_DESTINATION, type DestinationState, type MigrationContext, type SourceExport } from './context.js';
import { missingDataTls } from '../host/data-tls.js';
import type { QmpCapabilities, VersionInfo } from '../qmp/index.js';
import { planConvergence, type ConvergencePlan } from './convergence/index.js';
import { destinationTlsPeer, MAX_UNIX_SOCKET_PATH, nbdRelaySocketPath, nbdServerArguments, nbdServerUnixArguments } from './data-path.js';
import { destinationDeltaDisks } from './destination-delta.js';
import { exportName } from './names.js';
import { stopNbdServer } from './primitives.js';
import { targetSpec } from './source-preflight.js';
import { MigrationError, type MigrationPlan } from './types.js';

export async function destinationPrepare(
  ctx: MigrationContext,
  input: { plan: MigrationPlan; sourceExport: SourceExport | undefined; sourceCaps: QmpCapabilities },
): Promise<DestinationState> {
  const { plan, sourceExport } = input;
  const d = ctx.req.destination;
  const spec = targetSpec(ctx, input.plan.destinationMachine);
  if (ctx.req.delta) await destinationDeltaDisks(ctx, { plan, delta: ctx.req.delta });
  for (const [i, disk] of (ctx.req.delta ? [] : plan.disks).entries()) {
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
  ctx.undo.push('remove destination run dir', 'destination', async () => {
    // A QEMU that died on its own wrote why in its log: that is kept for the operator.
    const kept = await d.removeRunDir(spec, { keepLog: ctx.destinationDied });
    if (typeof kept === 'string') ctx.keptDestinationLog = kept;
  });
  // Registered before the start: a start whose reply is lost may still have left a QEMU running.
  let started: IncomingVm | undefined;
  ctx.undo.push(STOP_DESTINATION, 'destination', async () => {
    if (!started) return d.abandonIncoming(spec);
    // A QEMU that ended its QMP session may be on its way out by itself: a moment to exit, so
    // its death (and what it said) is told apart from the kill below.
    const sessionEnded = await Promise.race([started.qmp.closed.then(() => true), new Promise<false>((r) => setTimeout(r, 0, false))]);
    if (sessionEnded && started.running()) await Promise.race([started.exited, new Promise((r) => setTimeout(r, 2_000).unref())]);
    await started.qmp.close().catch(() => undefined);
    if (started.unreachable?.()) {
      // Its agent abandons an incoming VM whose tunnel broke before it ran; asking it is in vain.
      ctx.destinationUnreachable = true;
      return;
    }
    if (started.running()) {
      try {
        await started.kill();
      } catch (err) {
        // Not killed, and its host did not answer: a silent NBD server the source must be cut from.
        ctx.destinationUnreachable = true;
        throw err;
      }
    } else {
      ctx.destinationDied = true;
      ctx.destinationExit ??= await started.exitReason?.().catch(() => undefined);
    }
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
  if (ctx.opts.multifdChannels > 0 && !caps.migrationCapabilities.has('multifd')) {
    throw new MigrationError('MULTIFD_UNAVAILABLE', `multifdChannels ${ctx.opts.multifdChannels} asked, but the destination QEMU lacks the multifd migration capability`, { phase: ctx.phase, userError: true });
  }
  const state: DestinationState = { spec, vm, caps, nbdPort: undefined, convergence: undefined, relay: undefined };
  if (sourceExport) return state;
  const convergence = destinationConvergencePlan(ctx, input.sourceCaps, vm.qmp.greeting.version, spec);
  const listening = await destinationListenNbd(ctx, state, convergence.relay, plan.dataTls.encrypted);
  await destinationExportDisks(ctx, state, plan);
  return { ...state, ...listening, convergence };
}

/**
 * How the mirrors will converge (issue 11): planConvergence, less the relay where this
 * destination cannot run one or the socket path would not fit (then auto runs without it, warned).
 */
function destinationConvergencePlan(ctx: MigrationContext, sourceCaps: QmpCapabilities, version: VersionInfo, spec: DestinationState['spec']): ConvergencePlan {
  const plan = planConvergence(ctx.opts.copyMode, sourceCaps, version);
  if (!plan.relay) return plan;
  const why = !ctx.req.destination.startNbdRelay
    ? `destination ${ctx.req.destination.name} cannot run an NBD relay`
    : nbdRelaySocketPath(spec.runDir).length > MAX_UNIX_SOCKET_PATH
      ? `the relay's socket path under ${spec.runDir} is longer than ${MAX_UNIX_SOCKET_PATH} bytes`
      : undefined;
  if (!why) return plan;
  ctx.warn(`copy mode auto without the NBD relay (${why}): a QEMU ${version.qemu.major}.${version.qemu.minor} destination's mirrors may be slow to converge`);
  return { ...plan, relay: false, path: plan.activeSync ? 'auto:active-sync' : 'auto:background' };
}

/**
 * The destination's NBD server: on TCP at migrationHost; behind the relay (a QEMU < 8.0), on the
 * run dir's unix socket, the relay on TCP in front of it. The relay's undo is registered before it
 * starts; the server needs none (the rollback kills this QEMU, and its server with it).
 */
async function destinationListenNbd(ctx: MigrationContext, dest: Pick<DestinationState, 'vm' | 'spec'>, relay: boolean, tls: boolean): Promise<Pick<DestinationState, 'nbdPort' | 'relay'>> {
  const q = dest.vm.qmp;
  const d = ctx.req.destination;
  if (!relay || !d.startNbdRelay) {
    const host = d.migrationHost;
    const port = await onFreePort(ctx, (p) => q.execute('nbd-server-start', nbdServerArguments(host, p, tls), ctx.call()), { host, ports: d.candidatePorts() });
    return { nbdPort: port, relay: undefined };
  }
  // The relay first: it says where the server must listen (the host's own view of the run dir).
  let started: NbdRelayHandle | undefined;
  ctx.undo.push(CLOSE_NBD_RELAY, 'destination', async () => {
    await started?.close();
  });
  started = await d.startNbdRelay(dest.spec, { signal: ctx.signal });
  await q.execute('nbd-server-start', nbdServerUnixArguments(started.unixPath, tls), ctx.call());
  return { nbdPort: started.port, relay: started };
}

/**
 * A writable export per disk, on the server destinationListenNbd started. Exporting a node of a QEMU in -incoming defer
 * activates it for writing; that is what lets the mirror fill it before the migration stream arrives.
 */
async function destinationExportDisks(ctx: MigrationContext, dest: Pick<DestinationState, 'vm'>, plan: MigrationPlan): Promise<void> {
  const q = dest.vm.qmp;
  // No undo of their own: the rollback kills this QEMU first, and its server and exports with it.
  for (const disk of plan.disks) {
    const name = exportName(ctx.id, disk.id);
    await q.execute('block-export-add', { type: 'nbd', id: name, 'node-name': diskNodeName(disk.id), name, writable: true }, ctx.call());
  }
}

/**
 * Before `cont` (pre-copy): the mirrors are done, the exports and the NBD server go, so the
 * guest's devices take back the WRITE the exports shared (issue 15 defect 17). Still before the
 * point of no return: a failure here rolls back.
 */
export async function destinationStopNbdServer(ctx: MigrationContext, dest: DestinationState): Promise<void> {
  await stopNbdServer(dest.vm.qmp, ctx.opts.commandTimeoutMs);
}

/** After `cont` (pre-copy, behind a relay): its connections ended with the server; it goes. */
export async function destinationCloseRelay(ctx: MigrationContext, dest: DestinationState): Promise<void> {
  await dest.relay?.close();
  ctx.undo.drop(CLOSE_NBD_RELAY);
}

const CLOSE_NBD_RELAY = 'close the NBD relay';
