/**
 * Source begin and preflight (libvirt's qemuMigrationSrcBegin): reach the source QEMU, read what
 * it runs, and refuse what cannot work before anything changes anywhere. The plan it returns is
 * the input of every later phase.
 */
import { isFerryReplicationBitmap } from './delta.js';
import { errorText } from '../errors.js';
import type { QmpClient } from '../qmp/index.js';
import { diskNodeName, type VmSpec } from '../qemu/spec.js';
import { QMP_TIMEOUT_MS, type MigrationContext, type SourceState } from './context.js';
import { checkQemuPair, type QemuBuild, type QemuProber } from '../qemu/versions.js';
import { missingDataTls } from '../host/data-tls.js';
import { planDataTls, type DataTlsPlan } from './data-tls-plan.js';
import type { HostDataTls } from './endpoint.js';
import { MIRROR_JOB_PREFIX } from './names.js';
import { ferryLeftovers } from './settle-local.js';
import { MigrationError, type MigrationPlan } from './types.js';

/**
 * TLS on the data path: what each side offers, what its QEMU can (the source's from its schema;
 * the destination's from its version, and again from its schema once started), what was asked.
 */
async function planSidesDataTls(ctx: MigrationContext, source: SourceState, destinationBuild: QemuBuild | undefined): Promise<DataTlsPlan> {
  const none: HostDataTls = { mode: 'off', identity: null, names: [] };
  const [src, dst] = await Promise.all([ctx.req.source.dataTls?.({ signal: ctx.signal }) ?? none, ctx.req.destination.dataTls?.({ signal: ctx.signal }) ?? none]);
  const major = destinationBuild?.version.major;
  return planDataTls(
    ctx.opts.dataTls,
    { ...src, qemuMissing: missingDataTls(source.caps), address: ctx.req.source.exportHost },
    { ...dst, qemuMissing: major !== undefined && major < 7 ? [`QEMU ${major}.x (NBD tls-hostname needs 7.0)`] : [], address: ctx.req.destination.migrationHost },
  );
}

/** Free space kept beyond what the copy needs, for qcow2 metadata and the filesystem's own. */
const SPACE_MARGIN_BYTES = 64 * 1024 * 1024;

export async function sourceBegin(ctx: MigrationContext): Promise<SourceState> {
  let qmp: QmpClient;
  try {
    qmp = await ctx.req.source.connect({ timeoutMs: 10_000, signal: ctx.signal });
  } catch (err) {
    throw new MigrationError('SOURCE_UNREACHABLE', `cannot reach the source VM's QMP (${ctx.req.source.name}): ${errorText(err)}`, {
      phase: 'preflight',
      cause: err,
      userError: true,
    });
  }
  // Pipelined: the schema is the slow answer (tens of ms under TCG), the status waits behind it anyway.
  const [caps, status] = await Promise.all([qmp.probeCapabilities({ timeoutMs: QMP_TIMEOUT_MS, signal: ctx.signal }), qmp.execute('query-status', undefined, ctx.call())]);
  return { qmp, caps, wasRunning: status.status === 'running', statusAtBegin: status.status };
}

/**
 * The destination's QEMU binary, asked what it is (it starts a QEMU: tens of ms) while the source
 * is reached and probed: the two are independent. Asked once; its failure is kept for
 * checkQemuPair to report as a preflight problem, never left unhandled.
 */
export function destinationProbe(ctx: MigrationContext): Partial<QemuProber> {
  const prober = ctx.req.destination;
  if (!prober.probeQemu) return {};
  const probed = prober.probeQemu({ timeoutMs: QMP_TIMEOUT_MS, signal: ctx.signal });
  probed.catch(() => undefined);
  return { probeQemu: () => probed };
}

/**
 * The destination's spec. In lazy mode every disk is a qcow2 overlay (named .qcow2) whose
 * backing is the source's export until hydration ends; after that it stands alone.
 */
export function targetSpec(ctx: MigrationContext, machine: string | undefined): VmSpec {
  // The destination runs exactly the machine type the source runs (never an alias such as q35).
  const spec = { ...ctx.req.destination.targetSpec(ctx.req.spec, ctx.id), ...(machine ? { machine } : {}) };
  return ctx.opts.mode === 'lazy' ? lazyTargetSpec(spec) : spec;
}

/** Lazy mode's destination disks: qcow2 overlays, named .qcow2. */
export function lazyTargetSpec(spec: VmSpec): VmSpec {
  return { ...spec, disks: spec.disks.map((d) => ({ ...d, format: 'qcow2' as const, path: d.path.replace(/(\.(raw|img|qcow2))?$/, '.qcow2') })) };
}

export async function sourcePreflight(ctx: MigrationContext, source: SourceState, destination: Partial<QemuProber> = ctx.req.destination): Promise<MigrationPlan> {
  const { spec } = ctx.req;
  // Everything below only reads, so it is asked at once; the problems are listed in a fixed order.
  const stateProblems = sourceStateProblems(ctx, source);
  // QEMU versions and machine type: forward only, the destination pinned to the source's type.
  const pairing = checkQemuPair(source.qmp, destination, ctx.call());
  const memory = source.qmp.executeRaw('query-memory-size-summary', undefined, ctx.call());
  // Awaited below, in order; until then a rejection must not count as unhandled.
  // The disks are read (a qemu-img per disk, tens of ms) while the destination's QEMU is asked
  // what it is: only the destination's paths in the answer wait for the pairing's machine type.
  const destSpecOf = pairing.then((pair) => targetSpec(ctx, pair.machine));
  const reading = readDisks(ctx, source, destSpecOf);
  for (const p of [stateProblems, memory, reading, destSpecOf]) p.catch(() => undefined);
  const pair = await pairing;
  const destSpec = await destSpecOf;
  const target = ctx.req.destination.checkTarget(destSpec, { signal: ctx.signal });
  const freeing = ctx.req.destination.freeBytes(destSpec, { signal: ctx.signal }).catch(() => undefined);
  const tlsPlanning = planSidesDataTls(ctx, source, pair.destination).then(
    (plan) => ({ plan }),
    (err: unknown) => ({ err }),
  );
  target.catch(() => undefined);
  const state = await stateProblems;
  const problems = [...state.problems, ...pair.problems];
  const { disks, bitmaps: found, problems: diskProblems } = await reading;
  problems.push(...diskProblems);
  // Lazy leaves a standby replica's bitmaps behind (they would land on an overlay whose data is
  // still on the source): the protection that follows the VM reconciles, finds none, and its next
  // sync is full. Never a wrong sync, only a longer one.
  const bitmaps = ctx.opts.mode === 'lazy' ? found.filter((b) => !isFerryReplicationBitmap(b.name)) : found;
  if (bitmaps.length > 0 && !source.caps.migrationCapabilities.has('dirty-bitmaps')) {
    // Without the capability the destination would come up without them, and the next
    // incremental backup there would silently miss every block written before the move.
    problems.push(`the source disks carry dirty bitmaps (${bitmaps.map((b) => `${b.disk}/${b.name}`).join(', ')}) but the source QEMU lacks the dirty-bitmaps migration capability`);
  }
  if (ctx.opts.multifdChannels > 0 && !source.caps.migrationCapabilities.has('multifd')) {
    problems.push(`multifdChannels ${ctx.opts.multifdChannels} asked, but the source QEMU lacks the multifd migration capability`);
  }
  if (ctx.opts.mode === 'lazy' && bitmaps.length > 0) {
    // Not verified yet: the bitmap would land on the overlay while the data is still behind it.
    problems.push(`lazy mode does not move dirty bitmaps yet (found ${bitmaps.map((b) => `${b.disk}/${b.name}`).join(', ')}); use precopy`);
  }
  const ramBytes = readBaseMemory(await memory) ?? spec.memoryMiB * 1024 * 1024;
  if (ramBytes !== spec.memoryMiB * 1024 * 1024) {
    problems.push(`spec does not match the running source: it has ${ramBytes / 1048576} MiB of RAM, the spec says ${spec.memoryMiB}`);
  }

  problems.push(...(await target));
  const needed = disks.reduce((s, d) => s + d.allocatedBytes, 0) + SPACE_MARGIN_BYTES;
  const free = await freeing;
  if (free !== undefined && free < needed) {
    problems.push(`not enough space on ${ctx.req.destination.name}: the disks hold ${mib(needed - SPACE_MARGIN_BYTES)} MiB, ${mib(free)} MiB free`);
  }

  const tls = await tlsPlanning;
  if ('err' in tls) problems.push(errorText(tls.err));
  const dataTls = 'plan' in tls ? tls.plan : undefined;

  if (problems.length > 0 || !dataTls) {
    throw new MigrationError('PREFLIGHT_REFUSED', `cannot migrate ${spec.name}:\n  - ${problems.join('\n  - ')}`, {
      phase: 'preflight',
      userError: true,
      // recover: what is wrong is a dead run's leftovers; migrate-vm --recover settles them.
      context: { problems, recover: state.recover },
    });
  }
  const gib = (needed + ramBytes) / 2 ** 30;
  return {
    migrationId: ctx.id,
    vm: spec.name,
    source: ctx.req.source.name,
    destination: ctx.req.destination.name,
    destinationHost: ctx.req.destination.migrationHost,
    disks,
    ramBytes,
    mode: ctx.opts.mode,
    copyMode: ctx.opts.copyMode,
    bitmaps,
    capabilities: { source: [...source.caps.migrationCapabilities].sort(), destination: [] },
    ...(pair.machine ? { destinationMachine: pair.machine } : {}),
    dataTls,
    deadlineMs: Math.round(ctx.opts.deadlineBaseMs + ctx.opts.deadlinePerGiBMs * gib),
  };
}

/** Commands and capabilities the source needs, and a state it can migrate from. */
async function sourceStateProblems(ctx: MigrationContext, source: SourceState): Promise<{ problems: string[]; recover: boolean }> {
  const problems: string[] = [];
  for (const cmd of ['blockdev-add', 'blockdev-mirror', 'block-job-cancel', 'migrate', 'migrate-continue']) {
    if (!source.caps.hasCommand(cmd)) problems.push(`source QEMU lacks the command ${cmd}`);
  }
  for (const cap of ['events', 'pause-before-switchover']) {
    if (!source.caps.migrationCapabilities.has(cap)) problems.push(`source QEMU lacks the migration capability ${cap}`);
  }
  if (ctx.opts.mode === 'lazy') {
    for (const cmd of ['nbd-server-start', 'block-export-add', 'block-export-del']) {
      if (!source.caps.hasCommand(cmd)) problems.push(`lazy mode: source QEMU lacks the command ${cmd}`);
    }
  }
  const status = await source.qmp.execute('query-status', undefined, ctx.call());
  const mig = await source.qmp.execute('query-migrate', undefined, ctx.call());
  const leftovers = await ferryLeftovers(source.qmp, ctx.opts.commandTimeoutMs);
  const migrating = mig.status !== undefined && !['none', 'completed', 'failed', 'cancelled'].includes(mig.status);
  if (PAUSED_BY_MIGRATION.has(status.status) && (migrating || mig.status === 'completed' || leftovers.length > 0)) {
    // Never "the guest runs on the source": paused by a migration, it runs nowhere until settled.
    problems.push(
      `the source VM is paused in '${status.status}' by a migration (status ${mig.status ?? 'none'}) that nobody drives any more: the guest runs NOWHERE until it is settled. ${RECOVER_HINT}`,
    );
  } else {
    if (!['running', 'paused'].includes(status.status)) problems.push(`source VM is in state '${status.status}', not running or paused`);
    if (migrating) problems.push(`a migration is already in progress on the source (status ${mig.status})`);
    if (leftovers.length > 0) problems.push(`a ferry run that died left ${leftovers.join(', ')} on the source. ${RECOVER_HINT}`);
  }
  const blockJobs = (await source.qmp.execute('query-block-jobs', undefined, ctx.call())).filter((j) => !j.device.startsWith(MIRROR_JOB_PREFIX));
  if (blockJobs.length > 0) problems.push(`the source has block jobs running: ${blockJobs.map((j) => j.device).join(', ')}`);
  return { problems, recover: leftovers.length > 0 || PAUSED_BY_MIGRATION.has(status.status) };
}

/** Run states a migration leaves a source in: paused by it, not by anyone's `stop`. */
const PAUSED_BY_MIGRATION = new Set(['finish-migrate', 'postmigrate']);
const RECOVER_HINT = 'Settle it with migrate-vm --recover (the same --spec and --to-dir), then migrate again';

/** The spec must describe the running VM, disk for disk: the destination is started from it. */
async function readDisks(
  ctx: MigrationContext,
  source: SourceState,
  destSpecOf: Promise<VmSpec>,
): Promise<{ disks: MigrationPlan['disks']; bitmaps: MigrationPlan['bitmaps']; problems: string[] }> {
  const problems: string[] = [];
  // What the copy writes (qemu-img map, a process per disk) is asked while QEMU lists its nodes.
  const data = ctx.req.spec.disks.map((disk) =>
    ctx.req.source.dataBytes({ path: disk.path, format: disk.format }, { signal: ctx.signal }).catch((err: unknown) => {
      ctx.log.warn({ disk: disk.id, err: errorText(err) }, "cannot read the disk's data bytes; using QEMU's actual-size");
      return undefined;
    }),
  );
  const nodes = await source.qmp.execute('query-named-block-nodes', { flat: true }, ctx.call());
  const destSpec = await destSpecOf;
  const byName = new Map(nodes.map((n) => [n['node-name'], n]));
  const disks: MigrationPlan['disks'] = [];
  const bitmaps: MigrationPlan['bitmaps'] = [];
  const mismatch = (what: string): void => {
    problems.push(`spec does not match the running source: ${what}`);
  };
  for (const [i, disk] of ctx.req.spec.disks.entries()) {
    const node = byName.get(diskNodeName(disk.id));
    if (!node) {
      const named = [...byName.keys()].filter((n): n is string => n !== undefined && !n.startsWith('#'));
      mismatch(`disk '${disk.id}' (node ${diskNodeName(disk.id)}) is not there; the source has ${named.join(', ') || 'no named nodes'}`);
      continue;
    }
    if (node.drv !== disk.format) mismatch(`disk '${disk.id}' is ${node.drv}, the spec says ${disk.format}`);
    if (node.file !== disk.path) mismatch(`disk '${disk.id}' is ${node.file}, the spec says ${disk.path}`);
    const virtualSize = node.image['virtual-size'];
    if (disk.virtualSize !== undefined && disk.virtualSize !== virtualSize) mismatch(`disk '${disk.id}' has ${virtualSize} bytes, the spec says ${disk.virtualSize}`);
    for (const b of node['dirty-bitmaps'] ?? []) {
      if (b.name) bitmaps.push({ disk: disk.id, name: b.name, persistent: b.persistent, count: b.count });
    }
    // What the copy writes, not what the file takes: a compressed image, or one with a backing
    // chain that 'full' flattens, holds more data than its actual-size (ENOSPC mid-mirror).
    const dataBytes = await data[i];
    disks.push({
      id: disk.id,
      format: destSpec.disks[i]!.format,
      virtualSize,
      allocatedBytes: dataBytes ?? node.image['actual-size'] ?? virtualSize,
      sourcePath: disk.path,
      destinationPath: destSpec.disks[i]!.path,
      // The target is a fresh image that reads as zeros, so copying what the source allocates
      // is the whole disk. 'full' would mark every range dirty (QEMU cannot tell that an NBD
      // target unmaps on write-zeroes) and the empty ranges would count against the speed cap.
      // With a backing file, 'top' would leave the chain behind: flatten instead.
      sync: node.backing_file ? 'full' : 'top',
    });
  }
  return { disks, bitmaps, problems };
}

function readBaseMemory(raw: unknown): number | undefined {
  if (typeof raw === 'object' && raw !== null && 'base-memory' in raw && typeof raw['base-memory'] === 'number') return raw['base-memory'];
  return undefined;
}

function mib(bytes: number): number {
  return Math.round(bytes / 1048576);
}
