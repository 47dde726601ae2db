#!/usr/bin/env node
// Installs what ferry needs on a fresh Debian 12 machine. Plain Node with no packages, because it
// runs before `npm ci` has put anything in node_modules.
//
//   node scripts/bootstrap.mjs           Debian packages, node_modules, dist/ (scripts/build.mjs)
//   node scripts/bootstrap.mjs --image   the same, then the tiny guest image (images/build.mjs)
//   ... --qemu10                         also Debian backports' QEMU 10.0, unpacked into .cache/
//                                        (scripts/qemu10.mjs; FERRY_SKIP_QEMU10=1 skips it)
//   ... --browser                        also Debian's chromium, for the web view's browser test
//                                        (`npm test` passes it)
//
// Not root and something is missing: print the exact command to run, exit 1, change nothing.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { distIsFresh } from '../bin/launch.mjs';
import { ensureQemu10 } from './qemu10.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/** Debian packages ferry and its guest image need. */
// postgresql: the scheduler-replicas test makes its own throwaway cluster with its initdb and pg_ctl.
const packages = ['qemu-system-x86', 'qemu-utils', 'busybox-static', 'gcc', 'libc6-dev', 'iproute2', 'xz-utils', 'openssl', 'tcpdump', 'postgresql'];
/** --browser: the web view's test drives Debian's chromium headless (puppeteer-core). */
if (process.argv.includes('--browser')) packages.push('chromium');

function log(msg) {
  process.stderr.write(`bootstrap: ${msg}\n`);
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: root, ...opts });
  if (r.error) throw r.error;
  return r.status ?? 1;
}

function installed(name) {
  const r = spawnSync('dpkg-query', ['-W', '-f=${db:Status-Abbrev}', name], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.startsWith('ii');
}

function ensureDebianPackages() {
  const missing = packages.filter((name) => !installed(name));
  if (missing.length === 0) return;
  const install = `apt-get install -y --no-install-recommends ${missing.join(' ')}`;
  if (process.getuid?.() !== 0) {
    log(`missing Debian packages: ${missing.join(', ')}`);
    log(`run as root:  apt-get update && ${install}`);
    process.exit(1);
  }
  log(`installing ${missing.join(', ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const args = ['install', '-y', '-q', '--no-install-recommends', ...missing];
  if (run('apt-get', args, { env }) !== 0) {
    // A fresh machine may have empty or stale package lists.
    if (run('apt-get', ['update', '-q'], { env }) !== 0) fail('apt-get update failed');
    if (run('apt-get', args, { env }) !== 0) fail(`apt-get install ${missing.join(' ')} failed`);
  }
}

function ensureNodeModules() {
  const lock = join(root, 'package-lock.json');
  const marker = join(root, 'node_modules', '.package-lock.json');
  if (existsSync(marker) && (statSync(marker).mtimeMs >= statSync(lock).mtimeMs || installedAsLocked(lock, marker))) return;
  log('npm ci');
  if (run('npm', ['ci', '--no-audit', '--no-fund']) !== 0) fail('npm ci failed');
}

/**
 * A lock file newer than node_modules need not differ from it: a fresh git checkout or worktree
 * gives package-lock.json the checkout's time. npm's own record of what it installed
 * (node_modules/.package-lock.json) then decides, package by package, so that an unchanged lock
 * does not cost an `npm ci` (which, through a node_modules symlinked from another checkout, would
 * also empty that checkout's node_modules while it reinstalls).
 */
function installedAsLocked(lock, marker) {
  try {
    const want = JSON.parse(readFileSync(lock, 'utf8')).packages ?? {};
    const have = JSON.parse(readFileSync(marker, 'utf8')).packages ?? {};
    const installed = ([path, p]) => path === '' || (p.optional && !(path in have)) || have[path]?.version === p.version;
    return Object.entries(want).every(installed) && Object.keys(have).every((path) => path in want);
  } catch {
    return false;
  }
}

/** dist/ as the bins want it (bin/launch.mjs). A failed build leaves the bins on the sources. */
function ensureDist() {
  if (distIsFresh()) return;
  log('npm run build (dist/ is missing or older than src/)');
  if (run(process.execPath, [join(root, 'scripts', 'build.mjs')]) !== 0) log('WARNING: the build failed; the bins run the TypeScript sources through tsx');
}

function fail(msg) {
  log(msg);
  process.exit(1);
}

ensureDebianPackages();
ensureNodeModules();
ensureDist();
if (process.argv.includes('--qemu10') && process.env.FERRY_SKIP_QEMU10 !== '1') {
  try {
    ensureQemu10(root, log);
  } catch (err) {
    fail(`QEMU 10.0: ${err.message} (FERRY_SKIP_QEMU10=1 skips it; the 10.0 test leg then fails in CI)`);
  }
}
if (process.argv.includes('--image')) {
  if (run(process.execPath, [join(root, 'images', 'build.mjs')]) !== 0) fail('guest image build failed');
}
