/**
 * Which QEMU runs on each side of a migration, and the machine type the destination must use.
 *
 * A migration stream goes forward only (an older QEMU cannot load a newer one's), and only
 * between instances of the same *versioned* machine type. `q35` is an alias: pc-q35-7.2 on QEMU
 * 7.2, pc-q35-10.0 on QEMU 10.0; a destination started with the alias of another version refuses
 * the stream (its configuration section names the machine type). So, in preflight:
 *
 *   - the source's machine type is read from the running source (`qom-get /machine type`), never
 *     from the spec: `q35` does not say which q35, and a VM once migrated forward runs an older
 *     type than its alias names;
 *   - the destination is started with exactly that type (pinned, never the alias);
 *   - a destination QEMU older than the source's (major.minor), or one without that type, is
 *     refused before anything changes.
 *
 * Both sides are probed (`query-version`, `query-machines`), never assumed from a binary's name.
 *
 *   QemuVersionError (QEMU_PROBE_FAILED)   a QEMU did not answer what it is
 */
import { spawn } from 'node:child_process';
import { Duplex } from 'node:stream';
import { z } from 'zod';
import { FerryError, errorText } from '../errors.js';
import { QmpClient, versionInfoSchema, type VersionInfo } from '../qmp/index.js';

export class QemuVersionError extends FerryError {
  override name = 'QemuVersionError';
}

const machineInfoSchema = z.looseObject({
  name: z.string(),
  alias: z.string().optional(),
  'is-default': z.boolean().optional(),
  deprecated: z.boolean().optional(),
});
export type MachineType = z.infer<typeof machineInfoSchema>;

/** What one QEMU binary is: its version and the machine types it can run. */
export interface QemuBuild {
  version: VersionInfo['qemu'];
  /** The distribution's build, e.g. "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1". */
  package: string;
  machines: MachineType[];
}

/** A running QEMU: its build and the versioned machine type its VM runs. */
export interface RunningQemu extends QemuBuild {
  machine: string;
}

/** What a destination host offers before any QEMU of the migration starts there. */
export interface QemuProber {
  probeQemu(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QemuBuild>;
}

export const versionText = (b: Pick<QemuBuild, 'version'>): string => `${b.version.major}.${b.version.minor}.${b.version.micro}`;

/** Release order (major, then minor). Stable micro releases of one minor share a stream format. */
export function compareRelease(a: VersionInfo['qemu'], b: VersionInfo['qemu']): number {
  return a.major - b.major || a.minor - b.minor;
}

/** The versioned machine type `name` stands for on this QEMU (an alias resolved), if it has it. */
export function resolveMachine(machines: readonly MachineType[], name: string): string | undefined {
  return (machines.find((m) => m.name === name) ?? machines.find((m) => m.alias === name))?.name;
}

/**
 * The machine type to start the destination with, or why this pair cannot migrate. Pure: the
 * probes are the callers'.
 */
export function destinationMachine(source: RunningQemu, destination: QemuBuild): { machine: string } | { problem: string } {
  const src = `the source runs QEMU ${versionText(source)} with machine type ${source.machine}`;
  if (compareRelease(destination.version, source.version) < 0) {
    return {
      problem: `${src}; the destination's QEMU ${versionText(destination)} is older, and QEMU migrates only to the same or a newer release: upgrade the destination's QEMU or choose another destination`,
    };
  }
  if (!destination.machines.some((m) => m.name === source.machine)) {
    return { problem: `${src}; the destination's QEMU ${versionText(destination)} has no machine type ${source.machine}` };
  }
  return { machine: source.machine };
}

/** The source's side, over its QMP: version, machine types, and the type its VM runs. */
export async function probeRunningQemu(qmp: Pick<QmpClient, 'executeRaw'>, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<RunningQemu> {
  const build = await queryBuild(qmp, opts);
  const type = z.string().safeParse(await qmp.executeRaw('qom-get', { path: '/machine', property: 'type' }, opts));
  // QOM names a machine type's class "<machine>-machine" (TYPE_MACHINE_SUFFIX).
  const machine = type.success ? type.data.replace(/-machine$/, '') : undefined;
  if (!machine || !build.machines.some((m) => m.name === machine)) {
    throw new QemuVersionError('QEMU_PROBE_FAILED', `the source QEMU reports machine type ${JSON.stringify(type.success ? type.data : null)}, which is not one of its machine types`, {
      context: { machine: type.success ? type.data : null },
    });
  }
  return { ...build, machine };
}

/**
 * Asks a QEMU binary what it is: started with no machine and QMP on its stdio, it answers
 * query-version and query-machines, then quits. Ended (SIGTERM, then by timeout(1)) if it does not within the timeout.
 */
export async function probeQemuBinary(binary: string, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QemuBuild> {
  // Under coreutils' timeout: a QEMU on a QMP stdio does not quit when its stdin closes, so an
  // orchestrator killed -9 mid-preflight would leave it running for ever; this one ends by itself.
  const limitS = String(Math.max(1, Math.ceil(opts.timeoutMs / 1000)));
  const child = spawn('timeout', ['--kill-after=1', limitS, binary, '-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', 'stdio'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => {
    if (stderr.length < 4096) stderr += s;
  });
  try {
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    const qmp = await QmpClient.connect({ stream: Duplex.from({ readable: child.stdout, writable: child.stdin }) }, { ...opts, name: `probe ${binary}` });
    try {
      return await queryBuild(qmp, opts);
    } finally {
      await qmp.execute('quit', undefined, { timeoutMs: 1_000 }).catch(() => undefined);
      await qmp.close();
    }
  } catch (err) {
    const said = stderr.trim();
    throw new QemuVersionError('QEMU_PROBE_FAILED', `cannot ask ${binary} what it is: ${errorText(err)}${said ? `; it said: ${said}` : ''}`, {
      cause: err,
      context: { binary },
    });
  } finally {
    // SIGTERM, which timeout passes on to QEMU (a SIGKILL would kill timeout alone).
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  }
}

async function queryBuild(qmp: Pick<QmpClient, 'executeRaw'>, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QemuBuild> {
  const version = versionInfoSchema.parse(await qmp.executeRaw('query-version', undefined, opts));
  const machines = z.array(machineInfoSchema).parse(await qmp.executeRaw('query-machines', undefined, opts));
  return { version: version.qemu, package: version.package.trim(), machines };
}

/** The preflight's view of the pair: problems to refuse with, else the destination's machine type. */
export interface QemuPair {
  source: RunningQemu;
  /** Undefined when the destination endpoint cannot be probed before its QEMU starts. */
  destination: QemuBuild | undefined;
  /** Set when the pair can migrate: the destination's `-machine`. */
  machine: string | undefined;
  problems: string[];
}

/**
 * Probes both sides and decides. A destination that cannot be probed ahead (an endpoint without
 * probeQemu) still gets the source's exact machine type: its QEMU then refuses to start if it
 * lacks it, which rolls back like any failed start.
 */
export async function checkQemuPair(
  sourceQmp: Pick<QmpClient, 'executeRaw'>,
  destination: Partial<QemuProber>,
  opts: { timeoutMs: number; signal?: AbortSignal },
): Promise<QemuPair> {
  // Both at once: the destination's probe starts a QEMU (tens of ms), the source's is three queries.
  const [source, probed] = await Promise.all([
    probeRunningQemu(sourceQmp, opts),
    destination.probeQemu?.(opts).then(
      (build) => ({ build }),
      (err: unknown) => ({ err }),
    ),
  ]);
  if (!probed) return { source, destination: undefined, machine: source.machine, problems: [] };
  if ('err' in probed) {
    return { source, destination: undefined, machine: undefined, problems: [`cannot tell which QEMU the destination runs: ${errorText(probed.err)}`] };
  }
  const build = probed.build;
  const decision = destinationMachine(source, build);
  return 'problem' in decision
    ? { source, destination: build, machine: undefined, problems: [decision.problem] }
    : { source, destination: build, machine: decision.machine, problems: [] };
}
