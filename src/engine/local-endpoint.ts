import { execFile } from 'node:child_process';
import { constants } from 'node:fs';
import { access, mkdir, open, rm, rmdir, stat, statfs, unlink } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { QmpClient } from '../qmp/index.js';
import type { LaunchTlsObjects } from '../qemu/argv.js';
import { defaultQemuBinary, launchVm, type VmProcess } from '../qemu/launcher.js';
import { probeQemuBinary, type QemuBuild } from '../qemu/versions.js';
import { retargetSpec, type VmSpec } from '../qemu/spec.js';
import { backingNbdFilename, type BackingNbd, type DestinationEndpoint, type IncomingVm, type SourceEndpoint } from './endpoint.js';
import { tcpBytesAcked, tcpBytesAckedFrom } from './wire.js';

const run = promisify(execFile);

/** The source VM runs on this machine and its QMP socket is reachable at a path. */
export class LocalSource implements SourceEndpoint {
  readonly name: string;
  readonly exportHost: string;
  readonly #qmpSocket: string;
  readonly #logger: Logger;
  readonly #exportPorts: [number, number];

  /** exportHost/exportPortRange: where lazy mode's read-only NBD server listens on this host. */
  constructor(opts: { qmpSocket: string; name?: string; logger?: Logger; exportHost?: string; exportPortRange?: [number, number] }) {
    this.#qmpSocket = opts.qmpSocket;
    this.name = opts.name ?? 'local';
    this.#logger = opts.logger ?? silentLogger;
    this.exportHost = opts.exportHost ?? '127.0.0.1';
    this.#exportPorts = opts.exportPortRange ?? [30000, 39999];
  }

  candidateExportPorts(): Iterable<number> {
    return randomOrder(this.#exportPorts);
  }

  nbdBytesServed(localPort: number): Promise<number | undefined> {
    return tcpBytesAckedFrom(localPort);
  }

  connect(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QmpClient> {
    return QmpClient.connect({ path: this.#qmpSocket }, { ...opts, logger: this.#logger, name: 'source' });
  }

  nbdBytesSent(peer: { host: string; port: number }): Promise<number | undefined> {
    return tcpBytesAcked(peer);
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
  /** The destination QEMU of the latest migration, for whoever watches the guest (demo, tests). */
  incoming: LocalIncomingVm | undefined;

  constructor(opts: LocalDestinationOptions) {
    this.#outlive = opts.outliveProcess ?? false;
    this.#dir = opts.dir;
    this.name = opts.name ?? opts.dir;
    this.migrationHost = opts.migrationHost ?? '127.0.0.1';
    this.#ports = opts.portRange ?? [20000, 29999];
    this.#qemuBinary = opts.qemuBinary;
    this.#logger = opts.logger ?? silentLogger;
  }

  targetSpec(spec: VmSpec, migrationId: string): VmSpec {
    return retargetSpec(spec, { dir: this.#dir, runDir: join(this.#dir, `run-${spec.name}-${migrationId}`) });
  }

  async freeBytes(): Promise<number> {
    const s = await statfs(this.#dir);
    return s.bavail * s.bsize;
  }

  async checkTarget(spec: VmSpec): Promise<string[]> {
    const problems: string[] = [];
    try {
      const st = await stat(this.#dir);
      if (!st.isDirectory()) return [`destination ${this.#dir} is not a directory`];
      await access(this.#dir, constants.W_OK);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      return [`destination folder ${this.#dir} is not usable (${code === 'ENOENT' ? 'does not exist' : code === 'EACCES' ? 'not writable' : String(code)})`];
    }
    for (const disk of spec.disks) {
      if (await exists(disk.path)) problems.push(`destination disk ${disk.path} already exists (ferry never overwrites a disk)`);
    }
    return problems;
  }

  async createDisk(disk: { path: string; format: 'qcow2' | 'raw'; virtualSize: number; backingNbd?: BackingNbd }): Promise<void> {
    if (disk.backingNbd && disk.format !== 'qcow2') throw new FerryError('OVERLAY_FORMAT', 'a lazy overlay must be qcow2', { userError: true });
    await mkdir(dirname(disk.path), { recursive: true });
    // The file is made here, exclusively and without following a link (a dangling one included),
    // before qemu-img writes into it: ferry never overwrites a disk, nor creates one elsewhere.
    try {
      await (await open(disk.path, constants.O_CREAT | constants.O_EXCL | constants.O_WRONLY | constants.O_NOFOLLOW, 0o600)).close();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EEXIST' || code === 'ELOOP') throw new FerryError('DISK_EXISTS', `refusing to overwrite ${disk.path}${code === 'ELOOP' ? ' (a symbolic link)' : ''}`, { userError: true });
      throw err;
    }
    try {
      // Sparse: raw is a hole-only file, qcow2 has no preallocation. Only what the mirror writes
      // lands. A lazy overlay: -u, the export need not be reachable from qemu-img.
      const args = disk.backingNbd
        ? ['create', '-q', '-f', 'qcow2', '-u', '-b', backingNbdFilename(disk.backingNbd), '-F', 'nbd', disk.path, String(disk.virtualSize)]
        : ['create', '-q', '-f', disk.format, disk.path, String(disk.virtualSize)];
      await run('qemu-img', args, { timeout: 30_000 });
    } catch (err) {
      await unlink(disk.path).catch(() => undefined);
      throw err;
    }
  }

  async removeDisk(path: string): Promise<void> {
    await unlink(path).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
    await this.#removeEmptyParent(path);
  }

  /** createDisk may have made the VM's folder: it goes too once empty, never the host's own folder. */
  async #removeEmptyParent(path: string): Promise<void> {
    const parent = dirname(path);
    if (resolve(parent) !== resolve(this.#dir) && resolve(parent).startsWith(resolve(this.#dir) + '/')) await rmdir(parent).catch(() => undefined);
  }

  async startIncoming(spec: VmSpec, opts: { timeoutMs: number; signal?: AbortSignal; tls?: LaunchTlsObjects }): Promise<LocalIncomingVm> {
    const vm = await launchVm(spec, {
      incoming: true,
      startPaused: true,
      ...(opts.tls ? { tls: opts.tls } : {}),
      timeoutMs: opts.timeoutMs,
      signal: opts.signal,
      logger: this.#logger,
      ...(this.#qemuBinary ? { qemuBinary: this.#qemuBinary } : {}),
    });
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
    };
    return this.incoming;
  }

  candidatePorts(): Iterable<number> {
    return randomOrder(this.#ports);
  }

  /** The QEMU startIncoming would start, asked what it is (asked each time: binaries get upgraded). */
  async probeQemu(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QemuBuild> {
    // async: a bad FERRY_QEMU becomes a rejection, i.e. one more preflight problem.
    return await probeQemuBinary(this.#qemuBinary ?? defaultQemuBinary(), opts);
  }

  async removeRunDir(spec: VmSpec): Promise<void> {
    await rm(spec.runDir, { recursive: true, force: true });
    await this.#removeEmptyParent(spec.runDir);
  }
}

/** Every port of the range once, from a random start, so concurrent migrations rarely collide. */
export function* randomOrder([lo, hi]: [number, number]): Iterable<number> {
  const span = hi - lo + 1;
  const start = Math.floor(Math.random() * span);
  for (let i = 0; i < span; i++) yield lo + ((start + i) % span);
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}
