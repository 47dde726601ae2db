import { isIP } from 'node:net';
import { parseArgs } from 'node:util';
import { FerryError } from '../errors.js';
import type { MigrationOptionsInput } from '../engine/types.js';

/** A mistake on the command line: printed as one line, exit code 2, no stack trace. */
export class UsageError extends FerryError {
  override name = 'UsageError';
  constructor(message: string) {
    super('USAGE', message, { userError: true });
  }
}

export const USAGE = `usage: migrate-vm --spec VM.json --to-dir DIR [options]          this machine, into a folder
       migrate-vm --spec VM.json --to ws://HOST_B:7420 [options]  this machine, into an agent
       migrate-vm --from ws://HOST_A:7420 --to ws://HOST_B:7420 VM [options]   agent to agent
       migrate-vm --recover --spec VM.json --to-dir DIR [--json]  settle what a dead run left

Live-migrates a running QEMU VM together with its local disks, QEMU to QEMU: NBD mirrors for the
disks, the migration stream for RAM. Through agents (ferry-agent), the agents carry control only.

  --spec FILE              the VM's spec (JSON) as it runs now, on this machine
  --source-qmp PATH        the source VM's QMP socket (default: <runDir>/qmp.sock from the spec)
  --to-dir DIR             where the destination keeps the disks and its run dir
  --migration-host IP      (--to-dir) address the source connects to for NBD and RAM (default 127.0.0.1)
  --port-range LO-HI       (--to-dir) ports to try on the destination (default 20000-29999)
  --from URL               the agent that runs VM now (then VM, its name, is the one argument)
  --to URL                 the agent of the destination host
  --token-file FILE        the agents' bearer token (default: the FERRY_TOKEN environment variable)
  --keep-source-disks      (--from) leave the source's disk files after a successful migration
  --tls-cert FILE, --tls-key FILE, --tls-ca FILE
                           mutual TLS to agents at wss:// URLs: this side's certificate and key
                           (PEM), and the CA that signs the agents' certificates
  --bandwidth SIZE         cap on the link, bytes/s: 500M, 1G, 10M... (default: unlimited)
  --downtime-limit MS      pause QEMU aims for at switchover (default 300)
  --max-downtime MS        the limit steps up to this when RAM does not converge (default 2000)
  --mode MODE              precopy | lazy (default precopy). lazy: the destination runs as soon as
                           RAM has moved and pulls disk blocks from the source while it hydrates
  --hydration-rate SIZE    (lazy) cap on the background hydration, bytes/s per disk
  --nbd-reconnect S        (lazy) how long reads wait for a lost source to come back (default 10)
  --copy-mode MODE         auto | background | write-blocking (default auto: background, made
                           to converge: write-blocking once the first pass is done on QEMU >= 8.2,
                           a TCP_NODELAY relay before a QEMU < 8.0 destination's NBD server)
  --data-tls MODE          required | preferred | off: QEMU's TLS on NBD and the migration stream
                           (default preferred: on where both sides can; between two local folders
                           with a throwaway CA made for the run)
  --data-tls-dir DIR       this host's data-path certificates: DIR/ca.pem, DIR/source.pem+key,
                           DIR/destination.pem+key (the sides that are local)
  --on-deadline POLICY     abort | force, when the completion deadline passes (default abort)
  --no-auto-converge       do not throttle the guest's vCPUs to make RAM converge
  --timeout S              give up after S seconds in all (default 3600)
  --progress-timeout S     give up after S seconds without progress (default 60)
  --dry-run                check everything and print the plan; change nothing
  --recover                settle what a migrate-vm that died (kill -9, a crash) left on both
                           sides, from what the QEMUs report; the same --spec and --to-dir as
                           the run (docs/migration.md, "After a crash")
  --json                   one JSON event per line on stdout, ending with a summary line
  --log-level LEVEL        pino level for the log on stderr (default warn)
  -h, --help               this text
  --version                ferry's version

Exit codes:
  0    migrated: the guest runs on the destination, the source QEMU has exited
  1    the migration failed and was rolled back: the guest runs on the source as before
  2    bad input (flags, spec, or a preflight refusal): nothing was changed
  3    outcome uncertain: the destination may have run, the source was left paused; look
       before resuming anything (the message says which QEMU to check)
  4    (lazy) the guest runs on the destination but hydration failed: keep the source QEMU
       up, it still serves the blocks the destination lacks (docs/migration.md)
  5    the source QEMU died before the switchover; the destination never ran and was removed:
       no QEMU runs the guest, start it again from its disks on the source
  (--recover: 0 settled, the guest runs where it says; 3 uncertain; 5 no QEMU runs it)
  130  cancelled by SIGINT/SIGTERM and rolled back: the guest runs on the source
`;

export type SourceArg = { kind: 'local'; specPath: string; sourceQmp: string | undefined } | { kind: 'agent'; url: string; vm: string; keepDisks: boolean };
export type DestinationArg = { kind: 'dir'; toDir: string; migrationHost: string; portRange: [number, number] } | { kind: 'agent'; url: string };

export interface CliArgs {
  source: SourceArg;
  destination: DestinationArg;
  /** Where the agents' token comes from, when an agent is involved. */
  tokenFile: string | undefined;
  /** Mutual TLS to wss:// agents. */
  tls: { cert: string; key: string; ca: string } | undefined;
  /** Data-path certificates of the local sides (ca.pem, source.pem/.key, destination.pem/.key). */
  dataTlsDir: string | undefined;
  options: MigrationOptionsInput;
  dryRun: boolean;
  /** Settle what a dead run left instead of migrating (local source and --to-dir only). */
  recover: boolean;
  json: boolean;
  logLevel: string;
}

export type Parsed = { kind: 'help' } | { kind: 'version' } | { kind: 'run'; args: CliArgs };

const SIZE_UNITS: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };

/** The largest size a flag takes: a safe integer (QEMU's own limits are higher), 8191T. */
const MAX_SIZE_T = Math.floor(Number.MAX_SAFE_INTEGER / 1024 ** 4);

/** "500M" -> 524288000; binary units; refuses anything that is not a positive size, or too large. */
export function parseSize(flag: string, text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`${flag}: '${text}' is not a size (examples: 500M, 1G, 10485760)`);
  const n = Math.round(Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!);
  if (!(n > 0)) throw new UsageError(`${flag}: must be more than 0, got '${text}'`);
  if (n > MAX_SIZE_T * 1024 ** 4) throw new UsageError(`${flag}: '${text}' is too large (at most ${MAX_SIZE_T}T)`);
  return n;
}

export function parseIntIn(flag: string, text: string, min: number, max: number): number {
  if (!/^\d+$/.test(text.trim())) throw new UsageError(`${flag}: '${text}' is not a whole number`);
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`${flag}: ${n} is out of range (${min}..${max})`);
  return n;
}

/** One of a fixed set of words; the error lists them. */
export function parseChoice<T extends string>(flag: string, text: string, choices: readonly T[]): T {
  if (!(choices as readonly string[]).includes(text)) throw new UsageError(`${flag}: '${text}' is not one of ${choices.join(', ')}`);
  return text as T;
}

export function parseCli(argv: string[]): Parsed {
  let values;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: true,
      options: {
        spec: { type: 'string' },
        from: { type: 'string' },
        to: { type: 'string' },
        'token-file': { type: 'string' },
        'keep-source-disks': { type: 'boolean' },
        'tls-cert': { type: 'string' },
        'tls-key': { type: 'string' },
        'tls-ca': { type: 'string' },
        'source-qmp': { type: 'string' },
        'to-dir': { type: 'string' },
        'migration-host': { type: 'string' },
        'port-range': { type: 'string' },
        bandwidth: { type: 'string' },
        'downtime-limit': { type: 'string' },
        'max-downtime': { type: 'string' },
        'copy-mode': { type: 'string' },
        'data-tls': { type: 'string' },
        'data-tls-dir': { type: 'string' },
        mode: { type: 'string' },
        'hydration-rate': { type: 'string' },
        'nbd-reconnect': { type: 'string' },
        'on-deadline': { type: 'string' },
        'no-auto-converge': { type: 'boolean' },
        timeout: { type: 'string' },
        'progress-timeout': { type: 'string' },
        'dry-run': { type: 'boolean' },
        recover: { type: 'boolean' },
        json: { type: 'boolean' },
        'log-level': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean' },
      },
    }));
  } catch (err) {
    // node's messages name the flag ("Unknown option '--fast'", "Option '--spec <value>' argument missing").
    throw new UsageError((err as Error).message.split('\n')[0]!);
  }
  if (values.help) return { kind: 'help' };
  if (values.version) return { kind: 'version' };
  const tlsGiven = ['tls-cert', 'tls-key', 'tls-ca'].filter((f) => values[f as 'tls-cert'] !== undefined);
  if (tlsGiven.length > 0 && tlsGiven.length < 3) throw new UsageError(`mutual TLS needs all of --tls-cert, --tls-key and --tls-ca (got only --${tlsGiven.join(', --')})`);
  const tls = tlsGiven.length === 3 ? { cert: values['tls-cert']!, key: values['tls-key']!, ca: values['tls-ca']! } : undefined;
  const url = (flag: string, text: string): string => {
    let u: URL;
    try {
      u = new URL(text);
    } catch {
      throw new UsageError(`${flag}: '${text}' is not a URL (example: ws://10.0.0.17:7420)`);
    }
    if ((u.protocol !== 'ws:' && u.protocol !== 'wss:') || u.pathname !== '/' || u.search || u.hash) throw new UsageError(`${flag}: '${text}' is not an agent URL (example: ws://10.0.0.17:7420)`);
    if (u.protocol === 'wss:' && !tls) throw new UsageError(`${flag}: '${text}' is TLS: give --tls-cert, --tls-key and --tls-ca`);
    return `${u.protocol}//${u.host}`;
  };
  let source: SourceArg;
  if (values.from !== undefined) {
    if (values.spec !== undefined) throw new UsageError('--from and --spec exclude each other: with --from the agent knows the spec');
    if (values['source-qmp'] !== undefined) throw new UsageError('--source-qmp is for a local source (--spec), not --from');
    if (positionals.length !== 1) throw new UsageError(`--from needs exactly one VM name after the flags, got ${positionals.length === 0 ? 'none' : positionals.join(' ')}`);
    if (values.to === undefined) throw new UsageError('--from needs --to ws://HOST (an agent) as the destination');
    source = { kind: 'agent', url: url('--from', values.from), vm: positionals[0]!, keepDisks: values['keep-source-disks'] ?? false };
  } else {
    if (positionals.length > 0) throw new UsageError(`unexpected argument '${positionals[0]}' (a VM name goes with --from)`);
    if (values['keep-source-disks']) throw new UsageError('--keep-source-disks goes with --from (a local source keeps its disks anyway)');
    if (!values.spec) throw new UsageError('--spec is required (the running VM\'s spec, JSON), or --from ws://HOST VM');
    source = { kind: 'local', specPath: values.spec, sourceQmp: values['source-qmp'] };
  }
  if (values.to !== undefined && values['to-dir'] !== undefined) throw new UsageError('--to and --to-dir exclude each other: one destination');
  if (values.to === undefined && values['to-dir'] === undefined) throw new UsageError('--to-dir is required (the destination folder), or --to ws://HOST (an agent)');
  if (values.to !== undefined) {
    for (const f of ['migration-host', 'port-range'] as const) {
      if (values[f] !== undefined) throw new UsageError(`--${f} goes with --to-dir; an agent has its own (see its config)`);
    }
  }
  if (values['token-file'] !== undefined && values.to === undefined) throw new UsageError('--token-file goes with --from/--to (agents)');
  if (tls && values.to === undefined) throw new UsageError('--tls-* go with --from/--to (agents)');

  if (values.recover) {
    if (values.from !== undefined || values.to !== undefined) throw new UsageError('--recover is for a local run (--spec and --to-dir); between agents the agents settle a dead run themselves');
    if (values['dry-run']) throw new UsageError('--recover and --dry-run exclude each other');
  }

  const options: MigrationOptionsInput = {};
  if (values.bandwidth !== undefined) options.bandwidthBytesPerSec = parseSize('--bandwidth', values.bandwidth);
  if (values['downtime-limit'] !== undefined) options.downtimeLimitMs = parseIntIn('--downtime-limit', values['downtime-limit'], 1, 60_000);
  if (values['max-downtime'] !== undefined) options.maxDowntimeLimitMs = parseIntIn('--max-downtime', values['max-downtime'], 1, 600_000);
  if (values['copy-mode'] !== undefined) options.copyMode = parseChoice('--copy-mode', values['copy-mode'], ['auto', 'background', 'write-blocking'] as const);
  if (values['data-tls'] !== undefined) options.dataTls = parseChoice('--data-tls', values['data-tls'], ['required', 'preferred', 'off'] as const);
  if (values.mode !== undefined) options.mode = parseChoice('--mode', values.mode, ['precopy', 'lazy'] as const);
  if (values['hydration-rate'] !== undefined) {
    if (options.mode !== 'lazy') throw new UsageError('--hydration-rate goes with --mode lazy');
    options.hydrationBytesPerSec = parseSize('--hydration-rate', values['hydration-rate']);
  }
  if (values['nbd-reconnect'] !== undefined) {
    if (options.mode !== 'lazy') throw new UsageError('--nbd-reconnect goes with --mode lazy');
    options.nbdReconnectDelayS = parseIntIn('--nbd-reconnect', values['nbd-reconnect'], 0, 300);
  }
  if (values['on-deadline'] !== undefined) options.onDeadline = parseChoice('--on-deadline', values['on-deadline'], ['abort', 'force'] as const);
  if (values['no-auto-converge']) options.autoConverge = false;
  if (values.timeout !== undefined) options.totalTimeoutMs = parseIntIn('--timeout', values.timeout, 1, 7 * 86_400) * 1000;
  if (values['progress-timeout'] !== undefined) options.progressTimeoutMs = parseIntIn('--progress-timeout', values['progress-timeout'], 1, 86_400) * 1000;
  if (options.downtimeLimitMs !== undefined && options.maxDowntimeLimitMs !== undefined && options.maxDowntimeLimitMs < options.downtimeLimitMs) {
    throw new UsageError('--max-downtime must not be below --downtime-limit');
  }

  let portRange: [number, number] = [20000, 29999];
  if (values['port-range'] !== undefined) {
    const m = /^(\d+)-(\d+)$/.exec(values['port-range']);
    if (!m) throw new UsageError(`--port-range: '${values['port-range']}' is not LO-HI (e.g. 20000-29999)`);
    const lo = parseIntIn('--port-range', m[1]!, 1024, 65535);
    const hi = parseIntIn('--port-range', m[2]!, 1024, 65535);
    if (hi < lo) throw new UsageError('--port-range: HI is below LO');
    portRange = [lo, hi];
  }
  const host = values['migration-host'] ?? '127.0.0.1';
  if (isIP(host) === 0) throw new UsageError(`--migration-host: '${host}' is not an IP address`);
  const level = parseChoice('--log-level', values['log-level'] ?? 'warn', ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const);
  const destination: DestinationArg = values.to !== undefined ? { kind: 'agent', url: url('--to', values.to) } : { kind: 'dir', toDir: values['to-dir']!, migrationHost: host, portRange };
  return {
    kind: 'run',
    args: {
      source,
      destination,
      tokenFile: values['token-file'],
      tls,
      dataTlsDir: values['data-tls-dir'],
      options,
      dryRun: values['dry-run'] ?? false,
      recover: values.recover ?? false,
      json: values.json ?? false,
      logLevel: level,
    },
  };
}
