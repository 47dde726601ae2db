import { spawn } from 'node:child_process';
import { closeSync, fstatSync, openSync } from 'node:fs';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { FerryError, errorText } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { QmpClient } from '../qmp/index.js';
import { buildArgv, launcherQmpSocketPath, qmpSocketPath, serialSocketPath, type LaunchTlsObjects } from './argv.js';
import { register, unregister } from './reaper.js';
import { SerialConsole } from './serial.js';
import { checkSpecFiles, type VmSpec } from './spec.js';

export class LaunchError extends FerryError {
  override name = 'LaunchError';
}

export interface ExitInfo {
  code: number | null;
  signal: string | null;
  stderr: string;
}

export interface LaunchOptions {
  /** Start with `-incoming defer`: the destination of a migration. */
  incoming?: boolean;
  /** Start with `-S`: vCPUs stopped until `cont`. */
  startPaused?: boolean;
  /** ferry's data-path TLS objects, made at start-up. */
  tls?: LaunchTlsObjects;
  /** Open every disk without O_DIRECT (aio=threads) whatever its cache mode; see argv.ts diskBlockdevs. */
  bufferedDisks?: boolean;
  /** Default: defaultQemuBinary(), i.e. $FERRY_QEMU or qemu-system-x86_64 on PATH. */
  qemuBinary?: string;
  timeoutMs?: number;
  signal?: AbortSignal;
  logger?: Logger;
}

export interface VmProcess extends AsyncDisposable {
  readonly pid: number;
  readonly spec: VmSpec;
  readonly qmp: QmpClient;
  readonly serial: SerialConsole;
  readonly exited: Promise<ExitInfo>;
  running(): boolean;
  /** This process stops owning the VM: it is no longer reaped when this process exits. */
  release(): void;
  /** QMP quit, then SIGTERM, then SIGKILL, each given its share of the timeout. */
  quit(opts?: { timeoutMs?: number }): Promise<void>;
  kill(): Promise<void>;
}

const STDERR_KEEP = 16 * 1024;

/**
 * The QEMU to start when no setting names one: $FERRY_QEMU (an absolute path, or a command on
 * PATH), else qemu-system-x86_64 on PATH. Read at each call, so a test leg can set it.
 * A QEMU that needs -L (one unpacked beside the system's) is given as a wrapper script that
 * `exec`s it with -L: the PID stays QEMU's, and it works wherever a binary is accepted.
 */
export function defaultQemuBinary(env: NodeJS.ProcessEnv = process.env): string {
  const v = env.FERRY_QEMU;
  if (v === undefined || v === '') return 'qemu-system-x86_64';
  if (v.includes('/') && !isAbsolute(v)) {
    throw new LaunchError('QEMU_BINARY_INVALID', `FERRY_QEMU=${v}: must be an absolute path or a command name on PATH`, { userError: true });
  }
  return v;
}

export async function launchVm(spec: VmSpec, opts: LaunchOptions = {}): Promise<VmProcess> {
  const log = (opts.logger ?? silentLogger).child({ vm: spec.name });
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const deadline = performance.now() + timeoutMs;
  await checkSpecFiles(spec);
  await mkdir(spec.runDir, { recursive: true });
  for (const f of [launcherQmpSocketPath(spec), qmpSocketPath(spec), serialSocketPath(spec)]) await rm(f, { force: true });

  const argv = buildArgv(spec, { ...(opts.incoming ? { incoming: 'defer' as const } : {}), startPaused: opts.startPaused ?? false, bufferedDisks: opts.bufferedDisks ?? false, ...(opts.tls ? { tls: opts.tls } : {}) });
  const binary = opts.qemuBinary ?? defaultQemuBinary();
  log.debug({ binary, argv }, 'launching QEMU');
  // QEMU writes to its log file, not to a pipe of ours, and has its own process group: a VM must
  // be able to outlive this process (a migrated guest outlives migrate-vm), and a Ctrl-C meant
  // for the CLI must not reach it.
  const logPath = join(spec.runDir, 'qemu.log');
  const logFd = openSync(logPath, 'a');
  const logStart = fstatSync(logFd).size;
  const child = spawn(binary, argv, { stdio: ['ignore', logFd, logFd], detached: true });
  closeSync(logFd);
  let alive = true;
  const stderrNow = async (): Promise<string> => {
    const all = await readFile(logPath).catch(() => Buffer.alloc(0));
    return all.subarray(logStart).toString('utf8').slice(-STDERR_KEEP).trim();
  };
  const exited = new Promise<ExitInfo>((resolve) => {
    child.once('error', (err) => {
      alive = false;
      resolve({ code: null, signal: null, stderr: err.message });
    });
    child.once('exit', (code, sig) => {
      alive = false;
      void stderrNow().then((stderr) => resolve({ code, signal: sig, stderr }));
    });
  });
  register(child, exited);
  const kill = async (): Promise<void> => {
    if (alive) child.kill('SIGKILL');
    await exited;
  };

  try {
    if (child.pid === undefined) {
      const info = await exited;
      throw new LaunchError('QEMU_EXITED', `cannot start ${binary}: ${info.stderr}`, { userError: true });
    }
    await writeFile(join(spec.runDir, 'qemu.pid'), `${child.pid}\n`);
    const earlyExit = exited.then((info) => {
      throw new LaunchError('QEMU_EXITED', `QEMU for ${spec.name} exited during start-up (${describeExit(info)}): ${info.stderr || 'no message'}`, {
        userError: true,
        context: { vm: spec.name, stderr: info.stderr },
      });
    });
    earlyExit.catch(() => undefined);
    await Promise.race([waitForSocket(launcherQmpSocketPath(spec), deadline, opts.signal), earlyExit]);
    const remaining = Math.max(1_000, deadline - performance.now());
    const connectMonitor = async (): Promise<QmpClient> => {
      // The socket file appears at bind(), a moment before QEMU listens: refused means "not yet".
      for (;;) {
        try {
          return await QmpClient.connect({ path: launcherQmpSocketPath(spec) }, { timeoutMs: remaining, logger: log, name: spec.name, ...(opts.signal ? { signal: opts.signal } : {}) });
        } catch (err) {
          const refused = err instanceof FerryError && err.context.errno === 'ECONNREFUSED';
          if (!refused || !alive || performance.now() > deadline) throw err;
          await new Promise((r) => setTimeout(r, 20));
        }
      }
    };
    const qmp = await Promise.race([
      connectMonitor(),
      earlyExit,
    ]).catch(async (err: unknown) => {
      // QEMU opens its monitors before its disks: a bad disk shows up first as a QMP session
      // that ends. If QEMU is exiting, its own message is the one worth reporting.
      if (!(err instanceof LaunchError) && (await exitsWithin(exited, 1_000))) await earlyExit;
      throw err;
    });
    const serial = new SerialConsole();
    try {
      await waitForSocket(serialSocketPath(spec), deadline, opts.signal);
      await serial.attach(serialSocketPath(spec));
    } catch (err) {
      await qmp.close();
      throw err;
    }
    void exited.then(() => serial.close());
    log.info({ pid: child.pid, incoming: opts.incoming ?? false }, 'QEMU started');

    const vm: VmProcess = {
      pid: child.pid,
      spec,
      qmp,
      serial,
      exited,
      running: () => alive,
      release: () => {
        unregister(child.pid!);
        child.unref();
      },
      kill: async () => {
        await kill();
        await qmp.close();
      },
      quit: async ({ timeoutMs: t = 10_000 } = {}) => {
        if (!alive) return;
        const share = t / 3;
        await qmp.execute('quit', undefined, { timeoutMs: share }).catch(() => undefined);
        if (await exitsWithin(exited, share)) return void (await qmp.close());
        child.kill('SIGTERM');
        if (await exitsWithin(exited, share)) return void (await qmp.close());
        await vm.kill();
      },
      [Symbol.asyncDispose]: async () => {
        await vm.kill();
      },
    };
    return vm;
  } catch (err) {
    await kill();
    if (err instanceof FerryError) throw err;
    const said = await stderrNow();
    throw new LaunchError('QEMU_START_FAILED', `QEMU for ${spec.name} did not come up: ${errorText(err)}${said ? `; QEMU said: ${said}` : ''}`, {
      cause: err,
    });
  }
}

function describeExit(info: ExitInfo): string {
  return info.signal ? `signal ${info.signal}` : `exit code ${info.code}`;
}

async function exitsWithin(exited: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([exited.then(() => true), new Promise<false>((res) => (timer = setTimeout(res, ms, false)))]);
  clearTimeout(timer);
  return r;
}

async function waitForSocket(path: string, deadline: number, signal?: AbortSignal): Promise<void> {
  for (;;) {
    try {
      const s = await stat(path);
      if (s.isSocket()) return;
    } catch {
      // not there yet
    }
    if (signal?.aborted) throw new LaunchError('LAUNCH_ABORTED', `aborted waiting for ${path}`, { cause: signal.reason });
    if (performance.now() > deadline) throw new LaunchError('LAUNCH_TIMEOUT', `timed out waiting for QEMU to create ${path}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
