/**
 * The QMP commands ferry uses, typed: arguments as TypeScript types (checked by QEMU, not here),
 * replies parsed by zod. Reply schemas tolerate fields they do not name (a newer QEMU adds them)
 * and reject a missing required field (the client turns that into a QmpProtocolError).
 *
 * Shapes follow QEMU 7.2's QAPI as reported by its own `query-qmp-schema` (fixtures/qmp/).
 * Enums QEMU keeps extending (job types, error actions) are plain strings in replies, so a newer
 * QEMU cannot break a parse; enums ferry branches on (run state, migration status) are exact.
 */
import { z } from 'zod';
import { jobStatusSchema, migrationStatusSchema } from './events.js';

// ------------------------------------------------------------------ shared argument types

/** SocketAddress (flat), as in blockdev-add's `server` for nbd. */
export type SocketAddress =
  | { type: 'inet'; host: string; port: string; numeric?: boolean; 'to'?: number; ipv4?: boolean; ipv6?: boolean; 'keep-alive'?: boolean }
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'vsock'; cid: string; port: string }
  | { type: 'fd'; str: string };

/** SocketAddressLegacy (`{type, data}`), as in nbd-server-start's `addr`. */
export type SocketAddressLegacy =
  | { type: 'inet'; data: { host: string; port: string; numeric?: boolean; to?: number; ipv4?: boolean; ipv6?: boolean; 'keep-alive'?: boolean } }
  | { type: 'unix'; data: { path: string; abstract?: boolean; tight?: boolean } }
  | { type: 'vsock'; data: { cid: string; port: string } }
  | { type: 'fd'; data: { str: string } };

export type BlockdevOnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto';
export type MirrorSyncMode = 'top' | 'full' | 'none' | 'incremental' | 'bitmap';
export type MirrorCopyMode = 'background' | 'write-blocking';
export type RunState = z.infer<typeof runStateSchema>;
export type { JobStatus, MigrationStatus } from './events.js';

/** blockdev-add's options: a union over ~40 drivers; typed loosely beyond the common keys. */
export interface BlockdevOptions {
  driver: string;
  'node-name'?: string;
  discard?: 'ignore' | 'unmap';
  cache?: { direct?: boolean; 'no-flush'?: boolean };
  'read-only'?: boolean;
  'auto-read-only'?: boolean;
  'force-share'?: boolean;
  'detect-zeroes'?: 'off' | 'on' | 'unmap';
  [driverOption: string]: unknown;
}

/** block-stream: copies what a node's backing chain holds into the node (lazy mode's hydration). */
export interface BlockStreamArgs {
  'job-id'?: string;
  device: string;
  'base-node'?: string;
  speed?: number;
  'on-error'?: BlockdevOnError;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

export interface BlockdevMirrorArgs {
  'job-id'?: string;
  device: string;
  target: string;
  replaces?: string;
  sync: MirrorSyncMode;
  speed?: number;
  granularity?: number;
  'buf-size'?: number;
  'on-source-error'?: BlockdevOnError;
  'on-target-error'?: BlockdevOnError;
  'filter-node-name'?: string;
  'copy-mode'?: MirrorCopyMode;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

export interface NbdServerStartArgs {
  addr: SocketAddressLegacy;
  'tls-creds'?: string;
  'tls-authz'?: string;
  'max-connections'?: number;
}

export interface BlockExportAddNbdArgs {
  type: 'nbd';
  id: string;
  'node-name': string;
  'fixed-iothread'?: boolean;
  iothread?: string;
  name?: string;
  writable?: boolean;
  writethrough?: boolean;
  description?: string;
  bitmaps?: Array<string | { node: string; name: string }>;
  'allocation-depth'?: boolean;
  /** QEMU >= 10.0: serve the node also while it is inactive (after a migration); probe before use. */
  'allow-inactive'?: boolean;
}

export interface MigrateArgs {
  uri: string;
  blk?: boolean;
  inc?: boolean;
  detach?: boolean;
  resume?: boolean;
}

/**
 * migrate-set-parameters: the common parameters typed, the rest (x-*, tls-*, newer ones) allowed.
 * Check `caps.hasMigrationParameter(name)` before relying on one.
 */
export interface MigrateSetParametersArgs {
  'max-bandwidth'?: number;
  'downtime-limit'?: number;
  'cpu-throttle-initial'?: number;
  'cpu-throttle-increment'?: number;
  'cpu-throttle-tailslow'?: boolean;
  'max-cpu-throttle'?: number;
  'throttle-trigger-threshold'?: number;
  'max-postcopy-bandwidth'?: number;
  'multifd-channels'?: number;
  'multifd-compression'?: 'none' | 'zlib' | 'zstd';
  'xbzrle-cache-size'?: number;
  'announce-initial'?: number;
  'announce-max'?: number;
  'announce-rounds'?: number;
  'announce-step'?: number;
  'tls-creds'?: string | null;
  'tls-hostname'?: string | null;
  'tls-authz'?: string | null;
  'block-bitmap-mapping'?: Array<{ 'node-name': string; alias: string; bitmaps: Array<{ name: string; alias: string; transform?: { persistent?: boolean } }> }>;
  [parameter: string]: unknown;
}

export interface MigrationCapabilityStatus {
  capability: string;
  state: boolean;
}

// ------------------------------------------------------------------ reply schemas

const empty = z.object({});
const runStateSchema = z.enum([
  'debug', 'inmigrate', 'internal-error', 'io-error', 'paused', 'postmigrate', 'prelaunch', 'finish-migrate',
  'restore-vm', 'running', 'save-vm', 'shutdown', 'suspended', 'watchdog', 'guest-panicked', 'colo',
]);

export const statusInfoSchema = z.object({ running: z.boolean(), singlestep: z.boolean().optional(), status: runStateSchema });
export type StatusInfo = z.infer<typeof statusInfoSchema>;

export const versionInfoSchema = z.object({
  qemu: z.object({ major: z.number(), minor: z.number(), micro: z.number() }),
  package: z.string(),
});
export type VersionInfo = z.infer<typeof versionInfoSchema>;

const imageInfoSchema = z.object({
  filename: z.string(),
  format: z.string(),
  'virtual-size': z.number(),
  'actual-size': z.number().optional(),
  'cluster-size': z.number().optional(),
  'dirty-flag': z.boolean().optional(),
  'backing-filename': z.string().optional(),
});

const dirtyBitmapInfoSchema = z.object({
  name: z.string().optional(),
  count: z.number(),
  granularity: z.number(),
  recording: z.boolean(),
  busy: z.boolean(),
  persistent: z.boolean(),
  inconsistent: z.boolean().optional(),
});

export const blockDeviceInfoSchema = z.object({
  file: z.string(),
  'node-name': z.string().optional(),
  ro: z.boolean(),
  drv: z.string(),
  backing_file: z.string().optional(),
  backing_file_depth: z.number(),
  encrypted: z.boolean(),
  detect_zeroes: z.string(),
  image: imageInfoSchema,
  cache: z.object({ writeback: z.boolean(), direct: z.boolean(), 'no-flush': z.boolean() }),
  write_threshold: z.number(),
  'dirty-bitmaps': z.array(dirtyBitmapInfoSchema).optional(),
});
export type BlockDeviceInfo = z.infer<typeof blockDeviceInfoSchema>;

export const blockInfoSchema = z.object({
  device: z.string(),
  qdev: z.string().optional(),
  type: z.string(),
  removable: z.boolean(),
  locked: z.boolean(),
  inserted: blockDeviceInfoSchema.optional(),
  tray_open: z.boolean().optional(),
  'io-status': z.string().optional(),
});
export type BlockInfo = z.infer<typeof blockInfoSchema>;

export const jobInfoSchema = z.object({
  id: z.string(),
  type: z.string(),
  status: jobStatusSchema,
  'current-progress': z.number(),
  'total-progress': z.number(),
  error: z.string().optional(),
});
export type JobInfo = z.infer<typeof jobInfoSchema>;

export const blockJobInfoSchema = z.object({
  type: z.string(),
  device: z.string(),
  len: z.number(),
  offset: z.number(),
  busy: z.boolean(),
  paused: z.boolean(),
  speed: z.number(),
  'io-status': z.string(),
  ready: z.boolean(),
  status: jobStatusSchema,
  'auto-finalize': z.boolean(),
  'auto-dismiss': z.boolean(),
  error: z.string().optional(),
});
export type BlockJobInfo = z.infer<typeof blockJobInfoSchema>;

export const blockExportInfoSchema = z.object({
  id: z.string(),
  type: z.string(),
  'node-name': z.string(),
  'shutting-down': z.boolean(),
});
export type BlockExportInfo = z.infer<typeof blockExportInfoSchema>;

const migrationStatsSchema = z.object({
  transferred: z.number(),
  remaining: z.number(),
  total: z.number(),
  duplicate: z.number(),
  skipped: z.number().optional(),
  normal: z.number(),
  'normal-bytes': z.number(),
  'dirty-pages-rate': z.number(),
  mbps: z.number(),
  'dirty-sync-count': z.number(),
  'postcopy-requests': z.number().optional(),
  'page-size': z.number().optional(),
  'multifd-bytes': z.number().optional(),
  'pages-per-second': z.number().optional(),
  'precopy-bytes': z.number().optional(),
  'downtime-bytes': z.number().optional(),
  'postcopy-bytes': z.number().optional(),
});
export type MigrationStats = z.infer<typeof migrationStatsSchema>;

/** query-migrate. Every field is optional: a QEMU that never migrated replies `{}`. */
export const queryMigrateReturnSchema = z.object({
  status: migrationStatusSchema.optional(),
  ram: migrationStatsSchema.optional(),
  disk: migrationStatsSchema.optional(),
  'total-time': z.number().optional(),
  'expected-downtime': z.number().optional(),
  downtime: z.number().optional(),
  'setup-time': z.number().optional(),
  'cpu-throttle-percentage': z.number().optional(),
  'error-desc': z.string().optional(),
  'blocked-reasons': z.array(z.string()).optional(),
});
export type QueryMigrateReturn = z.infer<typeof queryMigrateReturnSchema>;

export const migrationCapabilityStatusSchema = z.object({ capability: z.string(), state: z.boolean() });

/** query-migrate-parameters: all optional in QAPI; the numeric and common ones typed. */
export const migrationParametersSchema = z.looseObject({
  'announce-initial': z.number().optional(),
  'announce-max': z.number().optional(),
  'announce-rounds': z.number().optional(),
  'announce-step': z.number().optional(),
  'cpu-throttle-initial': z.number().optional(),
  'cpu-throttle-increment': z.number().optional(),
  'cpu-throttle-tailslow': z.boolean().optional(),
  'max-cpu-throttle': z.number().optional(),
  'throttle-trigger-threshold': z.number().optional(),
  'max-bandwidth': z.number().optional(),
  'downtime-limit': z.number().optional(),
  'max-postcopy-bandwidth': z.number().optional(),
  'multifd-channels': z.number().optional(),
  'multifd-compression': z.string().optional(),
  'xbzrle-cache-size': z.number().optional(),
  'tls-creds': z.string().optional(),
  'tls-hostname': z.string().optional(),
  'tls-authz': z.string().optional(),
});
export type MigrationParameters = z.infer<typeof migrationParametersSchema>;

/** One entry of query-qmp-schema (SchemaInfo); the meta-type specific fields kept loosely. */
export const schemaInfoSchema = z.looseObject({
  name: z.string(),
  'meta-type': z.string(),
});
export type SchemaInfo = z.infer<typeof schemaInfoSchema>;

// ------------------------------------------------------------------ the command table

type Cmd<A, R extends z.ZodType> = { args: A; reply: R };
type NoArgs = undefined;

/** Every typed command: its arguments and the zod schema of its reply. */
export interface QmpCommands {
  'qmp_capabilities': Cmd<{ enable?: string[] }, typeof empty>;
  'query-status': Cmd<NoArgs, typeof statusInfoSchema>;
  'query-version': Cmd<NoArgs, typeof versionInfoSchema>;
  'query-block': Cmd<NoArgs, z.ZodArray<typeof blockInfoSchema>>;
  'query-named-block-nodes': Cmd<{ flat?: boolean }, z.ZodArray<typeof blockDeviceInfoSchema>>;
  'blockdev-add': Cmd<BlockdevOptions, typeof empty>;
  'blockdev-del': Cmd<{ 'node-name': string }, typeof empty>;
  'blockdev-create': Cmd<{ 'job-id': string; options: { driver: string; [option: string]: unknown } }, typeof empty>;
  'job-dismiss': Cmd<{ id: string }, typeof empty>;
  'job-cancel': Cmd<{ id: string }, typeof empty>;
  'job-complete': Cmd<{ id: string }, typeof empty>;
  'job-finalize': Cmd<{ id: string }, typeof empty>;
  'query-jobs': Cmd<NoArgs, z.ZodArray<typeof jobInfoSchema>>;
  'blockdev-mirror': Cmd<BlockdevMirrorArgs, typeof empty>;
  'block-stream': Cmd<BlockStreamArgs, typeof empty>;
  'block-job-cancel': Cmd<{ device: string; force?: boolean }, typeof empty>;
  'block-job-complete': Cmd<{ device: string }, typeof empty>;
  'block-job-set-speed': Cmd<{ device: string; speed: number }, typeof empty>;
  'query-block-jobs': Cmd<NoArgs, z.ZodArray<typeof blockJobInfoSchema>>;
  'nbd-server-start': Cmd<NbdServerStartArgs, typeof empty>;
  'nbd-server-stop': Cmd<NoArgs, typeof empty>;
  'block-export-add': Cmd<BlockExportAddNbdArgs, typeof empty>;
  'block-export-del': Cmd<{ id: string; mode?: 'safe' | 'hard' }, typeof empty>;
  'query-block-exports': Cmd<NoArgs, z.ZodArray<typeof blockExportInfoSchema>>;
  'block-dirty-bitmap-add': Cmd<{ node: string; name: string; granularity?: number; persistent?: boolean; disabled?: boolean }, typeof empty>;
  'block-dirty-bitmap-remove': Cmd<{ node: string; name: string }, typeof empty>;
  'migrate': Cmd<MigrateArgs, typeof empty>;
  'migrate-incoming': Cmd<{ uri: string }, typeof empty>;
  'migrate-set-capabilities': Cmd<{ capabilities: MigrationCapabilityStatus[] }, typeof empty>;
  'migrate-set-parameters': Cmd<MigrateSetParametersArgs, typeof empty>;
  'query-migrate': Cmd<NoArgs, typeof queryMigrateReturnSchema>;
  'query-migrate-capabilities': Cmd<NoArgs, z.ZodArray<typeof migrationCapabilityStatusSchema>>;
  'query-migrate-parameters': Cmd<NoArgs, typeof migrationParametersSchema>;
  'migrate-continue': Cmd<{ state: z.infer<typeof migrationStatusSchema> }, typeof empty>;
  'migrate_cancel': Cmd<NoArgs, typeof empty>;
  'cont': Cmd<NoArgs, typeof empty>;
  'stop': Cmd<NoArgs, typeof empty>;
  'quit': Cmd<NoArgs, typeof empty>;
  'system_powerdown': Cmd<NoArgs, typeof empty>;
  'query-qmp-schema': Cmd<NoArgs, z.ZodArray<typeof schemaInfoSchema>>;
}

export type QmpCommandName = keyof QmpCommands;
export type ArgumentsOf<C extends QmpCommandName> = QmpCommands[C]['args'];
export type ReturnOf<C extends QmpCommandName> = z.infer<QmpCommands[C]['reply']>;

/** Per-call options. Every call has a deadline; the default is 30 s. */
export interface CallOptions {
  timeoutMs?: number;
  signal?: AbortSignal;
}

/**
 * The rest parameters of execute(C): none, `undefined`, or the arguments, then CallOptions.
 * Arguments are required when the command has a required argument.
 */
export type ArgsOf<C extends QmpCommandName> = [ArgumentsOf<C>] extends [undefined]
  ? [args?: undefined, opts?: CallOptions]
  : {} extends ArgumentsOf<C>
    ? [args?: ArgumentsOf<C>, opts?: CallOptions]
    : [args: ArgumentsOf<C>, opts?: CallOptions];

const list = <T extends z.ZodType>(t: T): z.ZodArray<T> => z.array(t);

export const replySchemas: { [C in QmpCommandName]: QmpCommands[C]['reply'] } = {
  'qmp_capabilities': empty,
  'query-status': statusInfoSchema,
  'query-version': versionInfoSchema,
  'query-block': list(blockInfoSchema),
  'query-named-block-nodes': list(blockDeviceInfoSchema),
  'blockdev-add': empty,
  'blockdev-del': empty,
  'blockdev-create': empty,
  'job-dismiss': empty,
  'job-cancel': empty,
  'job-complete': empty,
  'job-finalize': empty,
  'query-jobs': list(jobInfoSchema),
  'blockdev-mirror': empty,
  'block-stream': empty,
  'block-job-cancel': empty,
  'block-job-complete': empty,
  'block-job-set-speed': empty,
  'query-block-jobs': list(blockJobInfoSchema),
  'nbd-server-start': empty,
  'nbd-server-stop': empty,
  'block-export-add': empty,
  'block-export-del': empty,
  'query-block-exports': list(blockExportInfoSchema),
  'block-dirty-bitmap-add': empty,
  'block-dirty-bitmap-remove': empty,
  'migrate': empty,
  'migrate-incoming': empty,
  'migrate-set-capabilities': empty,
  'migrate-set-parameters': empty,
  'query-migrate': queryMigrateReturnSchema,
  'query-migrate-capabilities': list(migrationCapabilityStatusSchema),
  'query-migrate-parameters': migrationParametersSchema,
  'migrate-continue': empty,
  'migrate_cancel': empty,
  'cont': empty,
  'stop': empty,
  'quit': empty,
  'system_powerdown': empty,
  'query-qmp-schema': list(schemaInfoSchema),
};
