#!/usr/bin/env node
// Builds ferry's tiny test guest into images/out/ (git-ignored): Debian's cloud kernel and an
// initramfs of busybox-static, the virtio modules and the ferry-guest workload.
// Plain Node, no packages: the bootstrap runs it before anything else is there.
//
// Cached: images/out/manifest.json records a hash of every input (kernel package name, guest
// sources, this script, busybox); a build whose inputs match is a no-op.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, 'out');
const cache = join(here, '..', '.cache', 'kernel');
const MODULES = ['virtio_ring', 'virtio', 'virtio_pci_modern_dev', 'virtio_pci_legacy_dev', 'virtio_pci', 'virtio_blk'];

function log(msg) {
  process.stderr.write(`image: ${msg}\n`);
}

function sh(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', ...opts });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${(r.stderr ?? '').trim()}`);
  return r.stdout ?? '';
}

/** linux-image-cloud-amd64 is a metapackage; the kernel is the package it depends on today. */
function kernelPackage() {
  const read = () => {
    const r = spawnSync('apt-cache', ['depends', 'linux-image-cloud-amd64'], { encoding: 'utf8' });
    return /Depends:\s*(linux-image-[0-9][^\s]*-cloud-amd64)/.exec(r.stdout ?? '')?.[1];
  };
  let name = read();
  if (!name && process.getuid?.() === 0) {
    log('apt lists lack linux-image-cloud-amd64: apt-get update');
    sh('apt-get', ['update', '-q'], { stdio: 'inherit' });
    name = read();
  }
  if (!name) throw new Error('cannot resolve the kernel package of linux-image-cloud-amd64 (run: apt-get update)');
  return name;
}

function fetchKernel(pkg) {
  const dir = join(cache, pkg);
  const stamp = join(dir, '.unpacked');
  if (existsSync(stamp)) return dir;
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  log(`downloading ${pkg}`);
  sh('apt-get', ['download', '-q', pkg], { cwd: dir });
  const deb = readdirSync(dir).find((f) => f.endsWith('.deb'));
  if (!deb) throw new Error(`apt-get download ${pkg} produced no .deb`);
  sh('dpkg-deb', ['-x', join(dir, deb), join(dir, 'root')]);
  rmSync(join(dir, deb));
  writeFileSync(stamp, '');
  return dir;
}

function hashInputs(pkg) {
  const h = createHash('sha256');
  h.update(pkg);
  for (const f of [join(here, 'build.mjs'), join(here, 'guest', 'ferry-guest.c'), join(here, 'guest', 'init'), '/bin/busybox']) {
    h.update(readFileSync(f));
  }
  return h.digest('hex').slice(0, 16);
}

function build() {
  const pkg = kernelPackage();
  const inputsHash = hashInputs(pkg);
  const manifestPath = join(out, 'manifest.json');
  if (existsSync(manifestPath)) {
    const m = JSON.parse(readFileSync(manifestPath, 'utf8'));
    if (m.inputsHash === inputsHash && existsSync(m.kernel) && existsSync(m.initrd)) {
      log(`up to date (${pkg})`);
      return;
    }
  }
  const t0 = Date.now();
  const kdir = join(fetchKernel(pkg), 'root');
  const version = pkg.replace(/^linux-image-/, '');
  const modDir = join(kdir, 'lib', 'modules', version);

  rmSync(out, { recursive: true, force: true });
  const root = join(out, 'initramfs');
  for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'lib/modules']) mkdirSync(join(root, d), { recursive: true });
  copyFileSync('/bin/busybox', join(root, 'bin', 'busybox'));
  chmodSync(join(root, 'bin', 'busybox'), 0o755);
  sh('gcc', ['-static', '-O2', '-o', join(root, 'bin', 'ferry-guest'), join(here, 'guest', 'ferry-guest.c')]);
  copyFileSync(join(here, 'guest', 'init'), join(root, 'init'));
  chmodSync(join(root, 'init'), 0o755);

  const found = [];
  const builtIn = [];
  for (const m of MODULES) {
    const file = findModule(modDir, m);
    if (!file) {
      builtIn.push(m);
      continue;
    }
    const target = join(root, 'lib', 'modules', `${m}.ko`);
    if (file.endsWith('.xz')) writeFileSync(target, sh('xz', ['-dc', file], { encoding: 'buffer' }));
    else copyFileSync(file, target);
    found.push(m);
  }
  // The kernel opens /dev/console before init mounts devtmpfs; without the node early output is lost.
  if (process.getuid?.() === 0) spawnSync('mknod', ['-m', '600', join(root, 'dev', 'console'), 'c', '5', '1']);

  const initrd = join(out, 'initrd.img');
  const list = sh('find', ['.'], { cwd: root });
  const cpio = spawnSync('/bin/busybox', ['cpio', '-o', '-H', 'newc'], { cwd: root, input: list, maxBuffer: 1 << 30 });
  if (cpio.status !== 0) throw new Error(`busybox cpio failed: ${cpio.stderr}`);
  const gz = spawnSync('gzip', ['-9'], { input: cpio.stdout, maxBuffer: 1 << 30 });
  if (gz.status !== 0) throw new Error('gzip failed');
  writeFileSync(initrd, gz.stdout);
  const kernel = join(out, 'vmlinuz');
  copyFileSync(join(kdir, 'boot', `vmlinuz-${version}`), kernel);
  rmSync(root, { recursive: true, force: true });

  const manifest = {
    kernel,
    initrd,
    kernelVersion: version,
    kernelPackage: pkg,
    modules: found,
    builtInModules: builtIn,
    inputsHash,
    builtAt: new Date().toISOString(),
    paths: 'absolute',
  };
  writeFileSync(manifestPath, `${JSON.stringify(manifest, null, 2)}\n`);
  log(`built ${version} in ${Date.now() - t0} ms (modules: ${found.join(', ')}${builtIn.length ? `; built in or absent: ${builtIn.join(', ')}` : ''})`);
}

function findModule(dir, name) {
  const stack = [dir];
  while (stack.length) {
    const d = stack.pop();
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) stack.push(p);
      else if (e.name === `${name}.ko` || e.name === `${name}.ko.xz`) return p;
    }
  }
  return undefined;
}

try {
  build();
} catch (err) {
  log(`failed: ${err.message}`);
  process.exit(1);
}
