// QEMU 10.0 from Debian 12's bookworm-backports, unpacked beside the system's QEMU for ferry's
// second test leg. Plain Node, no packages (the bootstrap runs it before node_modules exists).
//
// Nothing of the system changes: apt runs on a private sources list, private package lists and a
// private cache (-o Dir::...), `apt-get download` fetches the .debs without installing them, and
// `dpkg-deb -x` unpacks them into the repository's .cache/qemu-10.0/ (git-ignored, beside
// .cache/kernel: one checkout, one cache, gone with the checkout; a home-wide cache would be
// shared by checkouts of different ages and raced by concurrent bootstraps).
//
// The result is one executable: .cache/qemu-10.0/bin/qemu-system-x86_64, a wrapper that `exec`s
// the real binary (same PID) with -L for its own data (option ROMs, keymaps) and the backports
// SeaBIOS it depends on, and QEMU_MODULE_DIR set so it never loads the system 7.2's modules. It
// works wherever ferry takes a QEMU binary: FERRY_QEMU, LaunchOptions.qemuBinary, the agent's
// `qemuBinary`, LocalDestination's `qemuBinary`.
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** The unpacked tree's layout version: a change here re-fetches. */
const LAYOUT = 'ferry-qemu10-v2';
const SUITE = 'bookworm-backports';
/**
 * What the binary needs at run time besides Debian 12's own libraries (ldd finds every one):
 * the binary; qemu-system-common for the modules of the same build; qemu-system-data for the
 * option ROMs (linuxboot_dma.bin, kvmvapic.bin) and keymaps; seabios because this build depends
 * on seabios (>> 1.16.3-1~) and bookworm has 1.16.2. ipxe-qemu (unversioned dependency, only
 * for NIC option ROMs; ferry's VMs have no NIC) is the system's.
 */
export const QEMU10_PACKAGES = ['qemu-system-x86', 'qemu-system-common', 'qemu-system-data', 'seabios'];
const VERSION_RE = /^1:10\.0\.\d+\+/;

/** Where the wrapper lands; the tests and .ci/run look here. */
export function qemu10Paths(root) {
  const dir = join(root, '.cache', 'qemu-10.0');
  return { dir, wrapper: join(dir, 'bin', 'qemu-system-x86_64'), stamp: join(dir, '.complete') };
}

/**
 * Makes sure .cache/qemu-10.0 holds a working QEMU 10.0. Quick when it does (one stat and one
 * read). Returns the wrapper's path, or undefined when this is not a Debian 12 machine (the 10.0
 * leg then reports itself skipped). Throws with a message naming what failed otherwise.
 */
export function ensureQemu10(root, log) {
  const paths = qemu10Paths(root);
  if (existsSync(paths.stamp) && readFileSync(paths.stamp, 'utf8').split('\n')[0] === LAYOUT && existsSync(paths.wrapper)) return paths.wrapper;
  const codename = osCodename();
  if (codename !== 'bookworm') {
    log(`QEMU 10.0 not fetched: this is not Debian 12 (VERSION_CODENAME=${codename ?? 'unknown'}); the 10.0 test leg will be skipped`);
    return undefined;
  }
  const mirror = systemMirror(codename);
  const started = performance.now();
  // Built beside the final directory and renamed into place: a crash or a concurrent bootstrap
  // never leaves a half tree where the tests look.
  const work = `${paths.dir}.tmp-${process.pid}`;
  rmSync(work, { recursive: true, force: true });
  try {
    const apt = join(work, 'apt');
    for (const d of ['lists/partial', 'cache/archives/partial', 'debs']) mkdirSync(join(apt, d), { recursive: true });
    const sourcesList = join(apt, 'sources.list');
    const signedBy = mirror.signedBy ? ` [signed-by=${mirror.signedBy}]` : '';
    writeFileSync(sourcesList, `deb${signedBy} ${mirror.uri} ${SUITE} main\n`);
    const aptOpts = [
      '-o', `Dir::Etc::SourceList=${sourcesList}`,
      '-o', 'Dir::Etc::SourceParts=/dev/null',
      '-o', `Dir::State::Lists=${join(apt, 'lists')}`,
      '-o', `Dir::Cache=${join(apt, 'cache')}`,
      // The system's pins must not pick the versions: this list has one suite.
      '-o', 'Dir::Etc::Preferences=/dev/null',
      '-o', 'Dir::Etc::PreferencesParts=/dev/null',
      // As root apt drops to _apt for downloads, which cannot write a root-owned private dir.
      ...(process.getuid?.() === 0 ? ['-o', 'APT::Sandbox::User=root'] : []),
    ];
    log(`QEMU 10.0: apt-get update on a private list (${mirror.uri} ${SUITE}, from ${mirror.from})`);
    sh('apt-get', [...aptOpts, 'update', '-q']);
    const versions = QEMU10_PACKAGES.map((pkg) => {
      const v = candidate(aptOpts, pkg);
      if (!v) throw new Error(`${SUITE} at ${mirror.uri} has no ${pkg}`);
      return `${pkg}=${v}`;
    });
    const qemuVersion = versions[0].split('=')[1];
    if (!VERSION_RE.test(qemuVersion)) throw new Error(`${SUITE} has qemu-system-x86 ${qemuVersion}, not 10.0.x`);
    log(`QEMU 10.0: apt-get download ${versions.join(' ')}`);
    const debs = join(apt, 'debs');
    sh('apt-get', [...aptOpts, 'download', '-q', ...versions], { cwd: debs });
    const files = readdirSync(debs).filter((f) => f.endsWith('.deb'));
    if (files.length !== QEMU10_PACKAGES.length) throw new Error(`apt-get download produced ${files.length} .debs, expected ${QEMU10_PACKAGES.length}`);
    const rootfs = join(work, 'root');
    const sizes = [];
    for (const f of files) {
      sh('dpkg-deb', ['-x', join(debs, f), rootfs]);
      sizes.push(`${f.split('_')[0]} ${(statSync(join(debs, f)).size / 1048576).toFixed(1)} MiB`);
    }
    writeWrapper(join(work, 'bin', 'qemu-system-x86_64'));
    checkLibraries(join(rootfs, 'usr', 'bin', 'qemu-system-x86_64'));
    rmSync(apt, { recursive: true, force: true });
    writeFileSync(join(work, '.complete'), `${LAYOUT}\n${versions.join('\n')}\n`);
    rmSync(paths.dir, { recursive: true, force: true });
    try {
      renameSync(work, paths.dir);
    } catch (err) {
      // Another bootstrap finished first: its tree is as good as ours.
      if (!existsSync(paths.stamp)) throw err;
    }
    const v = sh(paths.wrapper, ['--version']).split('\n')[0];
    log(`QEMU 10.0: ${v} at ${paths.wrapper} (${sizes.join(', ')}; ${((performance.now() - started) / 1000).toFixed(1)} s)`);
    return paths.wrapper;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** The wrapper finds the tree beside itself, so a moved checkout keeps a working cache. */
function writeWrapper(path) {
  mkdirSync(join(path, '..'), { recursive: true });
  writeFileSync(
    path,
    [
      '#!/bin/sh',
      '# Written by scripts/qemu10.mjs: Debian bookworm-backports QEMU 10.0, unpacked, not installed.',
      '# exec keeps the PID; -L puts its own ROMs and SeaBIOS before the system 7.2 ones, and',
      '# QEMU_MODULE_DIR its own modules.',
      'root=$(dirname "$(readlink -f "$0")")/../root',
      'QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"',
      'export QEMU_MODULE_DIR',
      'exec "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"',
      '',
    ].join('\n'),
  );
  chmodSync(path, 0o755);
}

/** Every shared library the binary links must resolve on this system: it is not installed. */
function checkLibraries(binary) {
  const out = sh('ldd', [binary]);
  const missing = out.split('\n').filter((l) => l.includes('not found')).map((l) => l.trim().split(/\s/)[0]);
  if (missing.length > 0) throw new Error(`QEMU 10.0 needs libraries Debian 12 lacks here: ${missing.join(', ')}`);
}

/** apt's candidate may be the installed 7.2 (dpkg's status counts too): take the suite's own. */
function candidate(aptOpts, pkg) {
  const out = sh('apt-cache', [...aptOpts, 'policy', pkg]);
  return versionFrom(out.slice(out.indexOf('Version table:')), SUITE);
}

/** The newest version the private suite offers, from `apt-cache policy`'s version table. */
function versionFrom(table, suite) {
  const lines = table.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const m = /^\s+(?:\*\*\* )?(\S+) -?\d+$/.exec(lines[i]);
    if (!m) continue;
    for (let j = i + 1; j < lines.length && !/^\s+(?:\*\*\* )?\S+ -?\d+$/.test(lines[j]); j++) {
      if (lines[j].includes(` ${suite}/`)) return m[1];
    }
  }
  return undefined;
}

function osCodename() {
  try {
    return /^VERSION_CODENAME=(.*)$/m.exec(readFileSync('/etc/os-release', 'utf8'))?.[1]?.replace(/"/g, '');
  } catch {
    return undefined;
  }
}

/**
 * The Debian mirror this system's own apt uses for `codename`: the first `deb` entry of
 * /etc/apt/sources.list or /etc/apt/sources.list.d/*.list|*.sources (one-line and deb822
 * formats) whose suite is exactly the codename. Its Signed-By goes along.
 */
export function systemMirror(codename, etc = '/etc/apt') {
  const files = [join(etc, 'sources.list')];
  const parts = join(etc, 'sources.list.d');
  if (existsSync(parts)) files.push(...readdirSync(parts).filter((f) => /\.(list|sources)$/.test(f)).sort().map((f) => join(parts, f)));
  for (const file of files) {
    if (!existsSync(file)) continue;
    const text = readFileSync(file, 'utf8');
    const entries = file.endsWith('.sources') ? deb822Entries(text) : oneLineEntries(text);
    const hit = entries.find((e) => e.types.includes('deb') && e.suites.includes(codename) && e.uris.length > 0);
    if (hit) return { uri: hit.uris[0].replace(/\/+$/, ''), signedBy: hit.signedBy, from: file };
  }
  throw new Error(`no apt source in ${etc}/sources.list(.d) has suite '${codename}': cannot tell which Debian mirror to fetch ${SUITE} from`);
}

function oneLineEntries(text) {
  const entries = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*/, '').trim();
    const m = /^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)/.exec(line);
    if (!m) continue;
    const signedBy = /(?:^|\s)signed-by=(\S+)/.exec(m[2] ?? '')?.[1];
    entries.push({ types: [m[1]], uris: [m[3]], suites: [m[4]], signedBy });
  }
  return entries;
}

function deb822Entries(text) {
  const entries = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = {};
    let last;
    for (const raw of stanza.split('\n')) {
      if (raw.startsWith('#')) continue;
      if (/^\s/.test(raw) && last) {
        fields[last] += `\n${raw.trim()}`;
        continue;
      }
      const m = /^([A-Za-z-]+):\s*(.*)$/.exec(raw);
      if (m) fields[(last = m[1].toLowerCase())] = m[2];
    }
    if (fields.enabled === 'no') continue;
    const words = (k) => (fields[k] ?? '').split(/\s+/).filter(Boolean);
    // Signed-By is a path, or an inline key block (then the system's keyrings apply anyway).
    const signedBy = fields['signed-by'] && !fields['signed-by'].includes('\n') ? fields['signed-by'].trim() : undefined;
    entries.push({ types: words('types'), uris: words('uris'), suites: words('suites'), signedBy });
  }
  return entries;
}

function sh(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', env: { ...process.env, LC_ALL: 'C' }, ...opts });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (exit ${r.status}): ${(r.stderr ?? '').trim().slice(-2000)}`);
  return r.stdout ?? '';
}
