/**
 * What a QEMU binary is (probeQemuBinary's answer), remembered per exact file (issue 11: lazy
 * mode's time to destination running). The probe starts a QEMU with no machine: ~100-140 ms
 * under load, on the preflight's critical path for a local destination, for an answer that only
 * a new binary can change.
 *
 * A file is named by where PATH (or the absolute path) resolves it and by its inode's identity:
 * device, inode, size, mtime and ctime in nanoseconds. An upgrade writes a new file (a new inode)
 * or at least changes the ctime, which no one can set back; so a changed binary is probed again.
 * The answer is kept only when QEMU reported a package string (schema-cache.ts says why), and the
 * started destination's own greeting is checked against it (LocalDestination.startIncoming):
 * a remembered build that is not the one that started is refused before anything is copied, and
 * forgotten. That check is what covers a wrapper script (the bootstrap's QEMU 10.0 is one): its
 * file stays the same when the binary it runs is upgraded.
 *
 * On disk beside the schema cache (0600 files under a 0700 dir, written whole then renamed,
 * parsed by zod, anything odd ignored and probed again), or in memory.
 */
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import { access, rm, stat } from 'node:fs/promises';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import { z } from 'zod';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { readCacheEntry, writeCacheEntry } from '../host/cache-dir.js';
import type { QemuBuild } from './versions.js';

export interface QemuBuildCache {
  get(fileKey: string): Promise<QemuBuild | undefined>;
  /** Never rejects: a cache that cannot write is only slower. */
  put(fileKey: string, build: QemuBuild): Promise<void>;
  /** Drops an entry found wrong (the QEMU that started is not the build remembered); never rejects. */
  forget(fileKey: string): Promise<void>;
}

/** The binary's file, found the way spawn finds it: a path as given, else the first match on PATH. */
export async function resolveBinary(binary: string, env: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  if (binary.includes('/')) return isAbsolute(binary) ? binary : resolve(binary);
  for (const dir of (env['PATH'] ?? '').split(delimiter)) {
    if (dir === '') continue;
    const candidate = join(dir, binary);
    try {
      await access(candidate, constants.X_OK);
      return candidate;
    } catch {
      // Not here; the next directory.
    }
  }
  return undefined;
}

/** The file's identity, or undefined when it cannot be read (then the probe says why). */
export async function binaryFileKey(binary: string, env: NodeJS.ProcessEnv = process.env): Promise<string | undefined> {
  const path = await resolveBinary(binary, env);
  if (path === undefined) return undefined;
  const st = await stat(path, { bigint: true }).catch(() => undefined);
  if (!st?.isFile()) return undefined;
  return `${path} dev=${st.dev} ino=${st.ino} size=${st.size} mtime=${st.mtimeNs} ctime=${st.ctimeNs}`;
}

const buildSchema = z.object({
  version: z.object({ major: z.number(), minor: z.number(), micro: z.number() }),
  package: z.string(),
  machines: z.array(z.looseObject({ name: z.string(), alias: z.string().optional(), 'is-default': z.boolean().optional(), deprecated: z.boolean().optional() })),
});
const FILE_FORMAT = 1;
const fileSchema = z.object({ format: z.literal(FILE_FORMAT), fileKey: z.string(), build: buildSchema });

export function memoryQemuBuildCache(): QemuBuildCache {
  const entries = new Map<string, QemuBuild>();
  return {
    get: (key) => Promise.resolve(entries.get(key)),
    put: (key, build) => {
      if (build.package.trim() !== '') entries.set(key, build);
      return Promise.resolve();
    },
    forget: (key) => {
      entries.delete(key);
      return Promise.resolve();
    },
  };
}

export function diskQemuBuildCache(dir: string, opts: { logger?: Logger } = {}): QemuBuildCache {
  const log = opts.logger ?? silentLogger;
  const fileOf = (key: string): string => join(dir, `qemu-build-${createHash('sha256').update(key).digest('hex').slice(0, 16)}.json`);
  const front = memoryQemuBuildCache();
  return {
    async get(key) {
      const hit = await front.get(key);
      if (hit) return hit;
      const file = fileOf(key);
      const entry = await readCacheEntry(file, 'QEMU build cache', log);
      if (!entry) return undefined;
      const parsed = fileSchema.safeParse(entry.raw);
      // The name is a hash: the entry must name this very file, or it answers for another.
      if (!parsed.success || parsed.data.fileKey !== key || parsed.data.build.package.trim() === '') {
        log.warn({ file }, 'QEMU build cache entry is malformed or names another binary; ignored, probing');
        return undefined;
      }
      await front.put(key, parsed.data.build);
      return parsed.data.build;
    },
    async put(key, build) {
      if (build.package.trim() === '') return;
      await front.put(key, build);
      await writeCacheEntry(dir, fileOf(key), { format: FILE_FORMAT, fileKey: key, build }, 'QEMU build cache', log);
    },
    async forget(key) {
      await front.forget(key);
      await rm(fileOf(key), { force: true }).catch((err: unknown) => log.warn({ err: errorText(err) }, 'cannot remove a wrong QEMU build cache entry'));
    },
  };
}

/**
 * probeQemuBinary through a cache: the file's identity is read first, the probe runs only when
 * it is not known; what the probe answered is kept under the identity read before it ran.
 */
export async function probeQemuBinaryCached(
  binary: string,
  cache: QemuBuildCache | undefined,
  probe: (binary: string) => Promise<QemuBuild>,
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ build: QemuBuild; remembered: false } | { build: QemuBuild; remembered: true; fileKey: string }> {
  const key = cache ? await binaryFileKey(binary, env) : undefined;
  if (cache && key !== undefined) {
    const hit = await cache.get(key).catch(() => undefined);
    if (hit) return { build: hit, remembered: true, fileKey: key };
  }
  const build = await probe(binary);
  if (cache && key !== undefined) await cache.put(key, build).catch(() => undefined);
  return { build, remembered: false };
}
