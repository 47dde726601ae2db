// What every bin does: run ferry's compiled JavaScript from dist/ when it was built from the
// sources as they are now, else the TypeScript sources through tsx (slow to start, ~0.5 s, but
// never stale). A git checkout someone edits thus never runs old code: any file or folder under
// src/ (an edit, a new file, a deleted one: its folder's mtime changes) or a tsconfig newer than
// the build's start makes dist/ stale until `npm run build` (or the set-up) builds it again.
//
// Plain Node with no packages: scripts/bootstrap.mjs imports distIsFresh() before `npm ci`.
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
/** Written by scripts/build.mjs after a clean build: the time (ms since the epoch) it started. */
export const stampPath = (root = repoRoot) => join(root, 'dist', '.build-stamp');
/** Files outside src/ whose change changes what the build writes. */
const inputs = ['tsconfig.json', 'tsconfig.build.json'];

/** The newest mtime (ms) of src/, every file and folder below it, and the tsconfigs. */
export function newestInputMtime(root = repoRoot) {
  let newest = 0;
  const walk = (dir) => {
    newest = Math.max(newest, statSync(dir).mtimeMs);
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else newest = Math.max(newest, statSync(p).mtimeMs);
    }
  };
  walk(join(root, 'src'));
  for (const f of inputs) newest = Math.max(newest, statSync(join(root, f)).mtimeMs);
  return newest;
}

/** True when dist/ holds a complete build that started after the last change to its inputs. */
export function distIsFresh(root = repoRoot) {
  let started;
  try {
    started = Number(readFileSync(stampPath(root), 'utf8'));
  } catch {
    return false;
  }
  // A file written in the very millisecond the build started may or may not be in it.
  return Number.isFinite(started) && newestInputMtime(root) < started;
}

/**
 * Runs `main(argv)` of the module at src/<entry>.ts (dist/<entry>.js when fresh) and exits with
 * its code: the QMP, serial and WebSocket connections would otherwise keep the event loop alive.
 */
export async function launch(entry) {
  let mod;
  // FERRY_FROM_SOURCE=1 forces the sources, e.g. to compare the two or to debug with tsx.
  if (process.env.FERRY_FROM_SOURCE !== '1' && distIsFresh()) {
    mod = await import(pathToFileURL(join(repoRoot, 'dist', `${entry}.js`)).href);
  } else {
    const { register } = await import('tsx/esm/api');
    register();
    mod = await import(pathToFileURL(join(repoRoot, 'src', `${entry}.ts`)).href);
  }
  process.exit(await mod.main(process.argv.slice(2)));
}
