/**
 * What a remote caller may send to one of its VMs' QEMU through the agent's QMP tunnel: the
 * commands the migration engine sends, each with exactly the arguments the engine gives it.
 *
 * A policy by command name is no policy (`migrate` with `exec:` runs a shell as root; a `file`
 * blockdev plus a writable export reads and writes any host file), so every message is parsed
 * here with a strict zod schema built for this VM on this host:
 *   - node-names, job ids and export ids only of the shapes ferry gives them (names.ts), and
 *     device arguments only this VM's own disk nodes;
 *   - blockdev-add only of an NBD client node (driver nbd, inet, an IP address the peer policy
 *     allows); never file/host_device or any other driver;
 *   - migration URIs only `tcp:<ip>:<port>`: to a peer the policy allows (source), or on this
 *     agent's own migration address and port range (destination); never exec:, fd:, unix:;
 *   - NBD servers only on this agent's migration address and port range (a destination: or the
 *     one unix socket in its own run dir the agent's NBD relay forwards to); writable exports only
 *     on a destination (a source serves its disks read-only);
 *   - `yank` (a source's rollback) only of this VM's ferry NBD client nodes and its migration,
 *     in-band or out-of-band (`exec-oob`, the one command allowed so: a source whose main loop
 *     waits on a silent destination answers nothing in-band);
 *   - no object-add, chardev-add, getfd/add-fd, human-monitor-command, device_add...
 * What passes is forwarded re-serialised from the parsed value, never as the caller's bytes: QEMU
 * reads exactly what was checked (no duplicate keys, no QEMU-only JSON extensions).
 */
import { isIP } from 'node:net';
import { z } from 'zod';
import { EXPORT_PREFIX, MIRROR_JOB_PREFIX, STREAM_JOB_PREFIX, TARGET_NODE_PREFIX } from '../engine/names.js';
import { DATA_TLS_IDS } from '../host/data-tls.js';
import { deltaJobId } from '../engine/delta.js';
import { diskNodeName } from '../qemu/spec.js';

export type TunnelRole = 'source' | 'destination';

export interface QmpPolicyContext {
  role: TunnelRole;
  /** The disk ids of this VM's spec: its device arguments may name only these nodes. */
  diskIds: readonly string[];
  /** This agent's migration address: where its QEMUs may listen. */
  migrationHost: string;
  portRange: readonly [number, number];
  /** May this VM's QEMU connect out to this IP address (NBD client, migration stream)? */
  peerAllowed: (ip: string) => boolean;
  /**
   * Data-path TLS: with `required`, no NBD server, NBD client or migration stream without TLS,
   * and none before the agent made this QEMU ready for it (`active`: vm.beginDataTls, or
   * dest.start with dataTls, which also set the stream's TLS parameters themselves).
   */
  dataTls?: { required: boolean; active: () => boolean };
  /**
   * A destination behind the agent's NBD relay (dest.startNbdRelay: a QEMU < 8.0): the one unix
   * socket its NBD server may listen on, `<this VM's run dir>/nbd.sock`. Absent: inet only.
   */
  nbdRelaySocket?: string;
}

export type PolicyVerdict =
  | { ok: true; command: string; line: string; id?: string | number }
  /** `id`: the refused message's own (a string or a number), so the caller's pending call ends. */
  | { ok: false; command: string | undefined; code: 'QMP_REFUSED' | 'QMP_BAD_MESSAGE'; reason: string; id?: string | number };

const MIGRATION_CAPABILITIES = ['events', 'pause-before-switchover', 'auto-converge', 'dirty-bitmaps', 'late-block-activate', 'multifd'] as const;

const noArgs = z.union([z.undefined(), z.object({}).strict()]);
const oneOf = (values: readonly string[], what: string) =>
  z.string().refine((s) => values.includes(s), { message: `must be ${what}` });

/** One schema per command this role allows; built per VM, because names depend on its disks. */
function commandSchemas(ctx: QmpPolicyContext): Map<string, z.ZodType> {
  const ids = ctx.diskIds;
  const diskNode = oneOf(ids.map(diskNodeName), `one of this VM's disk nodes (${ids.map(diskNodeName).join(', ')})`);
  const targetNode = oneOf(ids.map((id) => `${TARGET_NODE_PREFIX}${id}`), `a ferry NBD node of this VM (${TARGET_NODE_PREFIX}<disk id>)`);
  const mirrorJob = oneOf(ids.map((id) => `${MIRROR_JOB_PREFIX}${id}`), `a ferry mirror job of this VM`);
  const streamJob = oneOf(ids.map((id) => `${STREAM_JOB_PREFIX}${id}`), `a ferry stream job of this VM`);
  // Evacuation by delta (src/engine/source-delta.ts): backup passes over ferry's own bitmaps.
  const deltaJob = oneOf(ids.map(deltaJobId), 'a ferry delta pass job of this VM');
  const deltaBitmap = z.string().regex(/^ferry-delta-\d{1,6}$/, 'must be a ferry delta pass bitmap');
  const passBitmap = z.string().regex(/^ferry-(delta|replica)-\d{1,9}$/, 'must be a ferry replica or delta pass bitmap');
  const ferryJob = ctx.role === 'source' ? z.union([mirrorJob, deltaJob]) : streamJob;
  const exportId = z.string().regex(new RegExp(`^${EXPORT_PREFIX}[a-z0-9]{1,16}-[a-z][a-z0-9-]{0,15}$`), 'must be a ferry export name');
  const [lo, hi] = ctx.portRange;
  const ownPort = z
    .string()
    .regex(/^\d{1,5}$/, 'must be a port number')
    .refine((p) => Number(p) >= lo && Number(p) <= hi, `must be in this agent's port range ${lo}-${hi}`);
  const peerHost = z
    .string()
    .refine((h) => isIP(h) !== 0, 'must be an IP address')
    .refine((h) => ctx.peerAllowed(h), 'is not a migration peer this agent allows');
  const anyPort = z
    .string()
    .regex(/^\d{1,5}$/, 'must be a port number')
    .refine((p) => Number(p) >= 1 && Number(p) <= 65535, 'must be a port number');
  const bytes = z.number().int().min(0).max(2 ** 53);

  const tlsRequired = ctx.dataTls?.required ?? false;
  const tlsReady = (): boolean => ctx.dataTls?.active() ?? false;
  const needsTls = <T extends z.ZodType>(schema: T, has: (v: z.infer<T>) => boolean): z.ZodType =>
    schema.superRefine((v, c) => {
      if (has(v) && !tlsReady()) c.addIssue({ code: 'custom', message: 'uses ferry\'s TLS objects before the agent made them (vm.beginDataTls / dest.start dataTls)' });
      if (tlsRequired && !(has(v) && tlsReady())) c.addIssue({ code: 'custom', message: 'this agent requires TLS on the data path (dataTls required)' });
    });
  const streamNeedsTls = <T extends z.ZodType>(schema: T): z.ZodType =>
    schema.superRefine((_v, c) => {
      if (tlsRequired && !tlsReady()) c.addIssue({ code: 'custom', message: 'this agent requires TLS on the data path: no migration stream before the agent set it up' });
    });
  const nbdServerStart = needsTls(
    z
      .object({
        addr:
          ctx.role === 'destination' && ctx.nbdRelaySocket !== undefined
            ? z.union([
                z.object({ type: z.literal('inet'), data: z.object({ host: z.literal(ctx.migrationHost), port: ownPort }).strict() }).strict(),
                z.object({ type: z.literal('unix'), data: z.object({ path: z.literal(ctx.nbdRelaySocket) }).strict() }).strict(),
              ])
            : z.object({ type: z.literal('inet'), data: z.object({ host: z.literal(ctx.migrationHost), port: ownPort }).strict() }).strict(),
        'tls-creds': z.literal(DATA_TLS_IDS.server).optional(),
        'tls-authz': z.literal(DATA_TLS_IDS.authz).optional(),
      })
      .strict()
      .refine((v) => (v['tls-creds'] === undefined) === (v['tls-authz'] === undefined), 'tls-creds and tls-authz go together (an NBD server over TLS admits one peer)'),
    (v) => v['tls-creds'] !== undefined,
  );
  const blockExportAdd = z
    .object({
      type: z.literal('nbd'),
      id: exportId,
      'node-name': diskNode,
      name: exportId,
      // A source serves the guest's disks read-only (lazy mode); only a destination is written.
      writable: ctx.role === 'destination' ? z.boolean() : z.literal(false),
      // QEMU >= 10.0, lazy mode's source: the export outlives the node's inactivation at the switchover.
      ...(ctx.role === 'source' ? { 'allow-inactive': z.literal(true).optional() } : {}),
    })
    .strict();
  const setCapabilities = z
    .object({ capabilities: z.array(z.object({ capability: oneOf(MIGRATION_CAPABILITIES, `one of ${MIGRATION_CAPABILITIES.join(', ')}`), state: z.boolean() }).strict()).max(16) })
    .strict();
  // multifd-channels: the engine's multifdChannels (1-8); each channel is one more connection to the same migration port, TLS like the first.
  const setParameters = z.object({ 'max-bandwidth': bytes.optional(), 'downtime-limit': z.number().int().min(0).max(2_000_000).optional(), 'multifd-channels': z.number().int().min(1).max(8).optional() }).strict();

  const common: [string, z.ZodType][] = [
    // OOB may be negotiated: only `yank` is ever let through out-of-band (OOB_COMMANDS).
    ['qmp_capabilities', z.union([noArgs, z.object({ enable: z.tuple([z.literal('oob')]) }).strict()])],
    ['query-qmp-schema', noArgs],
    ['query-version', noArgs],
    ['query-status', noArgs],
    ['query-migrate', noArgs],
    ['query-migrate-capabilities', noArgs],
    ['query-migrate-parameters', noArgs],
    ['query-named-block-nodes', z.union([z.undefined(), z.object({ flat: z.boolean().optional() }).strict()])],
    ['query-block-jobs', noArgs],
    ['query-jobs', noArgs],
    ['query-block-exports', noArgs],
    ['nbd-server-start', nbdServerStart],
    ['nbd-server-stop', noArgs],
    ['block-export-add', blockExportAdd],
    ['block-export-del', z.object({ id: exportId, mode: z.enum(['safe', 'hard']).optional() }).strict()],
    ['migrate-set-capabilities', setCapabilities],
    ['migrate-set-parameters', setParameters],
    ['block-job-cancel', z.object({ device: ferryJob, force: z.boolean().optional() }).strict()],
    ['job-dismiss', z.object({ id: ferryJob }).strict()],
    ['cont', noArgs],
  ];
  if (ctx.role === 'source') {
    return new Map([
      ...common,
      ['query-memory-size-summary', noArgs],
      // preflight: the machine type the source runs (src/qemu/versions.ts), and nothing else of QOM
      ['query-machines', noArgs],
      ['qom-get', z.object({ path: z.literal('/machine'), property: z.literal('type') }).strict()],
      // lazy mode on QEMU >= 10.0: its disk nodes active again after the switchover, for the export
      ['blockdev-set-active', z.object({ 'node-name': diskNode, active: z.literal(true) }).strict()],
      [
        'blockdev-add',
        needsTls(
          z
            .object({
              driver: z.literal('nbd'),
              'node-name': targetNode,
              server: z.object({ type: z.literal('inet'), host: peerHost, port: anyPort }).strict(),
              export: exportId,
              'tls-creds': z.literal(DATA_TLS_IDS.client).optional(),
              'tls-hostname': z.string().regex(/^[A-Za-z0-9.:-]{1,253}$/, 'must be an IP address or a host name').optional(),
            })
            .strict(),
          (v) => v['tls-creds'] !== undefined,
        ),
      ],
      ['blockdev-del', z.object({ 'node-name': targetNode }).strict()],
      [
        'blockdev-mirror',
        z
          .object({
            'job-id': mirrorJob,
            device: diskNode,
            target: targetNode,
            sync: z.enum(['top', 'full']),
            'copy-mode': z.enum(['background', 'write-blocking']).optional(),
            'auto-dismiss': z.boolean().optional(),
            speed: bytes.optional(),
          })
          .strict(),
      ],
      ['block-job-change', z.object({ id: mirrorJob, type: z.literal('mirror'), 'copy-mode': z.literal('write-blocking') }).strict()],
      [
        'transaction',
        z
          .object({
            actions: z
              .array(
                z.union([
                  z.object({ type: z.literal('block-dirty-bitmap-add'), data: z.object({ node: diskNode, name: deltaBitmap, persistent: z.literal(false) }).strict() }).strict(),
                  z
                    .object({
                      type: z.literal('blockdev-backup'),
                      data: z.object({ 'job-id': deltaJob, device: diskNode, target: targetNode, sync: z.literal('bitmap'), bitmap: passBitmap, 'bitmap-mode': z.literal('never') }).strict(),
                    })
                    .strict(),
                ]),
              )
              .min(1)
              .max(64),
          })
          .strict(),
      ],
      ['block-dirty-bitmap-remove', z.object({ node: diskNode, name: deltaBitmap }).strict()],
      ['migrate', streamNeedsTls(z.object({ uri: migrationUri(peerHost, anyPort) }).strict())],
      ['migrate_cancel', noArgs],
      // The rollback's cut from a dead or unreachable destination (src/engine/source-yank.ts):
      // this VM's ferry NBD client nodes and the migration, never a chardev or another node.
      ['query-yank', noArgs],
      [
        'yank',
        z
          .object({
            instances: z
              .array(z.union([z.object({ type: z.literal('block-node'), 'node-name': targetNode }).strict(), z.object({ type: z.literal('migration') }).strict()]))
              .min(1)
              .max(ids.length + 1),
          })
          .strict(),
      ],
      ['migrate-continue', z.object({ state: z.literal('pre-switchover') }).strict()],
      ['quit', noArgs],
    ]);
  }
  return new Map([
    ...common,
    ['migrate-incoming', streamNeedsTls(z.object({ uri: migrationUri(z.literal(ctx.migrationHost), ownPort) }).strict())],
    [
      'block-stream',
      z
        .object({ 'job-id': streamJob, device: diskNode, speed: bytes.optional(), 'auto-finalize': z.boolean().optional(), 'auto-dismiss': z.boolean().optional() })
        .strict(),
    ],
    ['block-job-set-speed', z.object({ device: streamJob, speed: bytes }).strict()],
    ['job-finalize', z.object({ id: streamJob }).strict()],
  ]);
}

/** `tcp:<host>:<port>` (IPv6 in brackets), with host and port checked by the given schemas. */
function migrationUri(host: z.ZodType<string>, port: z.ZodType<string>): z.ZodType<string> {
  return z.string().superRefine((uri, ctx) => {
    const m = /^tcp:(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(uri);
    if (!m) {
      ctx.addIssue({ code: 'custom', message: 'must be tcp:<ip address>:<port> (no exec:, fd:, unix: or host names)' });
      return;
    }
    for (const [value, schema, what] of [[m[1] ?? m[2]!, host, 'host'], [m[3]!, port, 'port']] as const) {
      const r = schema.safeParse(value);
      if (!r.success) ctx.addIssue({ code: 'custom', message: `${what} ${value} ${r.error.issues[0]?.message ?? 'is refused'}` });
    }
  });
}

/** Only the id of a message, whatever else it holds (a refusal answers with it). */
const idSchema = z.object({ id: z.union([z.string(), z.number()]).optional() }).loose();

const messageSchema = z
  .object({
    execute: z.string().max(64),
    arguments: z.record(z.string(), z.unknown()).optional(),
    id: z.union([z.string().max(128), z.number().int()]).optional(),
  })
  .strict();

/**
 * What may run out-of-band: the rollback's cut from a silent destination, which QEMU runs in the
 * monitor's own thread while the main loop waits on that destination (QMP requires an id).
 */
const OOB_COMMANDS: ReadonlySet<string> = new Set(['yank']);
const oobMessageSchema = z
  .object({
    'exec-oob': z.string().max(64),
    arguments: z.record(z.string(), z.unknown()).optional(),
    id: z.union([z.string().max(128), z.number().int()]),
  })
  .strict();

/** A compiled policy for one VM's tunnel: judge() is called for every line the caller sends. */
export class QmpPolicy {
  readonly #schemas: Map<string, z.ZodType>;

  constructor(ctx: QmpPolicyContext) {
    this.#schemas = commandSchemas(ctx);
  }

  allows(command: string): boolean {
    return this.#schemas.has(command);
  }

  judge(line: string): PolicyVerdict {
    let raw: unknown;
    try {
      raw = JSON.parse(line);
    } catch {
      return { ok: false, command: undefined, code: 'QMP_BAD_MESSAGE', reason: 'the agent could not parse this QMP message as JSON' };
    }
    const idOf = idSchema.safeParse(raw);
    const id = idOf.success && idOf.data.id !== undefined ? { id: idOf.data.id } : {};
    const oob = typeof raw === 'object' && raw !== null && 'exec-oob' in raw;
    const msg = oob
      ? oobMessageSchema.transform((m) => ({ execute: m['exec-oob'], arguments: m.arguments, id: m.id })).safeParse(raw)
      : messageSchema.safeParse(raw);
    if (!msg.success) {
      const issue = msg.error.issues[0];
      const field = issue?.path.join('.') || '(message)';
      return { ok: false, command: undefined, code: 'QMP_BAD_MESSAGE', reason: `not a QMP command the agent forwards: ${field}: ${issue?.message ?? 'malformed'} (control messages are refused)`, ...id };
    }
    const command = msg.data.execute;
    const schema = this.#schemas.get(command);
    if (!schema || (oob && !OOB_COMMANDS.has(command))) {
      return { ok: false, command, code: 'QMP_REFUSED', reason: `the agent does not allow '${command}'${oob ? ' out-of-band' : ''} on this VM`, ...id };
    }
    const args = schema.safeParse(msg.data.arguments);
    if (!args.success) {
      const issue = args.error.issues[0];
      const field = issue?.path.join('.') || 'arguments';
      return { ok: false, command, code: 'QMP_REFUSED', reason: `the agent does not allow these arguments to '${command}': ${field}: ${issue?.message ?? 'refused'}`, ...id };
    }
    const out: Record<string, unknown> = oob ? { 'exec-oob': command } : { execute: command };
    if (args.data !== undefined) out.arguments = args.data;
    if (msg.data.id !== undefined) out.id = msg.data.id;
    return { ok: true, command, line: JSON.stringify(out), ...(msg.data.id !== undefined ? { id: msg.data.id } : {}) };
  }
}

/**
 * Which addresses a VM's QEMU may connect out to. With `peers` (IP addresses or CIDRs) only
 * those. Without, any address except loopback, and loopback only when this agent's own
 * migration address is loopback (one machine, tests): a caller must never aim a root QEMU at a
 * service that listens on the hypervisor's loopback.
 */
export function peerMatcher(opts: { peers?: readonly string[] | undefined; migrationHost: string }): (ip: string) => boolean {
  if (opts.peers) {
    const nets = opts.peers.map(parseCidr);
    return (ip) => nets.some((n) => inCidr(ip, n));
  }
  const localOnly = isLoopback(opts.migrationHost);
  return (ip) => isIP(ip) !== 0 && (localOnly || !isLoopback(ip));
}

function isLoopback(ip: string): boolean {
  return ip === '::1' || /^127\./.test(ip) || /^::ffff:127\./i.test(ip);
}

interface Cidr {
  family: 4 | 6;
  bits: bigint;
  prefix: number;
}

export function parseCidr(s: string): Cidr {
  const [addr, len] = s.split('/');
  const family = isIP(addr ?? '');
  if (family !== 4 && family !== 6) throw new Error(`'${s}' is not an IP address or CIDR`);
  const max = family === 4 ? 32 : 128;
  const prefix = len === undefined ? max : Number(len);
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > max || (len !== undefined && !/^\d+$/.test(len))) throw new Error(`'${s}' has a bad prefix length`);
  return { family, bits: toBits(addr!, family), prefix };
}

function inCidr(ip: string, n: Cidr): boolean {
  const family = isIP(ip);
  if (family !== n.family) return false;
  const width = BigInt(family === 4 ? 32 : 128);
  const shift = width - BigInt(n.prefix);
  return toBits(ip, family) >> shift === n.bits >> shift;
}

function toBits(ip: string, family: 4 | 6): bigint {
  if (family === 4) return ip.split('.').reduce((acc, o) => (acc << 8n) | BigInt(Number(o)), 0n);
  // Expand '::' and an embedded IPv4 tail, then read eight 16-bit groups.
  let s = ip;
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(s);
  if (v4) {
    const b = toBits(v4[1]!, 4);
    s = s.slice(0, -v4[1]!.length) + `${(b >> 16n).toString(16)}:${(b & 0xffffn).toString(16)}`;
  }
  const [head, tail] = s.split('::');
  const h = head ? head.split(':') : [];
  const t = tail !== undefined && tail !== '' ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t];
  return groups.reduce((acc, g) => (acc << 16n) | BigInt(parseInt(g, 16)), 0n);
}
