/**
 * The standby's record of one replica, `<dir>/manifest.json`, written (temp file, then rename)
 * before the daemon acts on what it says. It is the truth about which point is consistent:
 *
 *   consistent: { seq, pointAt }   the sync whose start instant the chains hold
 *   disks[].chain                  the files of each disk's chain, base first; base + every
 *                                  overlay listed is that consistent point
 *   pending                        a sync in flight: its overlays are NOT in any chain until the
 *                                  source's backup jobs all completed and completeSync ran
 *
 * A crash anywhere leaves either the old chains or the new ones (rename is atomic), and an
 * overlay file no chain lists is discarded at the next start.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { ReplicaError } from './errors.js';

const diskSchema = z.object({
  id: z.string().regex(/^[a-z][a-z0-9-]{0,15}$/),
  virtualSize: z.number().int().positive(),
  /** Base first (seq 0), then the overlays of complete syncs not yet committed into it. */
  chain: z.array(z.object({ seq: z.number().int().nonnegative(), file: z.string().min(1) })).min(1),
});

const syncFigureSchema = z.object({ seq: z.number().int(), pointAt: z.number(), bytes: z.number(), durationMs: z.number() });

export const ManifestSchema = z
  .object({
    version: z.literal(1),
    vm: z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$/),
    state: z.enum(['active', 'released']),
    disks: z.array(diskSchema).min(1),
    consistent: z.object({ seq: z.number().int().positive(), pointAt: z.number() }).nullable(),
    pending: z.object({ seq: z.number().int().positive(), overlays: z.record(z.string(), z.string()) }).nullable(),
    daemon: z.object({ pid: z.number().int().positive(), pidStart: z.string(), port: z.number().int(), host: z.string() }).nullable(),
    /**
     * The NBD port the daemon serves on, kept while no daemon runs (a released replica): an owner
     * restarted meanwhile serves it again on the same port (without it: port 0, every sync refused).
     */
    port: z.number().int().positive().optional(),
    lastSync: syncFigureSchema.nullable(),
    /** Syncs that did not complete since the last one that did. */
    failedSyncs: z.number().int().nonnegative(),
  })
  .strict();
export type Manifest = z.infer<typeof ManifestSchema>;
export type SyncFigures = z.infer<typeof syncFigureSchema>;

export const manifestPath = (dir: string): string => join(dir, 'manifest.json');

export function readManifest(dir: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(manifestPath(dir), 'utf8'));
  } catch (err) {
    throw new ReplicaError('MANIFEST', `cannot read the replica manifest in ${dir}: ${(err as Error).message}`, { cause: err });
  }
  const parsed = ManifestSchema.safeParse(raw);
  if (!parsed.success) throw new ReplicaError('MANIFEST', `the replica manifest in ${dir} does not parse: ${parsed.error.issues[0]?.message ?? ''}`);
  return parsed.data;
}

export function writeManifest(dir: string, m: Manifest): void {
  const path = manifestPath(dir);
  writeFileSync(`${path}.tmp`, JSON.stringify(m, null, 2), { mode: 0o600 });
  renameSync(`${path}.tmp`, path);
}
