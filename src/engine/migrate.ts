/**
 * The migration engine: one running VM and its local disks move from a source QEMU to a
 * destination QEMU, QEMU-native. Read top to bottom, it is the phases of a migration:
 *
 *   preflight            probe both sides, read the source's disks, refuse what cannot work
 *   prepare-destination  sparse target disks, QEMU with -incoming defer -S, NBD exports
 *   mirror               source: NBD client node + blockdev-mirror per disk, until all READY
 *   ram                  migration capabilities and parameters, migrate-incoming, migrate
 *   switchover           at pre-switchover (guest paused): complete the mirrors without pivot,
 *                        so the destination's disks equal the source's at this instant; continue
 *   confirm              destination paused with everything; `cont` on the destination =
 *                        THE POINT OF NO RETURN; confirmed running
 *   cleanup              NBD plumbing removed on both sides (after `cont`: it adds nothing to
 *                        the pause); the source QEMU exits
 *
 * Until the destination's `cont` succeeds the source is authoritative: any failure or cancel
 * unwinds the undo stack, which leaves the guest running on the source (resumed if ferry paused
 * it) and removes everything the destination got. After it, the source is never resumed.
 */
import { FerryError, errorText } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import {
  eventIs,
  isEvent,
  QmpCommandError,
  QmpTimeoutError,
  type QmpCapabilities,
  type QmpClient,
  type QmpEvent,
} from '../qmp/index.js';
import { diskNodeName, type VmSpec } from '../qemu/spec.js';
import { checkQemuPair } from '../qemu/versions.js';
import type { DestinationEndpoint, IncomingVm, SourceEndpoint } from './endpoint.js';
import { exportName, mirrorJobId, newMigrationId, streamJobId, targetNodeName } from './names.js';
import { cancelJob, cancelMigration } from './recover.js';
import { ProgressTracker } from './progress.js';
import {
  MigrationError,
  MigrationOptionsSchema,
  type MigrationEvent,
  type MigrationOptionsInput,
  type MigrationOptions,
  type MigrationPlan,
  type MigrationResult,
  type Phase,
} from './types.js';
import { UndoStack } from './undo.js';

export interface MigrateRequest {
  spec: VmSpec;
  source: SourceEndpoint;
  destination: DestinationEndpoint;
  options?: MigrationOptionsInput;
  /** Cancels the migration (rolls back) until the point of no return. */
  signal?: AbortSignal;
  logger?: Logger;
  onEvent?: (e: MigrationEvent) => void;
  /** Preflight only: return the plan, change nothing. */
  dryRun?: boolean;
  migrationId?: string;
}

const QMP_TIMEOUT_MS = 30_000;
const STOP_DESTINATION = 'stop destination QEMU';
/** A safe "unlimited" for max-bandwidth: QEMU's default is 128 MiB/s, far below a local link. */
const UNLIMITED_BANDWIDTH = 2 ** 40;
/** Free space kept beyond what the copy needs, for qcow2 metadata and the filesystem's own. */
const SPACE_MARGIN_BYTES = 64 * 1024 * 1024;

export async function planMigration(req: MigrateRequest): Promise<MigrationPlan> {
  const result = await migrate({ ...req, dryRun: true });
  return result.plan;
}

export async function migrate(req: MigrateRequest): Promise<MigrationResult> {
  const parsed = MigrationOptionsSchema.safeParse(req.options ?? {});
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new MigrationError('OPTIONS_INVALID', `invalid migration option ${issue?.path.join('.') ?? ''}: ${issue?.message ?? ''}`, {
      phase: 'preflight',
      userError: true,
    });
  }
  const m = new Migration(req, parsed.data);
  return m.run();
}

interface SourceState {
  qmp: QmpClient;
  caps: QmpCapabilities;
  wasRunning: boolean;
}

interface SourceExport {
  /** The source's NBD server port on its exportHost. */
  port: number;
}

interface DestinationState {
  spec: VmSpec;
  vm: IncomingVm;
  caps: QmpCapabilities;
  nbdPort: number;
  migrationPort: number;
  /** Destination event cursor taken before migrate-incoming. */
  since: number;
}

class Migration {
  readonly id: string;
  readonly #req: MigrateRequest;
  readonly #opts: MigrationOptions;
  readonly #log: Logger;
  readonly #undo = new UndoStack();
  readonly #signal: AbortSignal;
  readonly #started = performance.now();
  #phase: Phase = 'preflight';
  #phaseStarted = performance.now();
  readonly #phaseMs: Partial<Record<Phase, number>> = {};
  #progress: ProgressTracker | undefined;
  #downtimeLimitMs: number;
  #downtimeSteps = 0;
  #forced = false;
  #pastNoReturn = false;
  #plan: MigrationPlan | undefined;
  /** The source's exact machine type (never an alias such as q35), found in preflight. */
  #destinationMachine: string | undefined;

  constructor(req: MigrateRequest, opts: MigrationOptions) {
    this.#req = req;
    this.#opts = opts;
    this.id = req.migrationId ?? newMigrationId();
    this.#log = (req.logger ?? silentLogger).child({ migration: this.id, vm: req.spec.name });
    const total = AbortSignal.timeout(opts.totalTimeoutMs);
    this.#signal = req.signal ? AbortSignal.any([req.signal, total]) : total;
    this.#downtimeLimitMs = opts.downtimeLimitMs;
  }

  async run(): Promise<MigrationResult> {
    let source: SourceState | undefined;
    try {
      this.#enter('preflight');
      source = await this.#connectSource();
      const plan = await this.#preflight(source);
      this.#plan = plan;
      if (this.#req.dryRun) {
        await source.qmp.close();
        return this.#result(plan, 0, undefined, 0, 0);
      }
      const lazy = plan.mode === 'lazy';
      // lazy: no disk is copied before the guest moves, so progress until then is RAM only.
      this.#progress = new ProgressTracker(lazy ? { ...plan, disks: [] } : plan, this.#req.source, this.#opts.progressIntervalMs);

      this.#enter('prepare-destination');
      const sourceExport = lazy ? await this.#exportSourceDisks(source, plan) : undefined;
      const dest = await this.#prepareDestination(plan, sourceExport);

      if (!lazy) {
        this.#enter('mirror');
        await this.#startMirrors(source, dest, plan);
        await this.#waitMirrorsReady(source, dest, plan);
      }

      this.#enter('ram');
      const sinceMigration = await this.#startRamMigration(source, dest);
      await this.#waitPreSwitchover(source, dest, plan, sinceMigration);

      this.#enter('switchover');
      const stoppedAt = performance.now() - (await this.#pausedForMs(source, sinceMigration));
      if (!lazy) await this.#completeMirrors(source, plan);
      const qemuDowntimeMs = await this.#continueSwitchover(source, sinceMigration);

      this.#enter('confirm');
      await this.#waitDestinationComplete(dest);
      await this.#resumeDestination(dest);
      const downtimeMs = performance.now() - stoppedAt;
      const destinationRunningMs = performance.now() - this.#started;

      let hydration: { hydrationMs: number; hydratedWireBytes: number | undefined } | undefined;
      if (sourceExport) {
        // The guest runs on the destination and reads what it lacks from the source, which must
        // therefore stay up (paused, serving its export) until every overlay holds everything.
        this.#enter('hydrate');
        await this.#tidy('activate the source disks again for its export', () => this.#reactivateSourceDisks(source!, plan));
        hydration = await this.#hydrate(dest, plan, sourceExport);
      }

      // The guest runs on the destination. What follows only tidies up: it cannot fail the
      // migration, only warn, and the NBD plumbing goes after `cont` so it adds nothing to the pause.
      this.#enter('cleanup');
      const diskBytes = sourceExport ? (hydration?.hydratedWireBytes ?? 0) : await this.#progress.finalDiskBytes();
      if (sourceExport) {
        await this.#tidy("stop the source's NBD export", () => this.#unexportSourceDisks(source!, plan));
      } else {
        await this.#tidy('detach the source NBD nodes', () => this.#detachSourceTargets(source!, plan));
        await this.#tidy("stop the destination's NBD server", () => this.#stopDestinationNbd(dest));
      }
      const bitmapsMigrated = await this.#bitmapsOn(dest.vm.qmp, plan);
      await this.#retireSource(source);
      await dest.vm.release();
      this.#enter('done');
      const result = this.#result(plan, downtimeMs, qemuDowntimeMs, diskBytes, this.#progress.ramTransferred, bitmapsMigrated);
      if (hydration) result.lazy = { destinationRunningMs: Math.round(destinationRunningMs), ...hydration };
      return result;
    } catch (err) {
      throw await this.#fail(err, source);
    }
  }

  // ---------------------------------------------------------------- preflight

  async #connectSource(): Promise<SourceState> {
    let qmp: QmpClient;
    try {
      qmp = await this.#req.source.connect({ timeoutMs: 10_000, signal: this.#signal });
    } catch (err) {
      throw new MigrationError('SOURCE_UNREACHABLE', `cannot reach the source VM's QMP (${this.#req.source.name}): ${errorText(err)}`, {
        phase: 'preflight',
        cause: err,
        userError: true,
      });
    }
    const caps = await qmp.probeCapabilities({ timeoutMs: QMP_TIMEOUT_MS, signal: this.#signal });
    const status = await qmp.execute('query-status', undefined, this.#call());
    return { qmp, caps, wasRunning: status.status === 'running' };
  }

  async #preflight(source: SourceState): Promise<MigrationPlan> {
    const { spec } = this.#req;
    const problems: string[] = [];
    for (const cmd of ['blockdev-add', 'blockdev-mirror', 'block-job-cancel', 'migrate', 'migrate-continue']) {
      if (!source.caps.hasCommand(cmd)) problems.push(`source QEMU lacks the command ${cmd}`);
    }
    for (const cap of ['events', 'pause-before-switchover']) {
      if (!source.caps.migrationCapabilities.has(cap)) problems.push(`source QEMU lacks the migration capability ${cap}`);
    }

    const status = await source.qmp.execute('query-status', undefined, this.#call());
    if (!['running', 'paused'].includes(status.status)) {
      problems.push(`source VM is in state '${status.status}', not running or paused`);
    }
    const mig = await source.qmp.execute('query-migrate', undefined, this.#call());
    if (mig.status && !['none', 'completed', 'failed', 'cancelled'].includes(mig.status)) {
      problems.push(`a migration is already in progress on the source (status ${mig.status})`);
    }
    const blockJobs = await source.qmp.execute('query-block-jobs', undefined, this.#call());
    if (blockJobs.length > 0) problems.push(`the source has block jobs running: ${blockJobs.map((j) => j.device).join(', ')}`);

    // The spec must describe the running VM, disk for disk: the destination is started from it.
    const nodes = await source.qmp.execute('query-named-block-nodes', { flat: true }, this.#call());
    const byName = new Map(nodes.map((n) => [n['node-name'], n]));
    const destSpec = this.#targetSpec();
    if (this.#opts.mode === 'lazy') {
      for (const cmd of ['nbd-server-start', 'block-export-add', 'block-export-del']) {
        if (!source.caps.hasCommand(cmd)) problems.push(`lazy mode: source QEMU lacks the command ${cmd}`);
      }
    }
    const disks: MigrationPlan['disks'] = [];
    const bitmaps: MigrationPlan['bitmaps'] = [];
    for (const [i, disk] of spec.disks.entries()) {
      const node = byName.get(diskNodeName(disk.id));
      if (!node) {
        problems.push(
          `spec does not match the running source: disk '${disk.id}' (node ${diskNodeName(disk.id)}) is not there; the source has ${[...byName.keys()].filter((n): n is string => n !== undefined && !n.startsWith('#')).join(', ') || 'no named nodes'}`,
        );
        continue;
      }
      if (node.drv !== disk.format) {
        problems.push(`spec does not match the running source: disk '${disk.id}' is ${node.drv}, the spec says ${disk.format}`);
      }
      if (node.file !== disk.path) {
        problems.push(`spec does not match the running source: disk '${disk.id}' is ${node.file}, the spec says ${disk.path}`);
      }
      const virtualSize = node.image['virtual-size'];
      if (disk.virtualSize !== undefined && disk.virtualSize !== virtualSize) {
        problems.push(`spec does not match the running source: disk '${disk.id}' has ${virtualSize} bytes, the spec says ${disk.virtualSize}`);
      }
      for (const b of node['dirty-bitmaps'] ?? []) {
        if (b.name) bitmaps.push({ disk: disk.id, name: b.name, persistent: b.persistent, count: b.count });
      }
      disks.push({
        id: disk.id,
        format: destSpec.disks[i]!.format,
        virtualSize,
        allocatedBytes: node.image['actual-size'] ?? virtualSize,
        sourcePath: disk.path,
        destinationPath: destSpec.disks[i]!.path,
        // The target is a fresh image that reads as zeros, so copying what the source allocates
        // is the whole disk. 'full' would mark every range dirty (QEMU cannot tell that an NBD
        // target unmaps on write-zeroes) and the empty ranges would count against the speed cap.
        // With a backing file, 'top' would leave the chain behind: flatten instead.
        sync: node.backing_file ? 'full' : 'top',
      });
    }
    if (this.#opts.mode === 'lazy' && bitmaps.length > 0) {
      // Not verified yet: the bitmap would land on the overlay while the data is still behind it.
      problems.push(`lazy mode does not move dirty bitmaps yet (found ${bitmaps.map((b) => `${b.disk}/${b.name}`).join(', ')}); use precopy`);
    }
    const memory = await source.qmp.executeRaw('query-memory-size-summary', undefined, this.#call());
    const ramBytes = readBaseMemory(memory) ?? spec.memoryMiB * 1024 * 1024;
    if (ramBytes !== spec.memoryMiB * 1024 * 1024) {
      problems.push(`spec does not match the running source: it has ${ramBytes / 1048576} MiB of RAM, the spec says ${spec.memoryMiB}`);
    }

    problems.push(...(await this.#req.destination.checkTarget(destSpec)));
    const needed = disks.reduce((s, d) => s + d.allocatedBytes, 0) + SPACE_MARGIN_BYTES;
    const free = await this.#req.destination.freeBytes(destSpec).catch(() => undefined);
    if (free !== undefined && free < needed) {
      problems.push(`not enough space on ${this.#req.destination.name}: the disks hold ${mib(needed - SPACE_MARGIN_BYTES)} MiB, ${mib(free)} MiB free`);
    }

    // QEMU versions and machine type: forward only, the destination pinned to the source's type.
    const pair = await checkQemuPair(source.qmp, this.#req.destination, this.#call());
    problems.push(...pair.problems);
    this.#destinationMachine = pair.machine;

    if (problems.length > 0) {
      throw new MigrationError('PREFLIGHT_REFUSED', `cannot migrate ${spec.name}:\n  - ${problems.join('\n  - ')}`, {
        phase: 'preflight',
        userError: true,
        context: { problems },
      });
    }
    const gib = (needed + ramBytes) / 2 ** 30;
    return {
      migrationId: this.id,
      vm: spec.name,
      source: this.#req.source.name,
      destination: this.#req.destination.name,
      destinationHost: this.#req.destination.migrationHost,
      disks,
      ramBytes,
      mode: this.#opts.mode,
      copyMode: this.#opts.copyMode,
      bitmaps,
      capabilities: {
        source: [...source.caps.migrationCapabilities].sort(),
        destination: [],
      },
      deadlineMs: Math.round(this.#opts.deadlineBaseMs + this.#opts.deadlinePerGiBMs * gib),
    };
  }

  // ---------------------------------------------------------------- prepare destination

  /**
   * The destination's spec. In lazy mode every disk is a qcow2 overlay (named .qcow2) whose
   * backing is the source's export until hydration ends; after that it stands alone.
   */
  #targetSpec(): VmSpec {
    const spec = { ...this.#req.destination.targetSpec(this.#req.spec, this.id), ...(this.#destinationMachine ? { machine: this.#destinationMachine } : {}) };
    if (this.#opts.mode !== 'lazy') return spec;
    return { ...spec, disks: spec.disks.map((d) => ({ ...d, format: 'qcow2' as const, path: d.path.replace(/(\.(raw|img|qcow2))?$/, '.qcow2') })) };
  }

  async #prepareDestination(plan: MigrationPlan, sourceExport?: SourceExport): Promise<DestinationState> {
    const d = this.#req.destination;
    const spec = this.#targetSpec();
    for (const [i, disk] of plan.disks.entries()) {
      const backingNbd = sourceExport
        ? { host: this.#req.source.exportHost, port: sourceExport.port, export: exportName(this.id, disk.id), reconnectDelayS: this.#opts.nbdReconnectDelayS }
        : undefined;
      await d.createDisk({ path: disk.destinationPath, format: disk.format, virtualSize: disk.virtualSize, ...(backingNbd ? { backingNbd } : {}) });
      this.#undo.push(`remove destination disk ${spec.disks[i]!.id}`, 'destination', () => d.removeDisk(disk.destinationPath));
    }
    this.#undo.push('remove destination run dir', 'destination', () => d.removeRunDir(spec));
    const vm = await d.startIncoming(spec, { timeoutMs: 30_000, signal: this.#signal });
    this.#undo.push(STOP_DESTINATION, 'destination', async () => {
      await vm.qmp.close().catch(() => undefined);
      if (vm.running()) await vm.kill();
    });
    const caps = await vm.qmp.probeCapabilities(this.#call());
    plan.capabilities.destination = [...caps.migrationCapabilities].sort();
    for (const cmd of sourceExport ? ['migrate-incoming'] : ['nbd-server-start', 'block-export-add', 'migrate-incoming']) {
      if (!caps.hasCommand(cmd)) throw new MigrationError('DESTINATION_UNSUPPORTED', `destination QEMU lacks ${cmd}`, { phase: this.#phase });
    }

    if (sourceExport) {
      if (!caps.hasCommand('block-stream')) throw new MigrationError('DESTINATION_UNSUPPORTED', 'destination QEMU lacks block-stream (lazy mode)', { phase: this.#phase });
      return { spec, vm, caps, nbdPort: 0, migrationPort: 0, since: vm.qmp.eventCursor() };
    }
    const nbdPort = await this.#onFreePort((port) =>
      vm.qmp.execute(
        'nbd-server-start',
        { addr: { type: 'inet', data: { host: d.migrationHost, port: String(port) } } },
        this.#call(),
      ),
    );
    // Exporting a node of a QEMU in -incoming defer activates it for writing; that is what lets
    // the mirror fill it before the migration stream arrives.
    for (const disk of plan.disks) {
      const name = exportName(this.id, disk.id);
      await vm.qmp.execute(
        'block-export-add',
        { type: 'nbd', id: name, 'node-name': diskNodeName(disk.id), name, writable: true },
        this.#call(),
      );
    }
    return { spec, vm, caps, nbdPort, migrationPort: 0, since: vm.qmp.eventCursor() };
  }

  /** Tries candidate ports until QEMU binds one; another process may hold any of them. */
  async #onFreePort(bind: (port: number) => Promise<unknown>, where: { host: string; ports: Iterable<number> } = { host: this.#req.destination.migrationHost, ports: this.#req.destination.candidatePorts() }): Promise<number> {
    let tried = 0;
    let last: unknown;
    for (const port of where.ports) {
      if (tried++ >= 50) break;
      try {
        await bind(port);
        return port;
      } catch (err) {
        if (!(err instanceof QmpCommandError) || !/in use|bind/i.test(err.desc)) throw err;
        last = err;
      }
    }
    throw new MigrationError('NO_FREE_PORT', `no free port on ${where.host} after ${tried} tries: ${errorText(last)}`, {
      phase: this.#phase,
      cause: last,
    });
  }

  // ---------------------------------------------------------------- lazy mode: export and hydrate

  /**
   * The source serves each disk read-only over NBD. Read-only matters: a writable export could
   * not be inactivated when the migration completes, and the source must stop writing then.
   */
  async #exportSourceDisks(source: SourceState, plan: MigrationPlan): Promise<SourceExport> {
    const q = source.qmp;
    const src = this.#req.source;
    const port = await this.#onFreePort(
      (p) => q.execute('nbd-server-start', { addr: { type: 'inet', data: { host: src.exportHost, port: String(p) } } }, this.#call()),
      { host: src.exportHost, ports: src.candidateExportPorts() },
    );
    this.#undo.push("stop the source's NBD server", 'source', async () => {
      await q.execute('nbd-server-stop', undefined, { timeoutMs: QMP_TIMEOUT_MS });
    });
    for (const disk of plan.disks) {
      const name = exportName(this.id, disk.id);
      // QEMU >= 10.0 refuses I/O (EPERM) on an export whose node is inactive, as the source's are
      // once the migration completes, unless allowed; 7.2 has no such check and no such option.
      const inactive = source.caps.hasArgument('block-export-add', 'allow-inactive') ? { 'allow-inactive': true } : {};
      await q.execute('block-export-add', { type: 'nbd', id: name, 'node-name': diskNodeName(disk.id), name, writable: false, ...inactive }, this.#call());
      this.#undo.push(`remove source export ${name}`, 'source', async () => {
        await q.execute('block-export-del', { id: name, mode: 'hard' }, { timeoutMs: QMP_TIMEOUT_MS });
      });
    }
    return { port };
  }

  /**
   * QEMU >= 10.0 answers only reads on an export whose node is inactive, as the source's are once
   * the migration completed, and block-stream also asks for block status (EPERM). Past the point
   * of no return the source's guest is stopped for good: its nodes are activated again only to
   * serve the read-only export. QEMU 7.2 serves inactive nodes fully and has no blockdev-set-active.
   */
  async #reactivateSourceDisks(source: SourceState, plan: MigrationPlan): Promise<void> {
    if (!source.caps.hasCommand('blockdev-set-active')) return;
    for (const disk of plan.disks) {
      await source.qmp.executeRaw('blockdev-set-active', { 'node-name': diskNodeName(disk.id), active: true }, this.#call());
    }
  }

  async #unexportSourceDisks(source: SourceState, plan: MigrationPlan): Promise<void> {
    for (const disk of plan.disks) {
      await source.qmp.execute('block-export-del', { id: exportName(this.id, disk.id), mode: 'hard' }, this.#call());
    }
    await source.qmp.execute('nbd-server-stop', undefined, this.#call());
  }

  /**
   * block-stream per disk pulls what the overlay lacks from the source, at the caller's rate.
   * Zero ranges cross the wire as NBD holes, so only allocated data moves. A stream that fails
   * (source unreachable past the reconnect delay) is started again: it skips what already
   * arrived. Past the point of no return, a failure is reported loudly and never rolled back.
   */
  async #hydrate(dest: DestinationState, plan: MigrationPlan, sourceExport: SourceExport): Promise<{ hydrationMs: number; hydratedWireBytes: number | undefined }> {
    const q = dest.vm.qmp;
    const started = performance.now();
    const timeoutMs = this.#opts.commandTimeoutMs;
    const wireAtStart = (await this.#req.source.nbdBytesServed(sourceExport.port)) ?? 0;
    let wireSeen: number | undefined;
    // A reconnect (network blip) starts a new socket whose counter starts at zero: what the old
    // one carried is kept in wireBase.
    let wireBase = 0;
    let wireLast = 0;
    const countWire = (sample: number | undefined): void => {
      if (sample === undefined) return;
      if (sample < wireLast) {
        wireBase += wireLast;
        this.#log.warn({ before: wireLast, now: sample }, 'the NBD connection to the source was re-established');
      }
      wireLast = sample;
      wireSeen = Math.max(wireSeen ?? 0, wireBase + sample);
    };
    let pending = plan.disks.map((d) => d.id);
    for (let attempt = 1; pending.length > 0; attempt++) {
      const since = q.eventCursor();
      for (const id of pending) {
        await q.execute(
          'block-stream',
          { 'job-id': streamJobId(id), device: diskNodeName(id), 'auto-finalize': false, 'auto-dismiss': false, ...(this.#opts.hydrationBytesPerSec ? { speed: this.#opts.hydrationBytesPerSec } : {}) },
          { timeoutMs },
        );
      }
      const failed: { id: string; error: string }[] = [];
      let lastMoved = performance.now();
      let lastDone = -1;
      for (;;) {
        const jobs = await q.execute('query-block-jobs', undefined, { timeoutMs });
        countWire(await this.#req.source.nbdBytesServed(sourceExport.port));
        const disks = plan.disks.map((d) => {
          const job = jobs.find((j) => j.device === streamJobId(d.id));
          const finished = !pending.includes(d.id) || job?.status === 'pending' || job?.status === 'concluded';
          return { id: d.id, doneBytes: finished && !job?.len ? d.virtualSize : (job?.offset ?? 0), totalBytes: job?.len || d.virtualSize };
        });
        this.#emit({ event: 'hydration', migrationId: this.id, disks, wireBytes: wireSeen === undefined ? undefined : wireSeen - wireAtStart, elapsedMs: Math.round(performance.now() - started) });
        const states = await q.execute('query-jobs', undefined, { timeoutMs });
        const ours = pending.map((id) => ({ id, job: states.find((j) => j.id === streamJobId(id)) }));
        // auto-finalize is off: a finished stream waits in 'pending' with its backing (and the
        // NBD connection whose byte counter we read) still attached. Count, then let go.
        if (ours.every((o) => !o.job || o.job.status === 'pending' || o.job.status === 'concluded')) {
          countWire(await this.#req.source.nbdBytesServed(sourceExport.port));
          const since2 = q.eventCursor();
          for (const o of ours) if (o.job?.status === 'pending') await q.executeRaw('job-finalize', { id: streamJobId(o.id) }, { timeoutMs });
          for (const o of ours) {
            if (o.job?.status !== 'pending') continue;
            const id = streamJobId(o.id);
            await q.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === id && e.data.status === 'concluded', { since: since2, timeoutMs, what: `stream ${id} to conclude` });
          }
          const final = await q.execute('query-jobs', undefined, { timeoutMs });
          for (const o of ours) {
            const job = final.find((j) => j.id === streamJobId(o.id));
            if (job?.error) failed.push({ id: o.id, error: job.error });
            if (job) await q.execute('job-dismiss', { id: streamJobId(o.id) }, { timeoutMs });
          }
          break;
        }
        const done = disks.reduce((sum, d) => sum + d.doneBytes, 0);
        if (done !== lastDone) {
          lastDone = done;
          lastMoved = performance.now();
        } else if (performance.now() - lastMoved > this.#opts.progressTimeoutMs + this.#opts.nbdReconnectDelayS * 1000) {
          throw new MigrationError('HYDRATION_STALLED', `hydration made no progress for ${this.#opts.progressTimeoutMs} ms; the guest runs on ${this.#req.destination.name} and still reads unhydrated blocks from ${this.#req.source.name}, which must stay up`, {
            phase: this.#phase,
            guestOn: 'destination',
          });
        }
        // Past the point of no return: neither a cancel nor the total timeout may stop this
        // (the guest needs every block); only the stall check above bounds it.
        await this.#nap(q, (e) => e.event === 'JOB_STATUS_CHANGE' || e.event === 'BLOCK_JOB_ERROR', since, null);
      }
      pending = failed.map((f) => f.id);
      if (pending.length === 0) break;
      const why = failed.map((f) => `${f.id}: ${f.error}`).join('; ');
      if (attempt >= this.#opts.hydrationAttempts) {
        throw new MigrationError(
          'HYDRATION_FAILED',
          `hydration failed after ${attempt} attempts (${why}). The guest runs on ${this.#req.destination.name}; reads of blocks not yet hydrated fail with I/O errors until the source (${this.#req.source.name}) serves its export again. Do not stop the source QEMU; see docs/migration.md, lazy mode.`,
          { phase: this.#phase, guestOn: 'destination' },
        );
      }
      this.#emit({ event: 'warning', migrationId: this.id, message: `hydration attempt ${attempt} failed (${why}); resuming` });
      await new Promise((r) => setTimeout(r, 1_000));
    }
    const hydrationMs = Math.round(performance.now() - started);
    const hydratedWireBytes = wireSeen === undefined ? undefined : wireSeen - wireAtStart;
    // The last sample may predate the streams' end: progress consumers get a final 100%.
    this.#emit({ event: 'hydration', migrationId: this.id, disks: plan.disks.map((d) => ({ id: d.id, doneBytes: d.virtualSize, totalBytes: d.virtualSize })), wireBytes: hydratedWireBytes, elapsedMs: hydrationMs });
    return { hydrationMs, hydratedWireBytes };
  }

  // ---------------------------------------------------------------- mirror

  async #startMirrors(source: SourceState, dest: DestinationState, plan: MigrationPlan): Promise<void> {
    const q = source.qmp;
    for (const disk of plan.disks) {
      const node = targetNodeName(disk.id);
      await q.execute(
        'blockdev-add',
        {
          driver: 'nbd',
          'node-name': node,
          server: { type: 'inet', host: this.#req.destination.migrationHost, port: String(dest.nbdPort) },
          export: exportName(this.id, disk.id),
        },
        this.#call(),
      );
      this.#undo.push(`delete source NBD node ${node}`, 'source', async () => {
        await q.execute('blockdev-del', { 'node-name': node }, { timeoutMs: QMP_TIMEOUT_MS });
      });
      const job = mirrorJobId(disk.id);
      await q.execute(
        'blockdev-mirror',
        {
          'job-id': job,
          device: diskNodeName(disk.id),
          target: node,
          sync: disk.sync,
          'copy-mode': this.#opts.copyMode,
          // Kept after they end so a failure's reason can be read; dismissed by ferry.
          'auto-dismiss': false,
          ...(this.#opts.bandwidthBytesPerSec ? { speed: this.#opts.bandwidthBytesPerSec } : {}),
        },
        this.#call(),
      );
      this.#undo.push(`cancel mirror ${job}`, 'source', () => cancelJob(q, job));
    }
  }

  async #waitMirrorsReady(source: SourceState, dest: DestinationState, plan: MigrationPlan): Promise<void> {
    const progress = this.#progress!;
    for (;;) {
      this.#throwIfAborted();
      await this.#throwIfDestinationDied(dest);
      const jobs = await this.#mirrorJobs(source, plan);
      const snapshot = await progress.sample(source.qmp, dest, this.#phase, this.#downtimeLimitMs, undefined);
      this.#emit({ event: 'progress', migrationId: this.id, progress: snapshot });
      this.#checkStalled(progress);
      if (jobs.every((j) => j.status === 'ready')) return;
      await this.#nap(source.qmp, (e) => e.event === 'BLOCK_JOB_READY' || e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_ERROR');
    }
  }

  /** The mirrors' states; a mirror that ended or failed before switchover is a failure. */
  async #mirrorJobs(source: SourceState, plan: MigrationPlan): Promise<{ id: string; status: string }[]> {
    const jobs = await source.qmp.execute('query-jobs', undefined, this.#call());
    return plan.disks.map((disk) => {
      const id = mirrorJobId(disk.id);
      const job = jobs.find((j) => j.id === id);
      if (!job) throw new MigrationError('MIRROR_VANISHED', `mirror ${id} is gone`, { phase: this.#phase });
      if (job.error || ['concluded', 'aborting', 'null'].includes(job.status)) {
        throw new MigrationError('MIRROR_FAILED', `mirror of disk '${disk.id}' failed: ${job.error ?? job.status}`, {
          phase: this.#phase,
          context: { job: id },
        });
      }
      return { id, status: job.status };
    });
  }

  // ---------------------------------------------------------------- ram

  async #startRamMigration(source: SourceState, dest: DestinationState): Promise<number> {
    const sq = source.qmp;
    const dq = dest.vm.qmp;

    // Saved before they are changed, so a rollback leaves the source as it found it.
    const savedCaps = await sq.execute('query-migrate-capabilities', undefined, this.#call());
    const savedParams = await sq.execute('query-migrate-parameters', undefined, this.#call());
    const want: Record<string, boolean> = { events: true, 'pause-before-switchover': true };
    const moveBitmaps = this.#plan!.bitmaps.length > 0;
    if (moveBitmaps) {
      // Without the capability the destination would come up without them, and the next
      // incremental backup there would silently miss every block written before the move.
      if (!source.caps.migrationCapabilities.has('dirty-bitmaps') || !dest.caps.migrationCapabilities.has('dirty-bitmaps')) {
        throw new MigrationError('BITMAPS_UNSUPPORTED', 'the source disks carry dirty bitmaps but a side lacks the dirty-bitmaps migration capability', {
          phase: this.#phase,
          userError: true,
        });
      }
      want['dirty-bitmaps'] = true;
    }
    if (source.caps.migrationCapabilities.has('auto-converge')) want['auto-converge'] = this.#opts.autoConverge;
    await sq.execute(
      'migrate-set-capabilities',
      { capabilities: Object.entries(want).map(([capability, state]) => ({ capability, state })) },
      this.#call(),
    );
    this.#undo.push('restore source migration capabilities', 'source', async () => {
      const back = savedCaps.filter((c) => c.capability in want).map((c) => ({ capability: c.capability, state: c.state }));
      await sq.execute('migrate-set-capabilities', { capabilities: back }, { timeoutMs: QMP_TIMEOUT_MS });
    });
    await sq.execute(
      'migrate-set-parameters',
      {
        'max-bandwidth': this.#opts.bandwidthBytesPerSec ?? UNLIMITED_BANDWIDTH,
        'downtime-limit': this.#downtimeLimitMs,
      },
      this.#call(),
    );
    this.#undo.push('restore source migration parameters', 'source', async () => {
      await sq.execute(
        'migrate-set-parameters',
        { 'max-bandwidth': savedParams['max-bandwidth'], 'downtime-limit': savedParams['downtime-limit'] },
        { timeoutMs: QMP_TIMEOUT_MS },
      );
    });

    const destCaps: { capability: string; state: boolean }[] = [{ capability: 'events', state: true }];
    // Like libvirt: the destination's disks are activated by `cont`, not when RAM arrives.
    if (dest.caps.migrationCapabilities.has('late-block-activate')) destCaps.push({ capability: 'late-block-activate', state: true });
    if (moveBitmaps) destCaps.push({ capability: 'dirty-bitmaps', state: true });
    await dq.execute('migrate-set-capabilities', { capabilities: destCaps }, this.#call());
    dest.since = dq.eventCursor();
    dest.migrationPort = await this.#onFreePort((port) =>
      dq.execute('migrate-incoming', { uri: `tcp:${this.#req.destination.migrationHost}:${port}` }, this.#call()),
    );

    const since = sq.eventCursor();
    // From here until the destination runs, cancelling means: cancel the migration, resume the
    // source if it is paused. The undo below does exactly that, in every later state.
    await sq.execute('migrate', { uri: `tcp:${this.#req.destination.migrationHost}:${dest.migrationPort}` }, this.#call());
    this.#undo.push('cancel migration and resume source', 'source', () => this.#cancelAndResumeSource(source));
    return since;
  }

  async #waitPreSwitchover(source: SourceState, dest: DestinationState, plan: MigrationPlan, since: number): Promise<void> {
    const progress = this.#progress!;
    const deadline = this.#started + plan.deadlineMs;
    let lastSync = 0;
    let syncsAtLimit = 0;
    for (;;) {
      this.#throwIfAborted();
      await this.#throwIfDestinationDied(dest);
      const mig = await source.qmp.execute('query-migrate', undefined, this.#call());
      if (mig.status === 'pre-switchover') return;
      if (mig.status === 'failed' || mig.status === 'cancelled') {
        throw new MigrationError('RAM_MIGRATION_FAILED', `migration ${mig.status}: ${mig['error-desc'] ?? 'no reason given'}`, {
          phase: this.#phase,
        });
      }
      if (plan.mode !== 'lazy') await this.#mirrorJobs(source, plan);
      const snapshot = await progress.sample(source.qmp, dest, this.#phase, this.#downtimeLimitMs, mig);
      this.#emit({ event: 'progress', migrationId: this.id, progress: snapshot });
      this.#checkStalled(progress);

      // Convergence: each new dirty sync that did not end the iteration steps the downtime limit
      // up, by half, within the bound the caller set.
      const sync = mig.ram?.['dirty-sync-count'] ?? 0;
      if (sync > lastSync) {
        if (lastSync > 0 && sync >= 4) syncsAtLimit++;
        lastSync = sync;
        if (syncsAtLimit >= 2 && this.#downtimeLimitMs < this.#opts.maxDowntimeLimitMs) {
          syncsAtLimit = 0;
          const next = Math.min(this.#opts.maxDowntimeLimitMs, Math.ceil(this.#downtimeLimitMs * 1.5));
          await this.#setDowntimeLimit(source, next, `RAM not converging after ${sync} dirty syncs`);
        }
      }
      if (performance.now() > deadline && !this.#forced) {
        if (this.#opts.onDeadline === 'abort') {
          this.#emit({ event: 'convergence', migrationId: this.id, action: 'deadline-abort', downtimeLimitMs: this.#downtimeLimitMs, detail: `deadline of ${plan.deadlineMs} ms passed` });
          throw new MigrationError('DEADLINE', `migration did not converge within its deadline of ${plan.deadlineMs} ms (policy: abort)`, {
            phase: this.#phase,
          });
        }
        // Force: a downtime limit large enough for what remains makes QEMU stop and switch over
        // at the next iteration; the pause is long but bounded by the link.
        this.#forced = true;
        const remaining = mig.ram?.remaining ?? 0;
        const bytesPerMs = Math.max(1, (mig.ram?.mbps ?? 100) * 125);
        const needed = Math.min(600_000, Math.max(this.#opts.maxDowntimeLimitMs, Math.ceil((remaining / bytesPerMs) * 2)));
        this.#emit({ event: 'convergence', migrationId: this.id, action: 'deadline-force', downtimeLimitMs: needed, detail: `deadline of ${plan.deadlineMs} ms passed` });
        await this.#setDowntimeLimit(source, needed, 'deadline passed, forcing switchover');
      }
      await this.#nap(source.qmp, (e) => e.event === 'MIGRATION', since);
    }
  }

  /**
   * How long the guest has been paused when pre-switchover is seen: QEMU stops the vCPUs first.
   * Both timestamps come from the source's clock, so the downtime figure has no cross-host skew.
   */
  async #pausedForMs(source: SourceState, since: number): Promise<number> {
    try {
      const opts = { since, timeoutMs: 50 };
      const stop = await source.qmp.waitForEvent(isEvent('STOP'), opts);
      const pre = await source.qmp.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'pre-switchover', opts);
      const ms = (t: { seconds: number; microseconds: number }): number => t.seconds * 1000 + t.microseconds / 1000;
      return Math.max(0, ms(pre.timestamp) - ms(stop.timestamp));
    } catch {
      return 0;
    }
  }

  async #setDowntimeLimit(source: SourceState, ms: number, why: string): Promise<void> {
    await source.qmp.execute('migrate-set-parameters', { 'downtime-limit': ms }, this.#call());
    this.#downtimeLimitMs = ms;
    this.#downtimeSteps++;
    this.#log.info({ downtimeLimitMs: ms, why }, 'downtime limit raised');
    this.#emit({ event: 'convergence', migrationId: this.id, action: 'downtime-step', downtimeLimitMs: ms, detail: why });
  }

  // ---------------------------------------------------------------- switchover

  /**
   * The guest is paused at pre-switchover. Cancelling a READY mirror completes it without
   * pivoting: the destination's disk is a point-in-time copy as of now, and the source keeps its
   * own disk (libvirt does the same, so the source can still be resumed if anything fails later).
   * It must happen before the migration continues: QEMU inactivates the source's disks at the end
   * of the migration and a running job would forbid it.
   */
  async #completeMirrors(source: SourceState, plan: MigrationPlan): Promise<void> {
    const q = source.qmp;
    const since = q.eventCursor();
    for (const disk of plan.disks) {
      await q.execute('block-job-cancel', { device: mirrorJobId(disk.id) }, this.#call());
    }
    for (const disk of plan.disks) {
      const id = mirrorJobId(disk.id);
      await q.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === id && e.data.status === 'concluded', {
        since,
        timeoutMs: this.#opts.commandTimeoutMs,
        signal: this.#signal,
        what: `mirror ${id} to conclude`,
      });
    }
    const jobs = await q.execute('query-jobs', undefined, this.#call());
    for (const disk of plan.disks) {
      const id = mirrorJobId(disk.id);
      const job = jobs.find((j) => j.id === id);
      if (job?.error) {
        throw new MigrationError('MIRROR_FAILED', `mirror of disk '${disk.id}' failed at switchover: ${job.error}`, { phase: this.#phase });
      }
      await q.execute('job-dismiss', { id }, this.#call());
      this.#undo.drop(`cancel mirror ${id}`);
    }
  }

  async #continueSwitchover(source: SourceState, since: number): Promise<number | undefined> {
    const q = source.qmp;
    await q.execute('migrate-continue', { state: 'pre-switchover' }, this.#call());
    const ev = await q.waitForEvent(
      (e) => eventIs(e, 'MIGRATION') && ['completed', 'failed', 'cancelled'].includes(e.data.status),
      { since, timeoutMs: this.#opts.progressTimeoutMs, signal: this.#signal, what: 'the source migration to complete' },
    );
    const mig = await q.execute('query-migrate', undefined, this.#call());
    if (!eventIs(ev, 'MIGRATION') || mig.status !== 'completed') {
      throw new MigrationError('SWITCHOVER_FAILED', `switchover failed: ${mig['error-desc'] ?? mig.status ?? 'unknown'}`, { phase: this.#phase });
    }
    this.#progress!.recordFinalRam(mig);
    return mig.downtime;
  }

  // ---------------------------------------------------------------- confirm

  /** The NBD client nodes must go before the exports can (QEMU refuses to drop an export in use). */
  async #detachSourceTargets(source: SourceState, plan: MigrationPlan): Promise<void> {
    for (const disk of plan.disks) {
      const node = targetNodeName(disk.id);
      await source.qmp.execute('blockdev-del', { 'node-name': node }, this.#call());
      this.#undo.drop(`delete source NBD node ${node}`);
    }
  }

  async #waitDestinationComplete(dest: DestinationState): Promise<void> {
    const q = dest.vm.qmp;
    await q.waitForEvent((e) => eventIs(e, 'MIGRATION') && ['completed', 'failed', 'cancelled'].includes(e.data.status), {
      since: dest.since,
      timeoutMs: this.#opts.commandTimeoutMs,
      signal: this.#signal,
      what: "the destination's incoming migration to end",
    });
    const mig = await q.execute('query-migrate', undefined, this.#call());
    if (mig.status !== 'completed') {
      throw new MigrationError('DESTINATION_INCOMING_FAILED', `destination's incoming migration ${mig.status ?? 'unknown'}: ${mig['error-desc'] ?? ''}`, {
        phase: this.#phase,
      });
    }
    const status = await q.execute('query-status', undefined, this.#call());
    if (status.status !== 'paused') {
      throw new MigrationError('DESTINATION_STATE', `destination is '${status.status}' after the migration, expected paused`, { phase: this.#phase });
    }
  }

  async #stopDestinationNbd(dest: DestinationState): Promise<void> {
    await dest.vm.qmp.execute('nbd-server-stop', undefined, this.#call());
  }

  /**
   * THE POINT OF NO RETURN. Before `cont` reaches the destination, the source can be resumed.
   * After the destination has run, even for an instant, it must never be: the two would diverge.
   * A clear refusal from QEMU means it did not run; a lost reply means we cannot know.
   */
  async #resumeDestination(dest: DestinationState): Promise<void> {
    this.#throwIfAborted();
    this.#emit({ event: 'point-of-no-return', migrationId: this.id, destinationPid: dest.vm.pid });
    const timeoutMs = this.#opts.commandTimeoutMs;
    try {
      await dest.vm.qmp.execute('cont', undefined, { timeoutMs });
    } catch (err) {
      if (err instanceof QmpCommandError) throw err;
      // No answer: ask again on the same session if it still stands.
      const status = await dest.vm.qmp.execute('query-status', undefined, { timeoutMs }).catch(() => undefined);
      if (status?.status === 'running') {
        this.#markPastNoReturn();
        return;
      }
      this.#pastNoReturn = true;
      throw new MigrationError(
        'SWITCHOVER_UNCERTAIN',
        `the destination's 'cont' got no answer (${errorText(err)}); the destination may have run, so the source stays paused. Check the destination QEMU (pid ${dest.vm.pid}) before resuming anything.`,
        { phase: this.#phase, cause: err, guestOn: 'unknown' },
      );
    }
    this.#markPastNoReturn();
    const status = await dest.vm.qmp.execute('query-status', undefined, { timeoutMs });
    if (status.status !== 'running') {
      this.#log.warn({ status: status.status }, 'destination not running right after cont');
    }
  }

  #markPastNoReturn(): void {
    this.#pastNoReturn = true;
    // The destination is the guest now: nothing may resume the source, or remove what runs.
    this.#undo.dropSide('source');
    this.#undo.dropSide('destination');
    this.#log.info('destination running: point of no return passed');
  }

  // ---------------------------------------------------------------- cleanup

  async #retireSource(source: SourceState): Promise<void> {
    try {
      await this.#req.source.retireSource(source.qmp, { timeoutMs: QMP_TIMEOUT_MS });
    } catch (err) {
      // The guest runs on the destination; a source that lingers paused in postmigrate is
      // harmless to the guest but the operator must know.
      this.#warn(`the source QEMU did not exit cleanly: ${errorText(err)}`);
    } finally {
      await source.qmp.close();
    }
  }

  // ---------------------------------------------------------------- failure and rollback

  async #fail(err: unknown, source: SourceState | undefined): Promise<MigrationError> {
    const failedPhase = this.#phase;
    const first = this.#asMigrationError(err, failedPhase);
    if (this.#pastNoReturn) {
      // Nothing to roll back: the undo stack was emptied at the point of no return. The guest
      // runs on the destination unless the error itself says nobody can know.
      this.#enter('failed');
      await source?.qmp.close().catch(() => undefined);
      if (first.guestOn !== 'source') return first;
      return new MigrationError(first.code, first.message, { phase: failedPhase, cause: first.cause ?? err, userError: first.userError, context: first.context as Record<string, unknown>, guestOn: 'destination', cleanupErrors: first.cleanupErrors });
    }
    this.#log.warn({ err: errorText(first), phase: failedPhase }, 'migration failed, rolling back');
    if (this.#undo.size > 0) this.#enter('rollback');
    const report = (step: string, stepErr: unknown): void => {
      this.#emit({ event: 'rollback', migrationId: this.id, step, ok: !stepErr, ...(stepErr ? { error: errorText(stepErr) } : {}) });
      if (stepErr) this.#log.error({ step, err: errorText(stepErr) }, 'rollback step failed');
    };
    // The destination QEMU goes first. It never ran the guest, so killing it is always safe
    // here, and a destination that is alive but silent (frozen, partitioned) would otherwise
    // block the source's QEMU: its NBD client waits forever for replies on an open connection,
    // and every block operation on the source (blockdev-del, the reactivation inside `cont`)
    // waits with it. A dead peer makes them fail at once.
    const cleanupErrors = await this.#undo.runNow(STOP_DESTINATION, report);
    cleanupErrors.push(...(await this.#undo.runAll(report)));
    let guestOn: 'source' | 'unknown' | 'destination' = first.guestOn;
    if (source) {
      // Proof, not hope: the guest is where we say it is.
      const status = await source.qmp.execute('query-status', undefined, { timeoutMs: 5_000 }).catch(() => undefined);
      const expected = source.wasRunning ? 'running' : 'paused';
      if (status?.status !== expected && guestOn === 'source') {
        cleanupErrors.push(new Error(`after rollback the source is '${status?.status ?? 'unreachable'}', expected ${expected}`));
        if (!status) guestOn = 'unknown';
      }
      await source.qmp.close().catch(() => undefined);
    }
    this.#enter('failed');
    return new MigrationError(first.code, first.message, {
      phase: failedPhase,
      cause: first.cause ?? err,
      userError: first.userError,
      context: first.context as Record<string, unknown>,
      guestOn,
      cleanupErrors: [...first.cleanupErrors, ...cleanupErrors],
    });
  }

  #asMigrationError(err: unknown, phase: Phase): MigrationError {
    if (err instanceof MigrationError) return err;
    if (this.#signal.aborted && (!(err instanceof FerryError) || err.code === 'QMP_ABORTED' || err.code === 'MIGRATION_CANCELLED')) {
      const reason = this.#req.signal?.aborted ? 'cancelled' : `total timeout of ${this.#opts.totalTimeoutMs} ms reached`;
      return new MigrationError(this.#req.signal?.aborted ? 'CANCELLED' : 'TOTAL_TIMEOUT', `migration ${reason} during ${phase}`, {
        phase,
        cause: err,
      });
    }
    if (err instanceof FerryError) {
      return new MigrationError(err.code, `${phase}: ${err.message}`, { phase, cause: err, userError: err.userError, context: { ...err.context } });
    }
    return new MigrationError('INTERNAL', `${phase}: ${errorText(err)}`, { phase, cause: err });
  }

  /**
   * Undo of `migrate`, valid in every state before the destination runs: cancel what is still in
   * flight, then make sure the guest runs on the source as it did before. After a completed
   * migration the source sits in postmigrate with its disks inactive; `cont` reactivates them.
   */
  async #cancelAndResumeSource(source: SourceState): Promise<void> {
    const q = source.qmp;
    const opts = { timeoutMs: QMP_TIMEOUT_MS };
    const { status: migStatus } = await cancelMigration(q, QMP_TIMEOUT_MS);
    if (migStatus === 'completed') {
      // The migration completed and inactivated every node, the NBD client nodes too. `cont`
      // would reactivate them, reconnecting to a destination that may be dead or frozen, and the
      // source would hang instead of resuming. They have no use any more: delete them first.
      for (const disk of this.#plan?.disks ?? []) {
        const node = targetNodeName(disk.id);
        await q.execute('blockdev-del', { 'node-name': node }, opts).catch(() => undefined);
        this.#undo.drop(`delete source NBD node ${node}`);
      }
    }
    if (!source.wasRunning) return;
    const status = await q.execute('query-status', undefined, opts);
    if (status.status !== 'running') await q.execute('cont', undefined, opts);
  }

  // ---------------------------------------------------------------- helpers

  #enter(phase: Phase): void {
    const now = performance.now();
    this.#phaseMs[this.#phase] = (this.#phaseMs[this.#phase] ?? 0) + (now - this.#phaseStarted);
    this.#phase = phase;
    this.#phaseStarted = now;
    this.#log.info({ phase }, 'phase');
    this.#emit({ event: 'phase', migrationId: this.id, phase, at: now - this.#started });
  }

  #emit(e: MigrationEvent): void {
    try {
      this.#req.onEvent?.(e);
    } catch (err) {
      this.#log.error({ err: errorText(err) }, 'event listener threw');
    }
  }

  /** Runs a step past the point of no return: a failure is reported, never thrown. */
  async #tidy(what: string, step: () => Promise<void>): Promise<void> {
    try {
      await step();
    } catch (err) {
      this.#warn(`could not ${what}: ${errorText(err)}`);
    }
  }

  #warn(message: string): void {
    this.#log.warn(message);
    this.#emit({ event: 'warning', migrationId: this.id, message });
  }

  #call(): { timeoutMs: number; signal: AbortSignal } {
    return { timeoutMs: this.#opts.commandTimeoutMs, signal: this.#signal };
  }

  #throwIfAborted(): void {
    if (this.#signal.aborted) {
      throw new FerryError('MIGRATION_CANCELLED', 'cancelled', { cause: this.#signal.reason });
    }
  }

  async #throwIfDestinationDied(dest: DestinationState): Promise<void> {
    if (!dest.vm.running()) {
      throw new MigrationError('DESTINATION_DIED', `the destination QEMU (pid ${dest.vm.pid}) exited during ${this.#phase}`, { phase: this.#phase });
    }
  }

  #checkStalled(progress: ProgressTracker): void {
    const idle = progress.idleMs();
    if (idle > this.#opts.progressTimeoutMs) {
      throw new MigrationError('STALLED', `no progress for ${Math.round(idle)} ms during ${this.#phase} (progress timeout ${this.#opts.progressTimeoutMs} ms)`, {
        phase: this.#phase,
      });
    }
  }

  /** Sleeps one progress interval, waking early on a matching event. */
  /** signal null: a wait past the point of no return, which no cancel interrupts. */
  async #nap(q: QmpClient, pred: (e: QmpEvent) => boolean, since?: number, signal: AbortSignal | null = this.#signal): Promise<void> {
    try {
      await q.waitForEvent(pred, {
        timeoutMs: this.#opts.progressIntervalMs,
        ...(signal ? { signal } : {}),
        ...(since === undefined ? {} : { since: Math.max(since, this.#napCursor.get(q) ?? since) }),
      });
    } catch (err) {
      if (!(err instanceof QmpTimeoutError)) throw err;
    }
    // The next nap only wakes for events newer than this one.
    this.#napCursor.set(q, q.eventCursor());
  }
  readonly #napCursor = new WeakMap<QmpClient, number>();

  /** The bitmaps that arrived; one that did not is a warning the operator's backups depend on. */
  async #bitmapsOn(q: QmpClient, plan: MigrationPlan): Promise<{ disk: string; name: string }[]> {
    if (plan.bitmaps.length === 0) return [];
    try {
      const nodes = await q.execute('query-named-block-nodes', { flat: true }, this.#call());
      const found = plan.disks.flatMap((d) =>
        (nodes.find((n) => n['node-name'] === diskNodeName(d.id))?.['dirty-bitmaps'] ?? []).flatMap((b) => (b.name ? [{ disk: d.id, name: b.name }] : [])),
      );
      for (const b of plan.bitmaps) {
        if (!found.some((f) => f.disk === b.disk && f.name === b.name)) this.#warn(`dirty bitmap '${b.name}' of disk '${b.disk}' did not arrive on the destination`);
      }
      return found;
    } catch (err) {
      this.#warn(`could not check the destination's dirty bitmaps: ${errorText(err)}`);
      return [];
    }
  }

  #result(
    plan: MigrationPlan,
    downtimeMs: number,
    qemuDowntimeMs: number | undefined,
    diskBytes: number,
    ramBytes: number,
    bitmapsMigrated: { disk: string; name: string }[] = [],
  ): MigrationResult {
    return {
      ok: true,
      migrationId: this.id,
      plan,
      totalMs: Math.round(performance.now() - this.#started),
      downtimeMs: Math.round(downtimeMs),
      qemuDowntimeMs,
      diskBytes,
      ramBytes,
      phaseMs: Object.fromEntries(Object.entries(this.#phaseMs).map(([k, v]) => [k, Math.round(v)])),
      convergence: {
        downtimeLimitMs: this.#downtimeLimitMs,
        autoConverge: this.#opts.autoConverge,
        forced: this.#forced,
        steps: this.#downtimeSteps,
      },
      bitmapsMigrated,
    };
  }
}

function readBaseMemory(raw: unknown): number | undefined {
  if (typeof raw === 'object' && raw !== null && 'base-memory' in raw) {
    const v = (raw as { 'base-memory': unknown })['base-memory'];
    return typeof v === 'number' ? v : undefined;
  }
  return undefined;
}

function mib(bytes: number): number {
  return Math.round(bytes / 1048576);
}
