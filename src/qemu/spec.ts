import { realpathSync } from 'node:fs';
import { access, constants } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve, sep } from 'node:path';
import { z } from 'zod';
import { FerryError } from '../errors.js';

/** A spec that cannot describe a VM that works. `context.field` names the offending field. */
export class SpecError extends FerryError {
  override name = 'SpecError';
  readonly field: string;
  constructor(field: string, message: string) {
    super('SPEC_INVALID', `invalid VM spec: ${field}: ${message}`, { userError: true, context: { field } });
    this.field = field;
  }
}

/** Normalised lexically (`..`, `.`, `//` and a trailing `/` go), so one file has one spelling. */
const absolutePath = z
  .string()
  .min(1)
  .refine(isAbsolute, 'must be an absolute path')
  .transform((p) => resolve(p));

const diskSchema = z
  .object({
    id: z.string().regex(/^[a-z][a-z0-9-]{0,15}$/, 'must match ^[a-z][a-z0-9-]{0,15}$ (it becomes the virtio serial)'),
    path: absolutePath,
    format: z.enum(['qcow2', 'raw']),
    virtualSize: z
      .number()
      .int()
      .positive()
      .refine((n) => n % 512 === 0, 'must be a multiple of 512')
      .optional(),
    cache: z.enum(['none', 'writeback', 'writethrough', 'directsync', 'unsafe']).default('none'),
    discard: z.boolean().default(false),
  })
  .strict();

const bootSchema = z.union([
  z.object({ kernel: absolutePath, initrd: absolutePath.optional(), append: z.string().max(4096).optional() }).strict(),
  z.object({ disk: z.string() }).strict(),
]);

export const VmSpecSchema = z
  .object({
    name: z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$/, 'must be 1-63 characters of letters, digits, _ . -'),
    memoryMiB: z.number().int().min(16, 'must be at least 16 MiB').max(1_048_576, 'must be at most 1 TiB'),
    vcpus: z.number().int().min(1).max(256).default(1),
    machine: z.string().regex(/^[a-z0-9.-]+$/).default('q35'),
    accel: z.enum(['tcg', 'kvm']).default('tcg'),
    disks: z.array(diskSchema).min(1, 'a VM needs at least one disk').max(16),
    boot: bootSchema,
    runDir: absolutePath,
    /** Appended to QEMU's argv verbatim. Discouraged: a migration needs both sides to agree. */
    extraArgs: z.array(z.string()).default([]),
  })
  .strict();

export type VmSpec = z.infer<typeof VmSpecSchema>;
export type VmSpecInput = z.input<typeof VmSpecSchema>;
export type DiskSpec = VmSpec['disks'][number];

/** Stable names derived from a disk id: source and destination match device for device. */
export const fileNodeName = (id: string): string => `file-${id}`;
export const DISK_NODE_PREFIX = 'disk-';
export const diskNodeName = (id: string): string => `${DISK_NODE_PREFIX}${id}`;
export const deviceId = (id: string): string => `dev-${id}`;

export function parseVmSpec(input: unknown, opts: { allowedRoots?: string[] } = {}): VmSpec {
  const r = VmSpecSchema.safeParse(input);
  if (!r.success) {
    const issue = r.error.issues[0]!;
    throw new SpecError(issue.path.join('.') || '(root)', issue.message);
  }
  const spec = r.data;
  const seen = new Set<string>();
  for (const [i, d] of spec.disks.entries()) {
    if (seen.has(d.id)) throw new SpecError(`disks.${i}.id`, `duplicate disk id '${d.id}'`);
    seen.add(d.id);
  }
  if ('disk' in spec.boot && !seen.has(spec.boot.disk)) {
    throw new SpecError('boot.disk', `'${spec.boot.disk}' is not one of the disk ids (${[...seen].join(', ')})`);
  }
  if (opts.allowedRoots) {
    const roots = opts.allowedRoots.map(canonicalPath);
    const check = (field: string, p: string): void => {
      const c = canonicalPath(p);
      if (!roots.some((root) => c === root || c.startsWith(root.endsWith(sep) ? root : root + sep))) {
        throw new SpecError(field, `${p} is outside the allowed roots (${opts.allowedRoots!.join(', ')})`);
      }
    };
    spec.disks.forEach((d, i) => check(`disks.${i}.path`, d.path));
    check('runDir', spec.runDir);
  }
  return spec;
}

/**
 * The real location of a path that may not exist yet: `..` resolved, and symlinks resolved in
 * the longest existing prefix, so a link that leads out of a root is seen for what it is.
 */
export function canonicalPath(p: string): string {
  let head = resolve(p);
  const tail: string[] = [];
  for (;;) {
    try {
      return join(realpathSync(head), ...tail);
    } catch {
      const parent = dirname(head);
      if (parent === head) return resolve(p);
      tail.unshift(basename(head));
      head = parent;
    }
  }
}

/** Files a launch needs must exist and be readable; the error names the field. */
export async function checkSpecFiles(spec: VmSpec): Promise<void> {
  const need = async (field: string, p: string, mode: number): Promise<void> => {
    try {
      await access(p, mode);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new SpecError(field, `${p} ${code === 'ENOENT' ? 'does not exist' : `is not accessible (${code})`}`);
    }
  };
  if ('kernel' in spec.boot) {
    await need('boot.kernel', spec.boot.kernel, constants.R_OK);
    if (spec.boot.initrd) await need('boot.initrd', spec.boot.initrd, constants.R_OK);
  }
  for (const [i, d] of spec.disks.entries()) await need(`disks.${i}.path`, d.path, constants.R_OK | constants.W_OK);
}

/** The same VM with its disks in `dir` (same file names) and another run dir: the destination. */
export function retargetSpec(spec: VmSpec, to: { dir: string; runDir: string }): VmSpec {
  return {
    ...spec,
    disks: spec.disks.map((d) => ({ ...d, path: join(to.dir, basename(d.path)) })),
    runDir: to.runDir,
  };
}
