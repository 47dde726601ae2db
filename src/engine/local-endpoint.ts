import { rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { QmpClient } from '../qmp/index.js';
import type { LaunchTlsObjects } from '../qemu/argv.js';
import { defaultQemuBinary, launchVm, type VmProcess } from '../qemu/launcher.js';
import { probeQemuBinaryCached, type QemuBuildCache } from '../qemu/build-cache.js';
import { probeQemuBinary, versionText, type QemuBuild } from '../qemu/versions.js';
import { retargetSpec, type VmSpec } from '../qemu/spec.js';
import { startNbdRelay } from './convergence/nbd-relay.js';
import { nbdRelaySocketPath } from './data-path.js';
import { backingNbdFilename, type BackingNbd, type DataTlsPeer, type DestinationEndpoint, type HostDataTls, type IncomingVm, type NbdRelayHandle, type SourceEndpoint } from './endpoint.js';
import { beginDataTls, certIdentity, certNames, endDataTls, removeCredentialDirs, SERVER_TLS, writeCredentialDirs, type HostTlsMaterial } from '../host/data-tls.js';
import { createImage, dataBytes, freeBytesAt, pathExists, removeEmptyParent, removeImage, unusableDir } from '../host/disk-files.js';
import { randomOrder } from '../host/ports.js';
import { tcpBytesAcked, tcpBytesAckedFrom, tcpBytesReceivedBy } from '../host/wire.js';


/** The source VM runs on this machine and its QMP socket is reachable at a path. */
export class LocalSource implements SourceEndpoint {
  readonly name: string;
  readonly exportHost: string;
  readonly #qmpSocket: string;
  readonly #logger: Logger;
  readonly #exportPorts: [number, number];

  readonly #dataTls: HostTlsMaterial | undefined;
  readonly #priority: string | undefined;
  readonly #tlsDir: string;

  /**
   * exportHost/exportPortRange: where lazy mode's read-only NBD server listens on this host.
   * dataTls: this host's certificate for TLS on the data path (its credentials go into a 0700
   * folder beside the QMP socket for as long as QEMU takes to read them). dataTlsPriority: the
   * gnutls priority string of its TLS objects (the benchmark compares them); absent: QEMU's default.
   */
  constructor(opts: { qmpSocket: string; name?: string; logger?: Logger; exportHost?: string; exportPortRange?: [number, number]; dataTls?: HostTlsMaterial; dataTlsPriority?: string }) {
    this.#qmpSocket = opts.qmpSocket;
    this.#dataTls = opts.dataTls;
    this.#priority = opts.dataTlsPriority;
    this.#tlsDir = join(dirname(opts.qmpSocket), `ferry-tls-${process.pid}`);
    this.name = opts.name ?? 'local';
    this.#logger = opts.logger ?? silentLogger;
    this.exportHost = opts.exportHost ?? '127.0.0.1';
    this.#exportPorts = opts.exportPortRange ?? [30000, 39999];
  }

  candidateExportPorts(): Iterable<number> {
    return randomOrder(this.#exportPorts);
  }

  async dataTls(): Promise<HostDataTls> {
    return hostDataTls(this.#dataTls);
  }

  async beginDataTls(qmp: QmpClient, peer: DataTlsPeer, opts: { timeoutMs: number }): Promise<void> {
    if (!this.#dataTls) throw new FerryError('DATA_TLS_OFF', `${this.name} has no data-path certificate`, { userError: true });
    try {
      await beginDataTls(qmp, { dir: this.#tlsDir, material: this.#dataTls, role: 'source', ...peer, priority: this.#priority, timeoutMs: opts.timeoutMs });
    } finally {
      // QEMU read the files when it made its objects: they need not outlive this call, so no
      // outcome (the source dying, this process killed later) can leave keys beside the socket.
      await removeCredentialDirs(this.#tlsDir);
    }
  }

  async endDataTls(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void> {
    await endDataTls(qmp, { dir: this.#tlsDir, timeoutMs: opts.timeoutMs });
  }

  nbdBytesServed(localPort: number): Promise<number | undefined> {
    return tcpBytesAckedFrom(localPort);
  }

  connect(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QmpClient> {
    // OOB: the rollback's yank must reach a source whose main loop waits on a silent destination.
    return QmpClient.connect({ path: this.#qmpSocket }, { ...opts, logger: this.#logger, name: 'source', oob: true });
  }

  nbdBytesSent(peer: { host: string; port: number }): Promise<number | undefined> {
    return tcpBytesAcked(peer);
  }

  dataBytes(disk: { path: string; format: string }, opts: { signal?: AbortSignal } = {}): Promise<number | undefined> {
    return dataBytes(disk.path, disk.format, opts.signal);
  }

  /** A unix socket nobody listens on (or that is gone) means the QEMU that owned it exited. */
  async sourceGone(): Promise<boolean> {
    try {
      const q = await QmpClient.connect({ path: this.#qmpSocket }, { timeoutMs: 2_000, name: 'source-probe' });
      await q.close();
      return false;
    } catch (err) {
      const code = errnoOf(err);
      return code === 'ECONNREFUSED' || code === 'ENOENT';
    }
  }

  async retireSource(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void> {
    // `quit` replies before the process is gone; the session closing is the proof it went.
    await qmp.execute('quit', undefined, { timeoutMs: opts.timeoutMs });
    const outcome = await Promise.race([
      qmp.closed.then(() => 'closed' as const),
      new Promise<'timeout'>((r) => setTimeout(r, opts.timeoutMs, 'timeout').unref()),
    ]);
    if (outcome === 'timeout') {
      throw new FerryError('SOURCE_QUIT_TIMEOUT', `source QEMU did not exit within ${opts.timeoutMs} ms of quit`);
    }
  }
}

export interface LocalDestinationOptions {
  /** The destination "host": a folder that will hold the disks and the QEMU's run dir. */
  dir: string;
  migrationHost?: string;
  /** Inclusive port range for the NBD server and the migration stream. */
  portRange?: [number, number];
  qemuBinary?: string;
  name?: string;
  logger?: Logger;
  /**
   * After a successful migration the destination QEMU outlives this process (migrate-vm).
   * Off by default: tests and the demo keep it, so their reaper can stop it.
   */
  outliveProcess?: boolean;
  /** This host's certificate for TLS on the data path; without it, plain text only. */
  dataTls?: HostTlsMaterial;
  /** Where probeQemu's answer is remembered per binary file (build-cache.ts); without it, probed each time. */
  qemuBuildCache?: QemuBuildCache;
  /** The gnutls priority string of its TLS objects; absent: QEMU's default. */
  dataTlsPriority?: string;
}

/** A destination QEMU on this machine, with its console for whoever wants to watch the guest. */
export interface LocalIncomingVm extends IncomingVm {
  readonly process: VmProcess;
}

/** The destination is a folder on this machine; its QEMU is a child of this process. */
export class LocalDestination implements DestinationEndpoint {
  readonly name: string;
  readonly migrationHost: string;
  readonly #dir: string;
  readonly #ports: [number, number];
  readonly #qemuBinary: string | undefined;
  readonly #logger: Logger;
  readonly #outlive: boolean;
  readonly #dataTls: HostTlsMaterial | undefined;
  readonly #buildCache: QemuBuildCache | undefined;
  /** What probeQemu answered from the cache, not from a QEMU: startIncoming checks it against the one it starts. */
  #rememberedBuild: { build: QemuBuild; fileKey: string } | undefined;
  readonly #priority: string | undefined;
  /** Every QEMU startIncoming launched, by run dir: what abandonIncoming finds when a reply was lost. */
  readonly #started = new Map<string, VmProcess>();
  /** The destination QEMU of the latest migration, for whoever watches the guest (demo, tests). */
  incoming: LocalIncomingVm | undefined;

  constructor(opts: LocalDestinationOptions) {
    this.#outlive = opts.outliveProcess ?? false;
    this.#dataTls = opts.dataTls;
    this.#priority = opts.dataTlsPriority;
    this.#dir = opts.dir;
    this.name = opts.name ?? opts.dir;
    this.migrationHost = opts.migrationHost ?? '127.0.0.1';
    this.#ports = opts.portRange ?? [20000, 29999];
    this.#qemuBinary = opts.qemuBinary;
    this.#logger = opts.logger ?? silentLogger;
    this.#buildCache = opts.qemuBuildCache;
  }

  targetSpec(spec: VmSpec, migrationId: string): VmSpec {
    return retargetSpec(spec, { dir: this.#dir, runDir: join(this.#dir, `run-${spec.name}-${migrationId}`) });
  }

  /** One statfs: it does not wait on anything that a signal could stop. */
  freeBytes(): Promise<number> {
    return freeBytesAt(this.#dir);
  }

  async checkTarget(spec: VmSpec): Promise<string[]> {
    const unusable = await unusableDir(this.#dir);
    if (unusable) return [unusable];
    const problems: string[] = [];
    for (const disk of spec.disks) {
      if (await pathExists(disk.path)) problems.push(`destination disk ${disk.path} already exists (ferry never overwrites a disk)`);
    }
    return problems;
  }

  async createDisk(disk: { path: string; format: 'qcow2' | 'raw'; virtualSize: number; backingNbd?: BackingNbd }, opts: { signal?: AbortSignal } = {}): Promise<void> {
    if (disk.backingNbd && disk.format !== 'qcow2') throw new FerryError('OVERLAY_FORMAT', 'a lazy overlay must be qcow2', { userError: true });
    const backing = disk.backingNbd ? { backingFilename: backingNbdFilename(disk.backingNbd), backingFormat: 'nbd' } : {};
    await createImage({ path: disk.path, format: disk.format, virtualSize: disk.virtualSize, ...backing }, opts.signal);
  }

  removeDisk(path: string): Promise<void> {
    return removeImage(path, this.#dir);
  }

  async dataTls(): Promise<HostDataTls> {
    return hostDataTls(this.#dataTls);
  }

  /**
   * `dataTls`: this host's certificate goes into the run dir (0700) and the QEMU starts with
   * ferry's TLS objects for that peer and the incoming stream's TLS set. `tls`: objects whose
   * credentials the caller wrote (the agent, with its own certificate).
   */
  async startIncoming(spec: VmSpec, opts: { timeoutMs: number; signal?: AbortSignal; tls?: LaunchTlsObjects; dataTls?: DataTlsPeer }): Promise<LocalIncomingVm> {
    let tls = opts.tls;
    if (opts.dataTls) {
      if (!this.#dataTls) throw new FerryError('DATA_TLS_OFF', `${this.name} has no data-path certificate`, { userError: true });
      tls = { ...(await writeCredentialDirs(join(spec.runDir, 'tls'), this.#dataTls)), peerIdentity: opts.dataTls.peerIdentity, priority: this.#priority };
    }
    const vm = await launchVm(spec, {
      incoming: true,
      startPaused: true,
      ...(tls ? { tls } : {}),
      timeoutMs: opts.timeoutMs,
      signal: opts.signal,
      logger: this.#logger,
      ...(this.#qemuBinary ? { qemuBinary: this.#qemuBinary } : {}),
    });
    this.#started.set(spec.runDir, vm);
    const remembered = this.#rememberedBuild?.build;
    const greeted = vm.qmp.greeting.version;
    if (remembered && (versionText(remembered) !== versionText({ version: greeted.qemu }) || remembered.package.trim() !== greeted.package.trim())) {
      // The preflight decided on a remembered build; one that is not what started decided nothing.
      await vm.kill();
      await this.#buildCache?.forget(this.#rememberedBuild!.fileKey);
      throw new FerryError(
        'QEMU_BUILD_CHANGED',
        `the destination QEMU started as ${versionText({ version: greeted.qemu })} (${greeted.package}), not the remembered ${versionText(remembered)} (${remembered.package}) its preflight checked: migrate again`,
        { context: { binary: this.#qemuBinary ?? defaultQemuBinary() } },
      );
    }
    if (tls) await vm.qmp.executeRaw('migrate-set-parameters', SERVER_TLS, { timeoutMs: 10_000 });
    this.incoming = {
      process: vm,
      pid: vm.pid,
      qmp: vm.qmp,
      exited: vm.exited,
      running: () => vm.running(),
      kill: () => vm.kill(),
      release: async () => {
        if (this.#outlive) vm.release();
      },
      exitReason: async () => {
        const info = await Promise.race([vm.exited, new Promise<undefined>((r) => setTimeout(r, 2_000, undefined).unref())]);
        if (!info) return undefined;
        const how = info.signal ? `killed by ${info.signal}` : `exit code ${info.code}`;
        const last = info.stderr.trim().split('\n').slice(-LAST_LINES).join(' | ');
        return last ? `${how}; QEMU said: ${last}` : `${how}, QEMU said nothing`;
      },
    };
    return this.incoming;
  }

  async endDataTls(spec: VmSpec, vm: IncomingVm, opts: { timeoutMs: number }): Promise<void> {
    await endDataTls(vm.qmp, { dir: join(spec.runDir, 'tls'), timeoutMs: opts.timeoutMs });
  }

  async abandonIncoming(spec: VmSpec): Promise<void> {
    const vm = this.#started.get(spec.runDir);
    if (vm?.running()) await vm.kill();
  }

  candidatePorts(): Iterable<number> {
    return randomOrder(this.#ports);
  }

  nbdBytesReceived(peer: { host: string; port: number }, pid: number): Promise<number | undefined> {
    return tcpBytesReceivedBy(pid, peer);
  }

  /** In this process: the relay listens on migrationHost within the port range (see DestinationEndpoint). */
  async startNbdRelay(spec: VmSpec, opts: { signal?: AbortSignal }): Promise<NbdRelayHandle> {
    const unixPath = nbdRelaySocketPath(spec.runDir);
    const relay = await startNbdRelay({ host: this.migrationHost, ports: this.candidatePorts(), unixPath, logger: this.#logger, ...(opts.signal ? { signal: opts.signal } : {}) });
    return { port: relay.port, unixPath, close: () => relay.close() };
  }

  /**
   * The QEMU startIncoming would start, asked what it is; with a cache, once per binary file (an
   * upgrade is a new file: build-cache.ts), and startIncoming checks the remembered answer.
   */
  async probeQemu(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QemuBuild> {
    // async: a bad FERRY_QEMU becomes a rejection, i.e. one more preflight problem.
    const probed = await probeQemuBinaryCached(this.#qemuBinary ?? defaultQemuBinary(), this.#buildCache, (b) => probeQemuBinary(b, opts));
    this.#rememberedBuild = probed.remembered ? { build: probed.build, fileKey: probed.fileKey } : undefined;
    return probed.build;
  }

  async removeRunDir(spec: VmSpec, opts: { keepLog?: boolean } = {}): Promise<string | undefined> {
    let kept: string | undefined;
    const log = join(spec.runDir, 'qemu.log');
    // An empty log (a QEMU killed by SIGKILL says nothing) is not worth keeping.
    if (opts.keepLog && ((await stat(log).catch(() => undefined))?.size ?? 0) > 0) {
      const to = keptLogPath(this.#dir, spec.runDir);
      kept = await rename(log, to).then(() => to, () => undefined);
    }
    await rm(spec.runDir, { recursive: true, force: true });
    await removeEmptyParent(spec.runDir, this.#dir);
    return kept;
  }
}

/** Lines of a dead destination QEMU's log that go into the error that reports its death. */
const LAST_LINES = 5;

/**
 * Where a destination that died keeps its log after the rollback: beside the run dirs, named for
 * the run (`failed-<vm>-<migration id>.qemu.log`), until the operator removes it.
 */
export function keptLogPath(dir: string, runDir: string): string {
  return join(dir, `${basename(runDir).replace(/^run-/, 'failed-')}.qemu.log`);
}

/** The errno code of an error or of one of its causes. */
function errnoOf(err: unknown): string | undefined {
  for (let e: unknown = err, depth = 0; e instanceof Error && depth < 5; e = e.cause, depth++) {
    if ('code' in e && typeof e.code === 'string' && /^E[A-Z]+$/.test(e.code)) return e.code;
  }
  return undefined;
}

/** What a local host offers for data TLS: preferred with a certificate, off without. */
function hostDataTls(m: HostTlsMaterial | undefined): HostDataTls {
  return m ? { mode: 'preferred', identity: certIdentity(m.cert), names: certNames(m.cert) } : { mode: 'off', identity: null, names: [] };
}
