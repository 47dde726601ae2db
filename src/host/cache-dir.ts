/** Where ferry keeps what it remembers between runs of migrate-vm (a QEMU build's schema, a binary's probe). */
import { homedir } from 'node:os';
import { join } from 'node:path';

/** `$XDG_CACHE_HOME/ferry`, else `~/.cache/ferry` (the XDG base directory spec's default). */
export function ferryCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env['XDG_CACHE_HOME'];
  // The spec: a relative path in the variable is invalid and is ignored.
  const base = xdg !== undefined && xdg.startsWith('/') ? xdg : join(homedir(), '.cache');
  return join(base, 'ferry');
}
