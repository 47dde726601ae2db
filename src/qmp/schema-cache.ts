/**
 * A QEMU build's QMP schema, remembered (issue 11: lazy mode's time to destination running).
 *
 * `query-qmp-schema` is the slowest answer of a session (tens of ms under TCG, ~190 KB of JSON),
 * and what it says is fixed by the binary: the same build always answers the same. A build is
 * named by its greeting's version triple and its `package` string (Debian's
 * "Debian 1:7.2+dfsg-7+deb12u18+b3"); a QEMU built by hand reports an empty package, and two such
 * builds of one version may differ, so those are never remembered: each session probes.
 *
 * A remembered schema is still that build's own answer, never an assumption about what a version
 * offers. An entry that is unreadable, malformed, or names another build is ignored (and replaced
 * by the next probe): the cache can make a session faster, never wrong or failed.
 *
 * One cache per process (processSchemaCache), chosen by its entry point: the long-lived scheduler
 * and agents keep schemas in memory; migrate-vm, one process per migration, on disk behind a
 * memory layer. Without an entry point's choice (a library user, the tests' fakes, whose
 * transcripts share one greeting but not one schema) nothing is remembered. A connect may name
 * its own cache.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { z } from 'zod';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { readCacheEntry, writeCacheEntry } from '../host/cache-dir.js';
import { schemaInfoSchema, type SchemaInfo, type VersionInfo } from './commands.js';

export interface SchemaCache {
  /** Whether this build could be remembered here at all; when not, the session probes at once. */
  remembers(build: VersionInfo): boolean;
  /** The schema this exact build answered before; undefined on a miss (or a build never cached). */
  get(build: VersionInfo): Promise<readonly SchemaInfo[] | undefined>;
  /** Remembers what the build answered. Never rejects: a cache that cannot write is only slower. */
  put(build: VersionInfo, schema: readonly SchemaInfo[]): Promise<void>;
}

/** The build's name as a cache key; undefined when QEMU reports no package (a build of unknown origin). */
export function schemaCacheKey(build: VersionInfo): string | undefined {
  const pkg = build.package.trim();
  if (pkg === '') return undefined;
  const { major, minor, micro } = build.qemu;
  return `${major}.${minor}.${micro} ${pkg}`;
}

export function memorySchemaCache(): SchemaCache {
  const entries = new Map<string, readonly SchemaInfo[]>();
  return {
    remembers: (build) => schemaCacheKey(build) !== undefined,
    get: (build) => {
      const key = schemaCacheKey(build);
      return Promise.resolve(key === undefined ? undefined : entries.get(key));
    },
    put: (build, schema) => {
      const key = schemaCacheKey(build);
      if (key !== undefined) entries.set(key, schema);
      return Promise.resolve();
    },
  };
}

const FILE_FORMAT = 1;
const fileSchema = z.object({
  format: z.literal(FILE_FORMAT),
  qemu: z.object({ major: z.number(), minor: z.number(), micro: z.number() }),
  package: z.string(),
  schema: z.array(schemaInfoSchema),
});

/** One file per build; the package string is hashed into the name (it holds ':', '+', spaces). */
export function schemaCacheFile(dir: string, build: VersionInfo): string | undefined {
  const key = schemaCacheKey(build);
  if (key === undefined) return undefined;
  const { major, minor, micro } = build.qemu;
  const hash = createHash('sha256').update(key).digest('hex').slice(0, 16);
  return join(dir, `qmp-schema-${major}.${minor}.${micro}-${hash}.json`);
}

/**
 * Files under `dir` (made 0700), each 0600 and written whole under a temporary name then renamed,
 * so a reader sees an old entry or a new one, never half of one. Read back through zod; a file
 * another user owns or can write is not trusted and is ignored.
 */
export function diskSchemaCache(dir: string, opts: { logger?: Logger } = {}): SchemaCache {
  const log = opts.logger ?? silentLogger;
  return {
    remembers: (build) => schemaCacheKey(build) !== undefined,
    async get(build) {
      const file = schemaCacheFile(dir, build);
      if (file === undefined) return undefined;
      const entry = await readCacheEntry(file, 'QMP schema cache', log);
      if (!entry) return undefined;
      const parsed = fileSchema.safeParse(entry.raw);
      if (!parsed.success) {
        log.warn({ file }, 'QMP schema cache entry is malformed; ignored, probing');
        return undefined;
      }
      const e = parsed.data;
      // The name is a hash: the entry must say it is this build's, field for field.
      if (e.qemu.major !== build.qemu.major || e.qemu.minor !== build.qemu.minor || e.qemu.micro !== build.qemu.micro || e.package !== build.package.trim()) {
        log.warn({ file, entry: `${e.qemu.major}.${e.qemu.minor}.${e.qemu.micro} ${e.package}` }, 'QMP schema cache entry names another build; ignored, probing');
        return undefined;
      }
      return e.schema;
    },
    async put(build, schema) {
      const file = schemaCacheFile(dir, build);
      if (file === undefined) return;
      await writeCacheEntry(dir, file, { format: FILE_FORMAT, qemu: build.qemu, package: build.package.trim(), schema }, 'QMP schema cache', log);
    },
  };
}

/** Memory in front of another cache: a second session of the same build in this process reads no file. */
export function layeredSchemaCache(behind: SchemaCache): SchemaCache {
  const front = memorySchemaCache();
  return {
    remembers: (build) => behind.remembers(build),
    async get(build) {
      const hit = await front.get(build);
      if (hit) return hit;
      const found = await behind.get(build);
      if (found) await front.put(build, found);
      return found;
    },
    async put(build, schema) {
      await front.put(build, schema);
      await behind.put(build, schema);
    },
  };
}

/** Remembers nothing: every session probes. */
export const noSchemaCache: SchemaCache = {
  remembers: () => false,
  get: () => Promise.resolve(undefined),
  put: () => Promise.resolve(),
};

let processCache: SchemaCache = noSchemaCache;

/** The cache every QMP session of this process uses unless its connect names another. */
export function processSchemaCache(): SchemaCache {
  return processCache;
}

/** Set once by an entry point (migrate-vm: the disk), before its first session. */
export function useSchemaCache(cache: SchemaCache): void {
  processCache = cache;
}
