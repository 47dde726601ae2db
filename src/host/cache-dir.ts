/** Where ferry keeps what it remembers between runs of migrate-vm (a QEMU build's schema, a binary's probe). */
import { randomBytes } from 'node:crypto';
import { mkdir, open, rename, rm } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { errorText } from '../errors.js';
import type { Logger } from '../log.js';

/** `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry` (the XDG base directory spec's default). */
export function ferryCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env['XDG_CACHE_HOME'];
  // The spec: a relative path in the variable is invalid and is ignored.
  const base = xdg !== undefined && xdg.startsWith('/') ? xdg : join(homedir(), '.cache');
  return join(base, 'ferry');
}

/**
 * One entry's JSON, read back; undefined when it is absent, unreadable or not JSON, or is not to
 * be trusted: a file another user owns, or one others may write (it would answer for QEMU).
 * `what` names the cache in the warnings.
 */
export async function readCacheEntry(file: string, what: string, log: Logger): Promise<{ raw: unknown } | undefined> {
  let text: string;
  try {
    const fh = await open(file, 'r');
    try {
      const st = await fh.stat();
      const uid = process.getuid?.();
      if ((uid !== undefined && st.uid !== uid) || (st.mode & 0o022) !== 0) {
        log.warn({ file }, `${what} entry not owned by this user or writable by others; ignored`);
        return undefined;
      }
      text = await fh.readFile('utf8');
    } finally {
      await fh.close();
    }
  } catch (err) {
    if (!(err instanceof Error && 'code' in err && err.code === 'ENOENT')) log.warn({ file, err: errorText(err) }, `cannot read the ${what}; probing`);
    return undefined;
  }
  try {
    return { raw: JSON.parse(text) };
  } catch {
    log.warn({ file }, `${what} entry is not JSON; ignored, probing`);
    return undefined;
  }
}

/**
 * Writes an entry under a temporary name and renames it into place, so a reader sees the old
 * entry or the new one, never half of one; the folder is 0700, the file 0600. A failure is only
 * a warning: the next run probes again.
 */
export async function writeCacheEntry(dir: string, file: string, body: unknown, what: string, log: Logger): Promise<void> {
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    // 'wx': never through a file (or a symlink) someone put at the temporary name.
    const fh = await open(tmp, 'wx', 0o600);
    try {
      await fh.writeFile(JSON.stringify(body), 'utf8');
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    log.warn({ file, err: errorText(err) }, `cannot write the ${what}; the next run probes again`);
    await rm(tmp, { force: true }).catch(() => undefined);
  }
}
