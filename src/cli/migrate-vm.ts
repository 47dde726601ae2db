/**
 * migrate-vm: one VM, from this machine or an agent, into a folder or an agent. See USAGE in ./args.ts for the flags and
 * the exit codes. Human mode draws a progress line on stderr; --json prints one event per line on
 * stdout and ends with {"event":"summary",...}.
 */
import { rmSync } from 'node:fs';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { z } from 'zod';
import { errorText, FerryError } from '../errors.js';
import { LocalDestination, LocalSource } from '../engine/local-endpoint.js';
import { migrate } from '../engine/migrate.js';
import { newMigrationId } from '../engine/names.js';
import { lazyTargetSpec } from '../engine/source-preflight.js';
import { assertNever, outcomeOfError, type FailedOutcome } from '../engine/outcome.js';
import { MigrationError, type MigrationEvent, type MigrationResult } from '../engine/types.js';
import { parseVmSpec, type VmSpec } from '../qemu/spec.js';
import { AgentDestination, AgentSource } from '../agent/client.js';
import { throwawayPki, type HostTlsMaterial } from '../host/data-tls.js';
import { loadTls } from '../host/tls.js';
import type { DestinationEndpoint, SourceEndpoint } from '../engine/endpoint.js';
import type { Logger } from '../log.js';
import { diskSchemaCache, layeredSchemaCache, useSchemaCache } from '../qmp/schema-cache.js';
import { diskQemuBuildCache } from '../qemu/build-cache.js';
import { ferryCacheDir } from '../host/cache-dir.js';
import { parseCli, USAGE, UsageError, type CliArgs } from './args.js';
import { recoverLocal } from './recover.js';
import { startWatchdog, type Watchdog } from './watchdog-spawn.js';
import { renderHydration, renderMirrorConvergence, renderPlan, renderProgress, renderSummary } from './progress.js';

export const EXIT = { ok: 0, rolledBack: 1, badInput: 2, uncertain: 3, hydrationFailed: 4, sourceDied: 5, cancelled: 130 } as const;

interface Io {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream & { isTTY?: boolean; columns?: number };
}

export async function main(argv: string[], io: Io = { stdout: process.stdout, stderr: process.stderr }): Promise<number> {
  let parsed;
  try {
    parsed = parseCli(argv);
  } catch (err) {
    io.stderr.write(`migrate-vm: ${errorText(err)}\n(see migrate-vm --help)\n`);
    return EXIT.badInput;
  }
  if (parsed.kind === 'help') {
    io.stdout.write(USAGE);
    return EXIT.ok;
  }
  if (parsed.kind === 'version') {
    const pkg = z.object({ version: z.string() }).parse(JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')));
    io.stdout.write(`ferry ${pkg.version}\n`);
    return EXIT.ok;
  }
  return run(parsed.args, io);
}

async function loadSpec(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new UsageError(`--spec: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? errorText(err)})`);
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new UsageError(`--spec: ${path} is not valid JSON (${errorText(err)})`);
  }
}

async function run(args: CliArgs, io: Io): Promise<number> {
  if (args.recover) return recover(args, io);
  // At the default levels the log of the preflight is held back: a refusal is one line of ours,
  // not the engine's "rolling back" (nothing was). Released as soon as anything happens.
  const held: string[] | undefined = ['fatal', 'error', 'warn', 'silent'].includes(args.logLevel) ? [] : undefined;
  let holding = held !== undefined;
  const stderrFd = pino.destination(2);
  const releaseLog = (keep: boolean): void => {
    if (!holding) return;
    holding = false;
    if (keep) for (const line of held!) stderrFd.write(line);
    held!.length = 0;
  };
  const logger = pino({ level: args.logLevel, base: { tool: 'migrate-vm' } }, { write: (line: string) => void (holding ? held!.push(line) : stderrFd.write(line)) });
  // One process per migration: a build's schema remembered on disk spares the next run its probe.
  useSchemaCache(layeredSchemaCache(diskSchemaCache(ferryCacheDir(), { logger })));
  const emit = (obj: Record<string, unknown>): void => {
    if (args.json) io.stdout.write(`${JSON.stringify(obj)}\n`);
  };
  const tty = !args.json && io.stderr.isTTY === true;
  let lastLine = 0;
  const status = (line: string): void => {
    if (args.json) return;
    if (tty) {
      const width = (io.stderr.columns ?? 120) - 1;
      io.stderr.write(`\r${line.slice(0, width).padEnd(Math.min(width, lastLine))}`);
      lastLine = Math.min(width, line.length);
    } else {
      io.stderr.write(`${line}\n`);
    }
  };
  const endStatus = (): void => {
    if (tty && lastLine > 0) io.stderr.write('\n');
    lastLine = 0;
  };

  const ac = new AbortController();
  let signals = 0;
  let pastNoReturn = false;
  let rolledBack = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    signals++;
    if (pastNoReturn) {
      endStatus();
      io.stderr.write(`migrate-vm: ${sig}: the guest already runs on the destination; finishing what is left (lazy mode: the hydration), which a cancel cannot undo\n`);
      return;
    }
    if (signals === 1) {
      endStatus();
      io.stderr.write(`migrate-vm: ${sig}: cancelling, rolling back (the guest stays on the source)\n`);
      ac.abort(new FerryError('CANCELLED', `cancelled by ${sig}`));
    } else {
      io.stderr.write(`migrate-vm: still rolling back; it finishes on its own (kill -9 would leave cleanup undone)\n`);
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const started = performance.now();
  let lastPrint = 0;
  const closers: (() => void)[] = [];
  let watchdog: Watchdog | undefined;
  try {
    const { spec, source, destination } = await endpointsOf(args, logger, closers);
    const migrationId = newMigrationId();
    const onEvent = (e: MigrationEvent): void => {
      // Started once preflight has passed, before the first change: until then nothing needs settling.
      if (e.event === 'phase' && e.phase === 'prepare-destination' && !args.dryRun) {
        watchdog = watchdogFor(args, spec, destination, migrationId);
        if (watchdog) emit({ event: 'watchdog', migrationId, pid: watchdog.pid ?? null });
      }
      emit(e as unknown as Record<string, unknown>);
      if (e.event === 'phase') watchdog?.send({ type: 'phase', phase: e.phase });
      if (e.event === 'source-saved') watchdog?.send({ type: 'saved', saved: e.saved });
      if (e.event === 'point-of-no-return') pastNoReturn = true;
      if (e.event === 'rollback') rolledBack = true;
      if ((e.event === 'phase' && e.phase !== 'preflight' && e.phase !== 'failed') || e.event === 'rollback') releaseLog(true);
      if (e.event === 'progress') {
        // A plain log (not a TTY) gets a line every 2 s, not every sample.
        const now = performance.now();
        if (tty || now - lastPrint > 2_000) {
          lastPrint = now;
          status(renderProgress(e.progress));
        }
      } else if (e.event === 'hydration') {
        const now = performance.now();
        if (tty || now - lastPrint > 2_000) {
          lastPrint = now;
          status(renderHydration(e));
        }
      } else if (e.event === 'phase' && !tty && e.phase !== 'preflight' && e.phase !== 'failed') {
        status(`phase ${e.phase}`);
      } else if (e.event === 'warning' || e.event === 'convergence') {
        endStatus();
        if (!args.json) io.stderr.write(`${e.event}: ${'message' in e ? e.message : 'mirrors' in e ? `mirrors converged: ${renderMirrorConvergence(e.mirrors)}` : `${e.action}, downtime limit ${e.downtimeLimitMs} ms: ${e.detail}`}\n`);
      } else if (e.event === 'rollback' && !args.json) {
        endStatus();
        io.stderr.write(`rollback: ${e.step}: ${e.skipped ? `skipped (${e.skipped})` : e.ok ? 'done' : `FAILED: ${e.error ?? ''}`}\n`);
      }
    };
    const result = await migrate({
      spec,
      source,
      destination,
      options: args.options,
      signal: ac.signal,
      logger,
      onEvent,
      dryRun: args.dryRun,
      migrationId,
    });
    endStatus();
    releaseLog(true);
    if (args.dryRun) {
      emit({ event: 'plan', plan: result.plan });
      emit({ event: 'summary', ok: true, dryRun: true, totalMs: result.totalMs });
      if (!args.json) io.stdout.write(`${renderPlan(result.plan)}\n(dry run: nothing was changed)\n`);
      return EXIT.ok;
    }
    emit(summaryOf(result));
    if (!args.json) io.stdout.write(`${renderSummary(result)}\n`);
    return EXIT.ok;
  } catch (err) {
    endStatus();
    const outcome = outcomeOfError(err, ac.signal.aborted);
    const code = exitCodeOf(outcome);
    const destinationDeath = err instanceof FerryError ? DestinationDeathSchema.safeParse(err.context) : undefined;
    const death = destinationDeath?.success ? destinationDeath.data : {};
    emit({
      event: 'summary',
      ok: false,
      totalMs: Math.round(performance.now() - started),
      code: err instanceof FerryError ? err.code : 'INTERNAL',
      message: errorText(err),
      outcome: outcome.kind,
      ...(err instanceof MigrationError ? { phase: err.phase, guestOn: err.guestOn, cleanupErrors: err.cleanupErrors.map(errorText) } : {}),
      ...death,
    });
    // A refusal (bad input, nothing created, nothing rolled back): one line, exit 2.
    const refused = err instanceof FerryError && err.userError && !rolledBack && !pastNoReturn && !(err instanceof MigrationError && err.cleanupErrors.length > 0);
    releaseLog(!refused);
    if (refused) {
      const problems = z.array(z.string()).min(1).safeParse(err.context.problems);
      io.stderr.write(`migrate-vm: ${problems.success ? `refused, nothing was changed: ${problems.data.join('; ')}` : errorText(err)}\n`);
      const command = err.context.recover === true ? recoverCommand(args) : undefined;
      if (command) io.stderr.write(`  to settle it: ${command}\n`);
    } else if (!args.json || code !== EXIT.ok) {
      const userFacing = err instanceof FerryError && (err.userError || err instanceof MigrationError);
      io.stderr.write(`migrate-vm: ${userFacing ? errorText(err) : (err as Error).stack ?? errorText(err)}\n`);
      if (err instanceof MigrationError) {
        for (const c of err.cleanupErrors) io.stderr.write(`  cleanup problem: ${errorText(c)}\n`);
        if (death.destinationLog) io.stderr.write(`  the destination QEMU's log is kept at ${death.destinationLog}: read it, then remove it\n`);
        io.stderr.write(`  ${whereIsTheGuest(outcome)}\n`);
      }
    }
    return code;
  } finally {
    // The run ended on its own: the watchdog goes without touching anything.
    await watchdog?.done();
    for (const close of closers) close();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** --recover: settles what a dead run left (./recover.ts). */
async function recover(args: CliArgs, io: Io): Promise<number> {
  if (args.source.kind !== 'local' || args.destination.kind !== 'dir') return EXIT.badInput;
  const logger = pino({ level: args.logLevel, base: { tool: 'migrate-vm' } }, pino.destination(2));
  let spec: VmSpec;
  try {
    spec = parseVmSpec(await loadSpec(args.source.specPath));
  } catch (err) {
    io.stderr.write(`migrate-vm: ${errorText(err)}\n`);
    return EXIT.badInput;
  }
  const sourceQmp = args.source.sourceQmp ?? join(spec.runDir, 'qmp.sock');
  return recoverLocal(
    { spec, sourceQmp, toDir: args.destination.toDir, logger },
    { out: (line) => void (args.json ? undefined : io.stdout.write(`${line}\n`)), json: args.json ? (obj) => void io.stdout.write(`${JSON.stringify(obj)}\n`) : undefined },
  );
}

/** The command that settles what a dead run left, for the one an operator just ran. */
function recoverCommand(args: CliArgs): string | undefined {
  if (args.source.kind !== 'local' || args.destination.kind !== 'dir') return undefined;
  const qmp = args.source.sourceQmp ? ` --source-qmp ${args.source.sourceQmp}` : '';
  return `migrate-vm --recover --spec ${args.source.specPath}${qmp} --to-dir ${args.destination.toDir}`;
}

/**
 * Both QEMUs on this machine: a watchdog outlives this process and settles the migration if it
 * dies (./watchdog.ts). Through an agent, the agents do (docs/migration.md).
 */
function watchdogFor(args: CliArgs, spec: VmSpec, destination: DestinationEndpoint, migrationId: string): Watchdog | undefined {
  if (args.source.kind !== 'local' || args.destination.kind !== 'dir') return undefined;
  const target = destination.targetSpec(spec, migrationId);
  const dspec = args.options.mode === 'lazy' ? lazyTargetSpec(target) : target;
  return startWatchdog({
    type: 'begin',
    parentPid: process.pid,
    migrationId,
    sourceQmp: args.source.sourceQmp ?? join(spec.runDir, 'qmp.sock'),
    destination: { runDir: dspec.runDir, dir: args.destination.toDir, disks: dspec.disks.map((d) => d.path) },
    tempDirs: throwawayDirs,
  });
}

/** The agents' bearer token: --token-file, else FERRY_TOKEN. Never a flag (it would show in ps). */
async function agentToken(args: CliArgs): Promise<string> {
  if (args.tokenFile !== undefined) {
    let text: string;
    try {
      text = await readFile(args.tokenFile, 'utf8');
    } catch (err) {
      throw new UsageError(`--token-file: cannot read ${args.tokenFile} (${(err as NodeJS.ErrnoException).code ?? errorText(err)})`);
    }
    const token = text.trim();
    if (!token) throw new UsageError(`--token-file: ${args.tokenFile} is empty`);
    return token;
  }
  const token = process.env.FERRY_TOKEN?.trim();
  if (!token) throw new UsageError('an agent needs a token: set FERRY_TOKEN or pass --token-file FILE');
  return token;
}

async function endpointsOf(args: CliArgs, logger: Logger, closers: (() => void)[]): Promise<{ spec: VmSpec; source: SourceEndpoint; destination: DestinationEndpoint }> {
  const token = args.source.kind === 'agent' || args.destination.kind === 'agent' ? await agentToken(args) : '';
  const tls = args.tls ? await loadTls(args.tls) : undefined;
  let spec: VmSpec;
  let source: SourceEndpoint | undefined;
  if (args.source.kind === 'agent') {
    const s = await AgentSource.connect(args.source.url, token, args.source.vm, { keepDisks: args.source.keepDisks, ...(tls ? { tls } : {}) });
    closers.push(() => s.close());
    spec = s.spec;
    source = s;
  } else {
    spec = parseVmSpec(await loadSpec(args.source.specPath));
  }
  const local = await localDataTls(args);
  if (args.source.kind !== 'agent') {
    source = new LocalSource({ qmpSocket: args.source.sourceQmp ?? join(spec.runDir, 'qmp.sock'), logger, ...(local.source ? { dataTls: local.source } : {}) });
  }
  let destination: DestinationEndpoint;
  if (args.destination.kind === 'agent') {
    const d = await AgentDestination.connect(args.destination.url, token, tls ? { tls } : {});
    closers.push(() => d.close());
    destination = d;
  } else {
    destination = new LocalDestination({ dir: args.destination.toDir, migrationHost: args.destination.migrationHost, portRange: args.destination.portRange, logger, outliveProcess: true, qemuBuildCache: diskQemuBuildCache(ferryCacheDir(), { logger }), ...(local.destination ? { dataTls: local.destination } : {}) });
  }
  return { spec, source: source!, destination };
}

/**
 * The data-path certificates of the local sides: from --data-tls-dir, or (both sides local, TLS
 * not off) a throwaway CA and two certificates made for this run in a 0700 temp folder that goes
 * when the run ends. A local side next to an agent has none without --data-tls-dir: an agent
 * trusts no throwaway CA.
 */
/** Temp folders this run made (the throwaway PKI): the watchdog removes them if this process dies. */
const throwawayDirs: string[] = [];

async function localDataTls(args: CliArgs): Promise<{ source?: HostTlsMaterial; destination?: HostTlsMaterial }> {
  const sourceLocal = args.source.kind === 'local';
  const destLocal = args.destination.kind === 'dir';
  if (args.options.dataTls === 'off' || (!sourceLocal && !destLocal)) return {};
  if (args.dataTlsDir) {
    const dir = args.dataTlsDir;
    const side = (name: string): Promise<HostTlsMaterial> => loadTls({ ca: join(dir, 'ca.pem'), cert: join(dir, `${name}.pem`), key: join(dir, `${name}.key`) });
    return { ...(sourceLocal ? { source: await side('source') } : {}), ...(destLocal ? { destination: await side('destination') } : {}) };
  }
  if (!sourceLocal || !destLocal || args.destination.kind !== 'dir') return {};
  // The material is read into memory, so the folder (a throwaway CA's certificates and keys) goes
  // at once: a migrate-vm killed with -9 later on leaves no keys behind (issue 17's fault matrix,
  // cells */kill-orchestrator).
  const dir = await mkdtemp(join(tmpdir(), 'ferry-data-tls-'));
  throwawayDirs.push(dir);
  try {
    const [source, destination] = await throwawayPki(dir, { address: ['127.0.0.1', args.destination.migrationHost], names: ['ferry-source', 'ferry-destination'] });
    return { source: source!, destination: destination! };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** What a failure says of a destination QEMU that died on its own (rollback.ts puts it in the context). */
const DestinationDeathSchema = z.object({ destinationExit: z.string().optional(), destinationLog: z.string().optional() });

export function exitCodeOf(outcome: FailedOutcome): number {
  switch (outcome.kind) {
    case 'rolledBack':
      if (outcome.cancelled) return EXIT.cancelled;
      return outcome.userError ? EXIT.badInput : EXIT.rolledBack;
    case 'onDestinationNeedsSource':
      return EXIT.hydrationFailed;
    case 'sourceDied':
      return EXIT.sourceDied;
    case 'uncertain':
      return EXIT.uncertain;
    default:
      return assertNever(outcome);
  }
}

/** The last line of a failure: where the guest is and what the operator must (not) do. */
export function whereIsTheGuest(outcome: FailedOutcome): string {
  switch (outcome.kind) {
    case 'rolledBack':
      return 'the guest runs on the source, as before';
    case 'onDestinationNeedsSource':
      return 'the guest runs on the DESTINATION and still needs the source for blocks not yet hydrated: keep the source QEMU up';
    case 'sourceDied':
      return 'the source QEMU died before the switchover: the guest runs nowhere, and nothing of it started elsewhere (the destination never ran and was removed); its disks on the source hold every write it acknowledged: start it there';
    case 'uncertain':
      return 'OUTCOME UNCERTAIN: check which QEMU runs the guest before resuming anything';
    default:
      return assertNever(outcome);
  }
}

function summaryOf(r: MigrationResult): Record<string, unknown> {
  return {
    event: 'summary',
    ok: true,
    migrationId: r.migrationId,
    totalMs: r.totalMs,
    downtimeMs: r.downtimeMs,
    qemuDowntimeMs: r.qemuDowntimeMs ?? null,
    diskBytes: r.diskBytes,
    ramBytes: r.ramBytes,
    allocatedBytes: r.plan.disks.reduce((s, d) => s + d.allocatedBytes, 0),
    phaseMs: r.phaseMs,
    convergence: r.convergence,
    destination: r.plan.destination,
    mode: r.plan.mode,
    dataTls: r.plan.dataTls,
    ...(r.lazy ? { destinationRunningMs: r.lazy.destinationRunningMs, hydrationMs: r.lazy.hydrationMs, hydratedWireBytes: r.lazy.hydratedWireBytes ?? null } : {}),
  };
}
