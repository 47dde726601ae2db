#!/usr/bin/env node
// `npm run build`: compiles src/ into dist/ (tsconfig.build.json), so the bins start without
// compiling TypeScript. dist/ is wiped first (a deleted source leaves no module behind), and the
// stamp that tells the bins dist/ is usable (bin/launch.mjs) is written last, holding the time the
// build started: a source saved while tsc ran is newer than the stamp, so the bins will not trust
// a dist/ that may lack it. A build that fails writes no stamp; the bins then run the sources.
import { spawnSync } from 'node:child_process';
import { mkdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { repoRoot, stampPath } from '../bin/launch.mjs';

const started = Date.now();
const dist = join(repoRoot, 'dist');
rmSync(stampPath(), { force: true });
rmSync(dist, { recursive: true, force: true });
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
const r = spawnSync(process.execPath, [tsc, '-p', join(repoRoot, 'tsconfig.build.json')], { stdio: 'inherit', cwd: repoRoot });
if (r.error) throw r.error;
if (r.status !== 0) {
  process.stderr.write(`build: tsc exited ${r.status ?? r.signal}; no dist/ stamp written, the bins run the TypeScript sources\n`);
  process.exit(1);
}
mkdirSync(dist, { recursive: true });
const tmp = `${stampPath()}.${process.pid}`;
writeFileSync(tmp, String(started));
renameSync(tmp, stampPath());
process.stderr.write(`build: dist/ built in ${((Date.now() - started) / 1000).toFixed(1)} s\n`);
