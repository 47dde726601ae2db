/**
 * Confinement of the paths a caller names: every disk and run dir inside the storage root,
 * kernels and initrds inside it or a boot root, and no symbolic link anywhere below a root.
 *
 * Resolving a path that does not exist yet from its parent lets a dangling symlink lead out of
 * the root, so nothing is resolved here: each component below the root is lstat'ed, and a link
 * refuses the path. The check runs at the door and again at use (start, create, delete), so a
 * link swapped in after the first check is refused at the second. What is left between the
 * second check and QEMU's or qemu-img's open is the window of a local user who can write into
 * the storage root: the threat model (docs/agent.md) trusts the host's own users.
 */
import { lstatSync, realpathSync } from 'node:fs';
import { join, relative, resolve, sep } from 'node:path';
import { AgentError } from './errors.js';

/** `child` is `parent` or below it (both resolved). */
export function within(child: string, parent: string): boolean {
  return child === parent || child.startsWith(parent.endsWith(sep) ? parent : parent + sep);
}

/**
 * The path, resolved onto the real location of the root that holds it; refused (PATH_REFUSED,
 * naming `field`) when it is no root's strict descendant or crosses a symbolic link below it.
 */
export function confinedPath(p: string, roots: readonly string[], field: string): string {
  const abs = resolve(p);
  for (const root of roots) {
    const lexical = resolve(root);
    let real: string;
    try {
      real = realpathSync(root);
    } catch {
      continue;
    }
    const base = within(abs, lexical) ? lexical : within(abs, real) ? real : undefined;
    if (base === undefined) continue;
    const rel = relative(base, abs);
    if (rel === '') throw new AgentError('PATH_REFUSED', `${field}: ${p} is the root itself, not a path inside it`, { userError: true, context: { field } });
    const parts = rel.split(sep);
    let cur = real;
    for (const [i, part] of parts.entries()) {
      cur = join(cur, part);
      let st;
      try {
        st = lstatSync(cur);
      } catch {
        break; // the rest does not exist yet: nothing there to follow
      }
      if (st.isSymbolicLink()) {
        throw new AgentError('PATH_REFUSED', `${field}: ${p} goes through a symbolic link (${cur}); the agent follows none inside its roots`, { userError: true, context: { field } });
      }
      if (i < parts.length - 1 && !st.isDirectory()) {
        throw new AgentError('PATH_REFUSED', `${field}: ${p}: ${cur} is not a folder`, { userError: true, context: { field } });
      }
    }
    return join(real, rel);
  }
  throw new AgentError('PATH_REFUSED', `${field}: ${p} is outside the allowed roots (${roots.join(', ')})`, { userError: true, context: { field } });
}
