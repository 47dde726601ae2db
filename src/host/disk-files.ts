/**
 * Disk image files on this host: what a destination creates and removes, and what a source's
 * images really hold. Host-level, no QEMU process involved: the engine's local endpoint and the
 * agent (through it) use the same functions. Every qemu-img run has a deadline and a signal.
 */
import { execFile } from 'node:child_process';
import { constants, statSync } from 'node:fs';
import { access, mkdir, open, rmdir, stat, statfs, unlink } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { promisify } from 'node:util';
import { z } from 'zod';
import { FerryError } from '../errors.js';

const run = promisify(execFile);
const QEMU_IMG_TIMEOUT_MS = 30_000;

export class DiskFileError extends FerryError {
  override name = 'DiskFileError';
}

export async function pathExists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/** Why `dir` cannot hold new disks, or undefined when it can. */
export async function unusableDir(dir: string): Promise<string | undefined> {
  try {
    const st = await stat(dir);
    if (!st.isDirectory()) return `destination ${dir} is not a directory`;
    await access(dir, constants.W_OK);
    return undefined;
  } catch (err) {
    const code = err instanceof Error && 'code' in err ? String(err.code) : 'unknown';
    return `destination folder ${dir} is not usable (${code === 'ENOENT' ? 'does not exist' : code === 'EACCES' ? 'not writable' : code})`;
  }
}

export async function freeBytesAt(dir: string): Promise<number> {
  const s = await statfs(dir);
  return s.bavail * s.bsize;
}

/**
 * A new sparse image: raw is a hole-only file, qcow2 has no preallocation, so only what is written
 * lands. With `backingFilename` a qcow2 overlay on it (-u: the backing need not be reachable now).
 * Refuses to overwrite.
 */
export async function createImage(disk: { path: string; format: 'qcow2' | 'raw'; virtualSize: number; backingFilename?: string; backingFormat?: string }, signal?: AbortSignal): Promise<void> {
  await mkdir(dirname(disk.path), { recursive: true });
  // The file is made here, exclusively and without following a link (a dangling one included),
  // before qemu-img writes into it: ferry never overwrites a disk, nor creates one elsewhere.
  try {
    await (await open(disk.path, constants.O_CREAT | constants.O_EXCL | constants.O_WRONLY | constants.O_NOFOLLOW, 0o600)).close();
  } catch (err) {
    const code = err instanceof Error && 'code' in err ? err.code : undefined;
    if (code === 'EEXIST' || code === 'ELOOP') throw new DiskFileError('DISK_EXISTS', `refusing to overwrite ${disk.path}${code === 'ELOOP' ? ' (a symbolic link)' : ''}`, { userError: true });
    throw err;
  }
  const backing = disk.backingFilename ? ['-u', '-b', disk.backingFilename, '-F', disk.backingFormat ?? 'raw'] : [];
  try {
    await run('qemu-img', ['create', '-q', '-f', disk.format, ...backing, disk.path, String(disk.virtualSize)], { timeout: QEMU_IMG_TIMEOUT_MS, ...(signal ? { signal } : {}) });
  } catch (err) {
    await unlink(disk.path).catch(() => undefined);
    throw err;
  }
}

/** Removes an image (gone already is fine), and its folder once empty if it is below `root`, never `root` itself. */
export async function removeImage(path: string, root: string): Promise<void> {
  await unlink(path).catch((err: unknown) => {
    if (!(err instanceof Error && 'code' in err && err.code === 'ENOENT')) throw err;
  });
  await removeEmptyParent(path, root);
}

export async function removeEmptyParent(path: string, root: string): Promise<void> {
  const parent = resolve(dirname(path));
  if (parent !== resolve(root) && parent.startsWith(resolve(root) + '/')) await rmdir(parent).catch(() => undefined);
}

const mapSchema = z.array(z.object({ start: z.number(), length: z.number().nonnegative(), data: z.boolean() }));

/**
 * Bytes of guest data an image holds, through its whole backing chain: what a copy into a fresh
 * image writes. Unlike qcow2's `actual-size`, a compressed image counts what it decompresses to,
 * and a backing file counts too. -U: the image may be open in a running QEMU.
 */
export async function dataBytes(path: string, format: string, signal?: AbortSignal): Promise<number> {
  const { stdout } = await run('qemu-img', ['map', '-U', '--output=json', '-f', format, path], { timeout: QEMU_IMG_TIMEOUT_MS, maxBuffer: 256 << 20, ...(signal ? { signal } : {}) });
  return mapSchema.parse(JSON.parse(stdout)).reduce((sum, e) => sum + (e.data ? e.length : 0), 0);
}

/** Bytes a file occupies on disk (allocated, not its size); 0 when it is not there. */
export function allocatedBytes(path: string): number {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return 0;
  }
}
