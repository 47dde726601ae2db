/**
 * ferry-agent: one per hypervisor host. It owns the QEMUs it starts (VMs of this host, and the
 * destination QEMUs of migrations), keeps every disk path inside its storage root, and carries
 * control traffic only: disk and RAM bytes go QEMU to QEMU. Callers authenticate at the HTTP
 * upgrade with a bearer token; each token is a principal, and a principal sees only its own VMs.
 *
 * Its VMs outlive it (own process group; the unit's KillMode=process): their records are
 * persisted (registry.ts), and a restarted agent re-attaches to the ones still running and
 * reports the ones that died meanwhile.
 */
import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { freemem, totalmem, availableParallelism } from 'node:os';
import { WebSocketServer, type WebSocket } from 'ws';
import type { z } from 'zod';
import { errorText, FerryError } from '../errors.js';
import { rollBackSource } from '../engine/recover.js';
import { nbdRelaySocketPath } from '../engine/data-path.js';
import type { NbdRelayHandle } from '../engine/endpoint.js';
import { LocalDestination } from '../engine/local-endpoint.js';
import { destinationPid } from '../engine/settle-local.js';
import { allocatedBytes, removeEmptyParent } from '../host/disk-files.js';
import { tcpBytesAcked, tcpBytesAckedFrom } from '../host/wire.js';
import { killAndWait } from '../host/processes.js';
import { silentLogger, type Logger } from '../log.js';
import type { QmpEvent } from '../qmp/index.js';
import { launcherQmpSocketPath, qmpSocketPath } from '../qemu/argv.js';
import { defaultQemuBinary, launchVm } from '../qemu/launcher.js';
import type { VmSpec } from '../qemu/spec.js';
import type { QemuBuild } from '../qemu/versions.js';
import { parseAgentConfig, type AgentConfig } from './config.js';
import { bearerAuthenticator, serveRpc } from '../rpc/ws-rpc.js';
import { FENCE_EPOCH_HEADER, FENCE_VM_HEADER } from './client.js';
import { Fences, fenceHeadersSchema, type SessionFence } from './fencing.js';
import { MAX_MESSAGE_BYTES, methodParams, PROTOCOL_VERSION, READ_ONLY_METHODS, type AgentEvent, type HostInfo, type Method, type VmSummary } from './protocol.js';
import { DiskClaims, IncomingDisks } from './claims.js';
import { AgentMetrics, staleCallLabel } from './metrics.js';
import { handleMetricsRequest, startMetricsListener } from '../host/metrics-http.js';
import { AgentError } from './errors.js';
import { Placement } from './placement.js';
import { peerMatcher } from './qmp-policy.js';
import { tunnelQmp } from './qmp-tunnel.js';
import { DEFAULT_HEARTBEAT_MS, keepAlive } from '../rpc/heartbeat.js';
import { AgentDataTls } from './data-tls.js';
import { probeQemu, type QemuInfo } from './qemu-probe.js';
import { TokenBucket } from './rate-limit.js';
import { loadTls } from '../host/tls.js';
import { processStartTime, VmRegistry, type VmRecord } from './registry.js';
import { attachMonitor, supervise, type Supervised } from './supervisor.js';
import { AgentReplicas } from './replicas.js';

export { AgentConfigSchema, type AgentConfig } from './config.js';

export { AgentError } from './errors.js';

export interface RunningAgent {
  port: number;
  url: string;
  metrics: AgentMetrics;
  /** http://…/metrics of `metricsListen`, when configured. */
  metricsUrl?: string;
  /** Stops serving; the VMs keep running, as they do when the process is killed. */
  close(): Promise<void>;
}

interface Session {
  ws: WebSocket;
  principal: string;
  subscribed: boolean;
  /** The scheduler replica's claim this session acts under (fencing.ts), if it named one. */
  fence: SessionFence | undefined;
}

export async function startAgent(input: unknown, logger: Logger = silentLogger): Promise<RunningAgent> {
  const config: AgentConfig = parseAgentConfig(input);
  const log = logger.child({ agent: config.name });
  const qemuBinary = config.qemuBinary ?? defaultQemuBinary();
  const local = new LocalDestination({ dir: config.storageRoot, migrationHost: config.migrationHost, portRange: config.portRange, logger: log, outliveProcess: true, qemuBinary });
  const registry = new VmRegistry(config.stateDir, log);
  const supervised = new Map<string, Supervised>();
  /** VMs whose next exit was asked for (stop, kill, retire): that exit is not a death. */
  const expectingExit = new Set<string>();
  const sessions = new Set<Session>();
  const metrics = new AgentMetrics(() => registry.all());
  let qemuInfo: Promise<QemuInfo> | undefined;
  /** Version and machine types, for a migration engine's preflight; a failed probe is asked again. */
  let qemuBuild: Promise<QemuBuild | undefined> | undefined;

  const summary = (r: VmRecord): VmSummary => ({
    vmId: r.vmId,
    name: r.name,
    role: r.role,
    state: r.state,
    pid: r.pid ?? null,
    running: r.state === 'running',
    memoryMiB: r.spec.memoryMiB,
    diskBytes: r.spec.disks.reduce((sum, d) => sum + allocatedBytes(d.path), 0),
  });

  const emit = (principal: string, event: AgentEvent): void => {
    const frame = JSON.stringify({ v: PROTOCOL_VERSION, event });
    for (const s of sessions) if (s.subscribed && s.principal === principal && s.ws.readyState === s.ws.OPEN) s.ws.send(frame);
  };
  const emitState = (r: VmRecord): void => emit(r.principal, { type: 'vm.state', vm: summary(r) });

  /** Watches a running VM; its exit moves the record to stopped (asked for) or died (not). */
  const watch = (r: VmRecord, sup: Supervised): void => {
    supervised.set(r.vmId, sup);
    void sup.exited.then(() => {
      if (supervised.get(r.vmId) !== sup) return;
      supervised.delete(r.vmId);
      if (registry.get(r.vmId) !== r || r.state !== 'running') return;
      const asked = expectingExit.delete(r.vmId);
      if (!asked) {
        log.warn({ vmId: r.vmId, vm: r.name, pid: r.pid }, 'VM exited without being asked to');
        metrics.vmDied();
      }
      registry.transition(r, asked ? 'stopped' : 'died', { pid: undefined, pidStart: undefined });
      emitState(r);
    });
  };
  const onQmpEvent = (r: VmRecord) => (e: QmpEvent) =>
    emit(r.principal, { type: 'vm.qmp', vmId: r.vmId, name: r.name, event: e.event, data: (e.data ?? {}) as Record<string, unknown>, timestamp: e.timestamp });

  // Re-attach to what a previous run of this agent left running.
  for (const r of registry.load(config.storageRoot)) {
    if (r.state !== 'running') continue;
    const alive = r.pid !== undefined && r.pidStart !== undefined && processStartTime(r.pid) === r.pidStart;
    if (!alive) {
      log.warn({ vmId: r.vmId, vm: r.name, pid: r.pid }, 'VM died while the agent was not running');
      registry.transition(r, 'died', { pid: undefined, pidStart: undefined });
      continue;
    }
    const monitor = await attachMonitor(launcherQmpSocketPath(r.spec), log);
    watch(r, supervise({ pid: r.pid!, pidStart: r.pidStart, monitor, onEvent: onQmpEvent(r), log }));
    log.info({ vmId: r.vmId, vm: r.name, pid: r.pid, role: r.role }, 're-attached to a running VM');
  }

  const authenticate = bearerAuthenticator(config.tokens);

  const dataTls = await AgentDataTls.load(config);
  const claims = new DiskClaims(config.stateDir, log);
  const incomingDisks = new IncomingDisks(config.stateDir, log);
  const fences = new Fences(config.stateDir, log, (what) => metrics.recordStaleCallRefused(staleCallLabel(what)));
  /** QMP tunnels opened under a fence: cut when a later epoch for their VM arrives. */
  const fencedTunnels = new Set<{ fence: SessionFence; ws: WebSocket; cut: () => void }>();
  const placement = new Placement({
    storageRoot: config.storageRoot,
    bootRoots: config.bootRoots,
    stateDir: config.stateDir,
    admins: new Set(config.adminPrincipals),
    claims,
    records: () => registry.all(),
  });
  const peerAllowed = peerMatcher({ peers: config.migrationPeers, migrationHost: config.migrationHost });
  /** A spec from a caller: confined, no raw QEMU options, placed only where this principal may. */
  const hereSpec = (principal: string, input: unknown, opts: { claimed?: boolean } = {}): VmSpec => {
    const spec = placement.confineSpec(input);
    placement.checkPlacement(principal, spec, opts);
    return spec;
  };
  const owned = (principal: string, vmId: string): VmRecord => {
    const r = registry.get(vmId);
    if (!r || (r.principal !== principal && !placement.isAdmin(principal))) throw new AgentError('VM_NOT_FOUND', `no VM '${vmId}' of yours on this host`, { userError: true });
    return r;
  };
  const named = (principal: string, name: string): VmRecord => {
    const r = registry.byName(principal, name);
    if (!r) throw new AgentError('VM_NOT_FOUND', `no VM named '${name}' of yours on this host`, { userError: true });
    return r;
  };
  const newVmId = (name: string): string => `${name.toLowerCase().replace(/[^a-z0-9-]/g, '-').slice(0, 40)}-${randomBytes(4).toString('hex')}`;
  const waitExit = async (sup: Supervised, timeoutMs: number): Promise<boolean> => {
    let timer: NodeJS.Timeout | undefined;
    const exited = await Promise.race([sup.exited.then(() => true), new Promise<false>((r) => (timer = setTimeout(r, timeoutMs, false)))]);
    clearTimeout(timer);
    return exited;
  };
  /** Checked again at use: a run dir removed whole holds only this VM's files, no link. */
  const removeFiles = async (r: VmRecord, disks: boolean): Promise<void> => {
    placement.checkRemovable(r);
    await rm(r.spec.runDir, { recursive: true, force: true });
    if (!disks) return;
    for (const [i, d] of r.spec.disks.entries()) {
      placement.diskPath(d.path, `disks.${i}.path`);
      await rm(d.path, { force: true });
      claims.release(d.path);
    }
  };

  const replicas = new AgentReplicas({
    storageRoot: config.storageRoot,
    migrationHost: config.migrationHost,
    portRange: config.portRange,
    log,
    owned: (principal, vmId) => owned(principal, vmId),
    monitor: (vmId) => supervised.get(vmId)?.monitor,
    peerAllowed,
    claimDisk: (principal, path) => {
      const confined = placement.diskOp(principal, path, 'create');
      claims.claim(confined, principal);
      return confined;
    },
    ownedDisk: (principal, path) => placement.diskOp(principal, path, 'remove'),
    releaseDisk: (path) => claims.release(path),
    dataTls: { mode: dataTls.mode, material: () => dataTls.material() },
    startVm: async (principal, spec) => {
      const created = (await handlers['vm.create'](principal, { spec }, undefined as never)) as { vmId: string };
      const name = registry.get(created.vmId)!.name;
      await handlers['vm.start'](principal, { name }, undefined as never);
      return { vmId: created.vmId, name };
    },
  });
  await replicas.load();

  type Handlers = { [M in Method]: (principal: string, params: z.infer<(typeof methodParams)[M]>, session: Session) => Promise<unknown> };
  const handlers: Handlers = {
    ...replicas.handlers(),
    'host.info': async (): Promise<HostInfo> => {
      qemuInfo ??= probeQemu(qemuBinary);
      const q = await qemuInfo;
      qemuBuild ??= local.probeQemu({ timeoutMs: 10_000 }).catch(() => (qemuBuild = undefined));
      const b = await qemuBuild;
      const running = registry.all().filter((r) => r.state === 'running');
      return {
        name: config.name,
        storageRoot: config.storageRoot,
        freeBytes: await local.freeBytes(),
        migrationHost: config.migrationHost,
        portRange: config.portRange,
        qemuVersion: q.version,
        ...(b ? { qemu: { version: b.version, package: b.package, machines: b.machines.map((m) => m.name) } } : {}),
        migrationCapabilities: q.migrationCapabilities,
        cpus: availableParallelism(),
        memoryBytes: totalmem(),
        freeMemoryBytes: freemem(),
        vmMemoryMiB: running.reduce((s, r) => s + r.spec.memoryMiB, 0),
        runningVms: running.length,
        dataTls: dataTls.info(),
      };
    },
    'fence.advance': async (_p, _params, session) => {
      if (!session.fence) throw new AgentError('NO_FENCE', `fence.advance needs the ${FENCE_VM_HEADER} and ${FENCE_EPOCH_HEADER} headers at the upgrade`, { userError: true });
      // Raised at the upgrade already; a stale one was refused before this handler ran.
      return { vm: session.fence.vm, epoch: session.fence.epoch };
    },
    'fence.status': async () => fences.status(),
    'events.subscribe': async (_p, _params, session) => {
      session.subscribed = true;
      return {};
    },

    'vm.list': async (principal, params) => {
      if (params.all && !placement.isAdmin(principal)) throw new AgentError('NOT_ADMIN', 'vm.list {all: true} is for admin principals only', { userError: true });
      return registry.all().filter((r) => params.all || r.principal === principal).map(summary);
    },
    'vm.get': async (principal, params) => {
      const r = named(principal, params.name);
      return { ...summary(r), spec: r.spec };
    },
    'vm.create': async (principal, params) => {
      const spec = hereSpec(principal, params.spec);
      if (registry.byName(principal, spec.name)) throw new AgentError('VM_EXISTS', `a VM named '${spec.name}' already exists here`, { userError: true });
      for (const d of spec.disks) claims.claim(d.path, principal);
      const r = registry.add({ vmId: newVmId(spec.name), name: spec.name, principal, role: 'vm', state: 'stopped', spec });
      emitState(r);
      return { vmId: r.vmId };
    },
    'vm.start': async (principal, params) => {
      const r = named(principal, params.name);
      if (r.state === 'running') throw new AgentError('VM_RUNNING', `VM '${r.name}' already runs (pid ${r.pid})`, { userError: true });
      // Checked again at use: a link swapped in since vm.create, another VM on the same disk.
      placement.checkPlacement(principal, placement.confineSpec(r.spec), { self: r });
      const p = await launchVm(r.spec, { timeoutMs: 30_000, logger: log, qemuBinary });
      // The agent's VMs outlive the agent (restarts, upgrades): not reaped with this process.
      p.release();
      registry.transition(r, 'running', { pid: p.pid, pidStart: processStartTime(p.pid) });
      watch(r, supervise({ pid: p.pid, pidStart: r.pidStart, monitor: p.qmp, childExited: p.exited, onEvent: onQmpEvent(r), log }));
      emitState(r);
      return { vmId: r.vmId, pid: p.pid };
    },
    'vm.stop': async (principal, params) => {
      const r = named(principal, params.name);
      const sup = supervised.get(r.vmId);
      if (r.state !== 'running' || !sup) throw new AgentError('VM_NOT_RUNNING', `VM '${r.name}' is ${r.state}`, { userError: true });
      expectingExit.add(r.vmId);
      await sup.quit(params.timeoutMs);
      await sup.exited;
      return summary(r);
    },
    'vm.delete': async (principal, params) => {
      const r = named(principal, params.name);
      if (r.state === 'running') throw new AgentError('VM_RUNNING', `VM '${r.name}' runs: stop it first`, { userError: true });
      await removeFiles(r, params.removeDisks);
      registry.remove(r);
      return {};
    },
    'vm.beginDataTls': async (principal, params) => {
      const r = owned(principal, params.vmId);
      const sup = supervised.get(r.vmId);
      if (r.role !== 'vm' || r.state !== 'running' || !sup?.monitor) throw new AgentError('VM_NOT_RUNNING', `VM '${r.name}' is not a running VM of this host`, { userError: true });
      await dataTls.beginSource(r.vmId, r.spec, sup.monitor, params);
      log.info({ vmId: r.vmId, vm: r.name, peer: params.peerIdentity }, 'data-path TLS ready');
      return { identity: dataTls.info().identity };
    },
    'vm.endDataTls': async (principal, params) => {
      const r = owned(principal, params.vmId);
      await dataTls.end(r.vmId, r.spec, supervised.get(r.vmId)?.monitor);
      return {};
    },
    'vm.nbdBytesSent': async (principal, params) => {
      owned(principal, params.vmId);
      const bytes = 'localPort' in params ? await tcpBytesAckedFrom(params.localPort) : await tcpBytesAcked({ host: params.host, port: params.port });
      return { bytes: bytes ?? null };
    },
    'vm.retire': async (principal, params) => {
      const r = owned(principal, params.vmId);
      const sup = supervised.get(r.vmId);
      if (r.role !== 'vm' || r.state !== 'running' || !sup) throw new AgentError('VM_NOT_RUNNING', `VM '${r.name}' is not running here`, { userError: true });
      // Retiring deletes the source's disks: only ever for a guest that has left (postmigrate).
      const status = await sup.status();
      if (status !== 'postmigrate') {
        throw new AgentError('NOT_MIGRATED', `VM '${r.name}' is ${status ?? 'of unknown status'}, not postmigrate: refusing to retire it`, { userError: true });
      }
      expectingExit.add(r.vmId);
      await sup.quit(params.timeoutMs);
      await sup.exited;
      await removeFiles(r, params.removeDisks);
      registry.remove(r);
      log.info({ vmId: r.vmId, vm: r.name, removeDisks: params.removeDisks }, 'retired a migrated VM');
      emit(r.principal, { type: 'vm.retired', vmId: r.vmId, name: r.name });
      return {};
    },

    'dest.check': async (principal, params) => {
      const spec = hereSpec(principal, params.spec);
      const problems = await local.checkTarget(spec);
      const same = registry.byName(principal, spec.name);
      if (same?.state === 'running') problems.push(`a VM named '${spec.name}' already runs on this host`);
      return { problems };
    },
    'dest.createDisk': async (principal, params, session) => {
      const path = placement.diskOp(principal, params.path, 'create');
      if (params.backingNbd && !peerAllowed(params.backingNbd.host)) {
        throw new AgentError('PATH_REFUSED', `backingNbd.host: ${params.backingNbd.host} is not a migration peer this agent allows`, { userError: true });
      }
      if (params.backingNbd && dataTls.mode === 'required' && params.backingNbd.tlsHostname === undefined) {
        throw new AgentError('DATA_TLS_REQUIRED', 'this agent requires TLS on the data path: a lazy overlay\'s backing needs tlsHostname', { userError: true });
      }
      // Claimed before the file exists: a lost reply still leaves the caller able to remove it.
      claims.claim(path, principal);
      incomingDisks.add(path);
      madeBy(session).add(path);
      try {
        await local.createDisk({ ...params, path });
      } catch (err) {
        claims.release(path);
        incomingDisks.remove(path);
        throw err;
      }
      return {};
    },
    'dest.removeDisk': async (principal, params) => {
      if (abandoned.done(principal, placement.diskPath(params.path, 'path'))) return {};
      const path = placement.diskOp(principal, params.path, 'remove');
      await local.removeDisk(path);
      claims.release(path);
      incomingDisks.remove(path);
      return {};
    },
    'dest.start': async (principal, params, session) => {
      const spec = hereSpec(principal, params.spec, { claimed: true });
      if (dataTls.mode === 'required' && !params.dataTls) throw new AgentError('DATA_TLS_REQUIRED', 'this agent requires TLS on the data path: dest.start needs dataTls', { userError: true });
      // Recorded before the launch: an agent killed meanwhile finds, restarted, what it made.
      const r = registry.add({ vmId: newVmId(spec.name), name: spec.name, principal, role: 'incoming', state: 'stopped', spec, contForwarded: false });
      madeBy(session).add(r.vmId);
      for (const d of spec.disks) incomingDisks.remove(d.path);
      let vm: Awaited<ReturnType<typeof local.startIncoming>>;
      try {
        const tls = params.dataTls ? await dataTls.launchObjects(spec, params.dataTls.peerIdentity) : undefined;
        vm = await local.startIncoming(spec, { timeoutMs: 30_000, ...(tls ? { tls } : {}) });
        if (tls) dataTls.markActive(r.vmId);
      } catch (err) {
        // Its disks go back to waiting for a start (or the caller's removeDisk); no QEMU runs.
        for (const d of spec.disks) if (claims.owner(d.path) === principal) incomingDisks.add(d.path);
        registry.remove(r);
        throw err;
      }
      // With tls, the incoming stream's TLS parameters were set by startIncoming, the agent's own
      // call, not by its caller: in required mode no caller can make it plain text.
      registry.transition(r, 'running', { pid: vm.pid, pidStart: processStartTime(vm.pid) });
      // The incoming QEMU's own reaper registration lasts until release: if this agent exits
      // mid-migration, the half-made destination goes with it.
      watch(r, supervise({ pid: vm.pid, pidStart: r.pidStart, monitor: vm.process.qmp, childExited: vm.exited, onEvent: onQmpEvent(r), log }));
      incomingHandles.set(r.vmId, vm);
      emitState(r);
      return { vmId: r.vmId, pid: vm.pid };
    },
    'dest.startNbdRelay': async (principal, params) => {
      const r = owned(principal, params.vmId);
      if (r.role !== 'incoming' || r.state !== 'running') throw new AgentError('NOT_INCOMING', `VM '${r.name}' is not a running migration destination`, { userError: true });
      if (nbdRelays.has(r.vmId)) throw new AgentError('RELAY_EXISTS', `VM '${r.name}' already has an NBD relay`, { userError: true });
      // Its socket is the VM's own run dir's (the only unix address its QMP policy allows).
      const relay = await local.startNbdRelay(r.spec, {});
      nbdRelays.set(r.vmId, relay);
      log.info({ vmId: r.vmId, port: relay.port }, 'NBD relay started');
      return { port: relay.port, unixPath: relay.unixPath };
    },
    'dest.stopNbdRelay': async (principal, params) => {
      if (abandoned.done(principal, params.vmId)) return {};
      const r = owned(principal, params.vmId);
      await closeRelay(r.vmId);
      return {};
    },
    'dest.kill': async (principal, params) => {
      if (abandoned.done(principal, params.vmId)) return {};
      // The record stays until the run dir is gone: the caller's rollback removes it after this.
      const r = owned(principal, params.vmId);
      await closeRelay(r.vmId);
      const sup = supervised.get(r.vmId);
      if (sup) {
        expectingExit.add(r.vmId);
        await sup.kill();
      }
      return {};
    },
    'dest.abandon': async (principal, params) => {
      if (abandoned.done(principal, params.vmId)) return {};
      const r = owned(principal, params.vmId);
      if (r.role !== 'incoming') throw new AgentError('NOT_INCOMING', `VM '${r.name}' is not a migration's destination`, { userError: true });
      await closeRelay(r.vmId);
      const sup = supervised.get(r.vmId);
      if (sup && r.state === 'running') {
        // The one thing a rollback must never do: kill the QEMU that runs the guest.
        const status = await sup.status();
        if (status === undefined || status === 'running') {
          throw new AgentError('GUEST_RUNS_HERE', `the destination QEMU of '${r.name}' is ${status ?? 'of unknown status'}: refusing to abandon it`, { userError: true });
        }
      }
      await abandonIncoming(r);
      return {};
    },
    'dest.release': async (principal, params) => {
      const r = owned(principal, params.vmId);
      if (r.role !== 'incoming') throw new AgentError('NOT_INCOMING', `VM '${r.name}' is not a migration's destination`, { userError: true });
      await closeRelay(r.vmId);
      await incomingHandles.get(r.vmId)?.release();
      incomingHandles.delete(r.vmId);
      // A stopped or dead record of the same name (the guest lived here before) gives way.
      const stale = registry.byName(principal, r.name);
      if (stale && stale !== r) {
        log.info({ vmId: stale.vmId, vm: stale.name, state: stale.state }, 'an older record of this VM gives way to the one that arrived');
        if (stale.state === 'running') throw new AgentError('VM_EXISTS', `a VM named '${r.name}' already runs here`, { userError: true });
        registry.remove(stale);
      }
      registry.adopt(r);
      emitState(r);
      return {};
    },
    'dest.removeRunDir': async (principal, params) => {
      if (abandoned.done(principal, params.vmId)) return {};
      const r = owned(principal, params.vmId);
      if (r.state === 'running') throw new AgentError('VM_RUNNING', `VM '${params.vmId}' still runs: stop it first`, { userError: true });
      placement.checkRemovable(r);
      await local.removeRunDir(r.spec);
      registry.remove(r);
      return {};
    },
  };
  const incomingHandles = new Map<string, { release(): Promise<void> }>();
  /** What each caller's session made for a migration (incoming VMs' ids, disk paths): abandoned if it goes first. */
  const made = new WeakMap<Session, Set<string>>();
  const madeBy = (session: Session): Set<string> => {
    let m = made.get(session);
    if (!m) made.set(session, (m = new Set()));
    return m;
  };
  /**
   * The session that started a migration's destination went (its orchestrator killed, cut off, or
   * done): an incoming VM of it that never ran is abandoned, as are disks it made for one that never
   * started. One it released, or handed to the rollback's own calls, is gone from the registry or
   * no longer incoming by then: left alone.
   */
  const abandonWhatSessionMade = async (session: Session): Promise<void> => {
    const keys = made.get(session);
    if (!keys) return;
    made.delete(session);
    for (const key of keys) {
      try {
        const r = registry.get(key);
        if (r) await abandonOrphanedDestination(r);
        else if (incomingDisks.all().includes(key) && !registry.all().some((x) => x.spec.disks.some((d) => d.path === key)) && claims.owner(key) === session.principal) {
          log.warn({ path: key }, "a disk made for a migration whose orchestrator went before its destination started: removed");
          await local.removeDisk(key);
          claims.release(key);
          incomingDisks.remove(key);
          abandoned.add(session.principal, [key]);
        }
      } catch (err) {
        log.error({ key, err: errorText(err) }, 'could not abandon what a gone session made for a migration');
      }
    }
  };
  /**
   * What this agent abandoned on its own (an orchestrator gone): the rollback of that orchestrator,
   * if it is still at work, may ask to undo the same things, and finds them undone, not missing.
   */
  const abandoned = new AbandonedIncoming();
  /** Abandonments under way: close() waits for them, so nothing is written after it returned. */
  const pendingSettles = new Set<Promise<void>>();
  const settling = (p: Promise<void>): void => {
    const tracked = p.catch((err: unknown) => log.error({ err: errorText(err) }, 'settling what an orchestrator left failed')).finally(() => pendingSettles.delete(tracked));
    pendingSettles.add(tracked);
  };
  /** NBD relays of incoming VMs (dest.startNbdRelay), by vmId. */
  const nbdRelays = new Map<string, NbdRelayHandle>();
  /**
   * The source side of a migration whose orchestrator's tunnel closed. Until the source's
   * migration completes the destination lacks the guest's device state and can never run it:
   * `migrate_cancel` then is itself the fence (the stream ends, the destination's incoming
   * fails), and QEMU resumes a guest that ran before. Once completed, the destination may run
   * it: the source is left as it is (paused) for the destination's agent and the orchestrator's
   * recovery to decide. Nothing is done while the migration ends by itself (a clean end).
   */
  const settleOrphanedSource = async (r: VmRecord): Promise<void> => {
    const q = supervised.get(r.vmId)?.monitor;
    if (!q || r.state !== 'running') return;
    const status = async (): Promise<string> => (await q.execute('query-migrate', undefined, { timeoutMs: 10_000 })).status ?? 'none';
    let mig = await status();
    for (let i = 0; i < 300 && mig === 'device'; i++) {
      await new Promise((res) => setTimeout(res, 50));
      mig = await status();
    }
    if (!['setup', 'active', 'pre-switchover'].includes(mig)) return;
    log.warn({ vmId: r.vmId, vm: r.name, migration: mig }, "a migration's orchestrator went before the switchover: cancelling it, resuming the source");
    const did = await rollBackSource(q, log, { timeoutMs: 30_000 });
    await dataTls.end(r.vmId, r.spec, q).catch(() => undefined);
    log.info({ vmId: r.vmId, vm: r.name, did }, 'settled the source of a migration whose orchestrator went');
  };
  /**
   * An incoming VM abandoned (dest.abandon, or its orchestrator gone before it ran): its QEMU
   * killed (the fence: nothing can `cont` it any more), the disks and run dir made for it
   * removed, its record gone. The caller has established that it never ran.
   */
  const abandonIncoming = async (r: VmRecord): Promise<void> => {
    await closeRelay(r.vmId);
    const sup = supervised.get(r.vmId);
    if (sup && r.state === 'running') {
      expectingExit.add(r.vmId);
      await sup.kill();
    }
    // A QEMU whose launch this agent did not live to record (killed mid dest.start).
    const unrecorded = r.state === 'running' ? undefined : await destinationPid(r.spec.runDir);
    if (unrecorded !== undefined && !(await killAndWait(unrecorded))) throw new AgentError('KILL_FAILED', `the destination QEMU of '${r.name}' (pid ${unrecorded}) did not die of SIGKILL`);
    await removeFiles(r, true);
    // The VM's folder the migration made for it, once empty: nothing of it is left on this host.
    await removeEmptyParent(r.spec.runDir, config.storageRoot);
    for (const d of r.spec.disks) incomingDisks.remove(d.path);
    registry.remove(r);
    incomingHandles.delete(r.vmId);
    abandoned.add(r.principal, [r.vmId, ...r.spec.disks.map((d) => d.path)]);
    log.info({ vmId: r.vmId, vm: r.name }, 'abandoned an incoming VM');
  };
  /**
   * The destination side: an incoming VM whose orchestrator went (its tunnel closed, or this agent
   * restarted since) and that never ran is abandoned whole: the source is authoritative until the
   * destination ran, so no one will confirm it. Never ran: no `cont` ever went through this agent
   * (contForwarded false), and a live QEMU says so too. Anything else is left alone.
   */
  const abandonOrphanedDestination = async (r: VmRecord): Promise<void> => {
    if (r.role !== 'incoming' || r.contForwarded !== false || registry.get(r.vmId) !== r) return;
    const sup = supervised.get(r.vmId);
    const status = r.state === 'running' ? await sup?.status() : 'exited';
    if (!NEVER_RAN.has(status ?? 'silent')) return;
    log.warn({ vmId: r.vmId, vm: r.name, status }, "a migration's orchestrator went before the destination ran: abandoning the incoming VM (QEMU killed, its disks and run dir removed)");
    await abandonIncoming(r);
  };

  /** Run states of an incoming QEMU that got no `cont`: receiving, or received and paused (-S); or exited. */
  const NEVER_RAN = new Set(['inmigrate', 'prelaunch', 'paused', 'exited']);

  const closeRelay = async (vmId: string): Promise<void> => {
    const relay = nbdRelays.get(vmId);
    nbdRelays.delete(vmId);
    await relay?.close();
  };

  const onRpc = (session: Session): void => {
    const bucket = new TokenBucket(config.limits.requestsPerSecond, config.limits.burst);
    serveRpc(session.ws, {
      version: PROTOCOL_VERSION,
      methods: methodParams,
      handle: async (method, params) => {
        try {
          if (!READ_ONLY_METHODS.has(method)) fences.check(session.fence, method);
          return await (handlers[method] as (p: string, params: unknown, s: Session) => Promise<unknown>)(session.principal, params, session);
        } catch (err) {
          // Every refusal is logged with who asked: a probing token shows up in the agent's log.
          if (err instanceof FerryError && err.userError) {
            log.warn({ principal: session.principal, method, code: err.code, err: err.message }, 'request refused');
            metrics.requestRefused(method, err.code);
          }
          throw err;
        }
      },
      admit: () => bucket.take(),
      limitText: `more than ${config.limits.requestsPerSecond} requests per second (burst ${config.limits.burst}): slow down`,
      log: log.child({ principal: session.principal }),
    });
  };

  const onPlainRequest = (req: IncomingMessage, res: ServerResponse): void => {
    // Any API token may read the metrics (aggregates, no names); with mutual TLS, after the handshake.
    if (handleMetricsRequest(req, res, () => metrics.render(), { authorized: authenticate(req) !== undefined, log })) return;
    res.writeHead(426, { 'content-type': 'text/plain' }).end('ferry-agent speaks WebSocket on /v1\n');
  };
  // Mutual TLS when configured: no certificate signed by the configured CA, no handshake.
  const tls = config.tls ? await loadTls(config.tls) : undefined;
  const http: Server = tls
    ? createHttpsServer({ cert: tls.cert, key: tls.key, ca: tls.ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' }, onPlainRequest)
    : createServer(onPlainRequest);
  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_MESSAGE_BYTES });
  http.on('upgrade', (req, socket, head) => {
    const principal = authenticate(req);
    const reject = (status: string): void => {
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    };
    if (!principal) return reject('401 Unauthorized');
    let fence: SessionFence | undefined;
    const fenceVm = req.headers[FENCE_VM_HEADER];
    const fenceEpoch = req.headers[FENCE_EPOCH_HEADER];
    if (fenceVm !== undefined || fenceEpoch !== undefined) {
      let vm: string | undefined;
      try {
        vm = typeof fenceVm === 'string' ? decodeURIComponent(fenceVm) : undefined;
      } catch {
        vm = undefined;
      }
      const parsed = fenceHeadersSchema.safeParse({ vm, epoch: fenceEpoch });
      if (!parsed.success) {
        log.warn({ principal, issue: parsed.error.issues[0]?.message }, 'refused an upgrade with a malformed fence');
        return reject('400 Bad Request');
      }
      const presented = fences.present(principal, parsed.data.vm, parsed.data.epoch);
      fence = presented.fence;
      if (presented.raised) {
        // The monitor is the new owner's now: stale tunnels to this VM go (terminate, not close:
        // a paused peer would never finish a close handshake, and the monitor waits with it).
        for (const t of fencedTunnels) {
          if (t.fence.key !== fence.key || !fences.isStale(t.fence)) continue;
          log.warn({ principal, vm: fence.vm, epoch: t.fence.epoch, now: fence.epoch }, 'cut a QMP tunnel opened under an older fencing epoch');
          fencedTunnels.delete(t);
          t.cut();
          t.ws.terminate();
        }
      }
    }
    const url = req.url ?? '';
    const qmp = /^\/v1\/qmp\/([a-z0-9-]{1,64})$/.exec(url);
    if (url !== '/v1' && !qmp) return reject('404 Not Found');
    const target = qmp ? registry.get(qmp[1]!) : undefined;
    if (qmp && (!target || target.principal !== principal || target.state !== 'running')) return reject('404 Not Found');
    // A stale owner may not take the VM's one monitor from the current one.
    if (qmp && fences.staleReason(fence, 'a QMP tunnel') !== undefined) return reject('409 Conflict');
    if ([...sessions].filter((s) => s.principal === principal).length >= config.limits.sessionsPerPrincipal) return reject('429 Too Many Requests');
    wss.handleUpgrade(req, socket, head, (ws) => {
      const session: Session = { ws, principal, subscribed: false, fence };
      sessions.add(session);
      ws.once('close', () => {
        sessions.delete(session);
        settling(abandonWhatSessionMade(session));
      });
      if (target) {
        const vmId = target.vmId;
        const policy = {
          role: target.role === 'vm' ? ('source' as const) : ('destination' as const),
          diskIds: target.spec.disks.map((d) => d.id),
          migrationHost: config.migrationHost,
          portRange: config.portRange,
          peerAllowed,
          dataTls: { required: dataTls.mode === 'required', active: () => dataTls.isActive(vmId) },
          ...(target.role === 'incoming' ? { nbdRelaySocket: nbdRelaySocketPath(target.spec.runDir) } : {}),
        };
        // A half-open tunnel must not hold the VM's free monitor (QEMU greets one client per socket).
        keepAlive(ws, { intervalMs: DEFAULT_HEARTBEAT_MS, onDrop: (silentMs) => log.warn({ principal, vmId, silentMs }, 'QMP tunnel caller answered no ping: dropped') });
        // Reads go through whatever the epoch; a stale tunnel changes nothing.
        const admit = (command: string): { code: string; reason: string } | undefined => {
          if (command.startsWith('query-') || command === 'qmp_capabilities') return undefined;
          const reason = fences.staleReason(fence, `QMP ${command}`);
          if (reason !== undefined) return { code: 'STALE_EPOCH', reason };
          // Persisted before QEMU reads it: an incoming VM without this mark never ran.
          if (command === 'cont' && target.role === 'incoming') registry.markContForwarded(target);
          return undefined;
        };
        let cutByFence = false;
        if (fence) {
          const entry = { fence, ws, cut: () => (cutByFence = true) };
          fencedTunnels.add(entry);
          ws.once('close', () => fencedTunnels.delete(entry));
        }
        // A migration started through this tunnel whose caller goes (killed, crashed, cut off)
        // is settled here, from what QEMU reports, once the tunnel is gone (issue 17). Not when a
        // newer fencing epoch cut it: the replica that owns the migration now settles it.
        let migrated = false;
        tunnelQmp(ws, qmpSocketPath(target.spec), policy, log.child({ principal, vmId: target.vmId }), {
          qemuLine: (line) => metrics.qemuLine(line),
          qmpRefused: (code) => metrics.qmpRefused(code),
          admit,
          onForwarded: (command) => {
            if (command === 'migrate' || command === 'migrate-incoming') migrated = true;
          },
        });
        ws.once('close', () => {
          if (!migrated || cutByFence) return;
          const settle = target.role === 'vm' ? settleOrphanedSource(target) : abandonOrphanedDestination(target);
          settling(settle.catch((err: unknown) => log.error({ vmId: target.vmId, err: errorText(err) }, 'could not settle a migration whose caller went')));
        });
      } else onRpc(session);
    });
  });

  await new Promise<void>((resolve, reject) => {
    http.once('error', reject);
    http.listen(config.listenPort, config.listenHost, () => resolve());
  });
  // Restarted: every incoming VM's tunnel went with the previous run of this agent, so nothing can
  // confirm one that never ran; and disks made for one that never started have no caller left
  // (issue 17's fault matrix, cells */kill-destination-agent).
  for (const r of registry.all().filter((x) => x.role === 'incoming')) {
    settling(abandonOrphanedDestination(r).catch((err: unknown) => log.error({ vmId: r.vmId, err: errorText(err) }, 'could not abandon an incoming VM left from before the restart')));
  }
  for (const path of incomingDisks.all()) {
    if (registry.all().some((r) => r.spec.disks.some((d) => d.path === path))) {
      incomingDisks.remove(path);
      continue;
    }
    const owner = claims.owner(path);
    log.warn({ path, principal: owner }, 'a disk made for a migration that never started its destination: removed');
    await local.removeDisk(path).catch((err: unknown) => log.error({ path, err: errorText(err) }, 'could not remove a disk left by a migration'));
    claims.release(path);
    incomingDisks.remove(path);
    if (owner !== undefined) abandoned.add(owner, [path]);
  }
  const port = (http.address() as AddressInfo).port;
  log.info({ port, storageRoot: config.storageRoot, vms: registry.all().length }, 'agent listening');
  const metricsListener = config.metricsListen ? await startMetricsListener(config.metricsListen, () => metrics.render(), log).catch(async (err: unknown) => {
    await new Promise<void>((r) => http.close(() => r()));
    throw err;
  }) : undefined;
  return {
    port,
    metrics,
    ...(metricsListener ? { metricsUrl: metricsListener.url } : {}),
    url: `${tls ? 'wss' : 'ws'}://${config.listenHost.includes(':') ? `[${config.listenHost}]` : config.listenHost}:${port}`,
    close: async () => {
      // The sessions cut here abandon what they made on their close events: those are waited for.
      const closed = [...wss.clients].map((c) => new Promise((r) => (c.readyState === c.CLOSED ? r(undefined) : c.once('close', r))));
      for (const c of wss.clients) c.terminate();
      await Promise.all(closed);
      while (pendingSettles.size > 0) await Promise.all([...pendingSettles]);
      for (const vmId of [...nbdRelays.keys()]) await closeRelay(vmId);
      await new Promise<void>((r) => http.close(() => r()));
      await metricsListener?.close();
      for (const sup of supervised.values()) await sup.detach();
      supervised.clear();
      await replicas.detach();
    },
  };
}

/** vmIds and disk paths of incoming VMs this agent abandoned, by principal; the oldest forgotten past a bound. */
class AbandonedIncoming {
  static readonly MAX = 1_000;
  readonly #keys = new Map<string, string>();

  add(principal: string, keys: string[]): void {
    for (const k of keys) {
      this.#keys.delete(k);
      this.#keys.set(k, principal);
    }
    for (const k of this.#keys.keys()) {
      if (this.#keys.size <= AbandonedIncoming.MAX) break;
      this.#keys.delete(k);
    }
  }

  done(principal: string, key: string): boolean {
    return this.#keys.get(key) === principal;
  }
}

