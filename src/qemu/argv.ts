import { join } from 'node:path';
import { DATA_TLS_IDS } from '../host/data-tls.js';
import { deviceId, diskNodeName, fileNodeName, type DiskSpec, type VmSpec } from './spec.js';

/** The monitor left free for whoever drives the VM (migrate-vm, an operator's tools). */
export const qmpSocketPath = (spec: VmSpec): string => join(spec.runDir, 'qmp.sock');
/** The launcher's own monitor: QEMU greets one client per QMP socket, so each user gets one. */
export const launcherQmpSocketPath = (spec: VmSpec): string => join(spec.runDir, 'launcher-qmp.sock');
export const serialSocketPath = (spec: VmSpec): string => join(spec.runDir, 'serial.sock');
export const serialLogPath = (spec: VmSpec): string => join(spec.runDir, 'serial.log');

/**
 * -drive cache= modes as -blockdev options (QEMU's own table, docs of -drive):
 *   writeback: direct=off no-flush=off   none: direct=on no-flush=off   writethrough: the
 *   device's write cache off   directsync: direct=on + write cache off   unsafe: no-flush=on
 */
function cacheOptions(cache: DiskSpec['cache']): { direct: boolean; noFlush: boolean; writeCache: boolean } {
  switch (cache) {
    case 'none':
      return { direct: true, noFlush: false, writeCache: true };
    case 'writeback':
      return { direct: false, noFlush: false, writeCache: true };
    case 'writethrough':
      return { direct: false, noFlush: false, writeCache: false };
    case 'directsync':
      return { direct: true, noFlush: false, writeCache: false };
    case 'unsafe':
      return { direct: false, noFlush: true, writeCache: true };
  }
}

/**
 * ferry's data-path TLS objects on the command line (a destination opens a lazy overlay's NBD
 * backing at start-up, before any object-add could run).
 */
export interface LaunchTlsObjects {
  serverDir: string;
  clientDir: string;
  peerIdentity: string;
  /** A gnutls priority string for both objects; absent: QEMU's default. */
  priority?: string | undefined;
}

/**
 * The two -blockdev nodes of a disk, as QMP objects: the command line is made from them, and
 * `blockdev-reopen` (which resets every option it is not given) takes the same objects.
 *
 * `buffered`: open the disk without O_DIRECT whatever its cache mode (aio=threads then, as
 * `native` needs O_DIRECT). For bench/mirror-ready.ts, which measured this as a way to make
 * QEMU 7.2's mirror converge (issue 11) and found the NBD relay (src/engine/convergence/
 * nbd-relay.ts) better; `blockdev-reopen` with these same objects (aio kept `threads`: file-posix
 * cannot change it on reopen) restores O_DIRECT, also while the node is exported in -incoming.
 */
export function diskBlockdevs(d: DiskSpec, opts: { buffered?: boolean } = {}): { file: Record<string, unknown>; format: Record<string, unknown> } {
  const c = cacheOptions(d.cache);
  const cache = { direct: c.direct && !opts.buffered, 'no-flush': c.noFlush };
  return {
    file: {
      driver: 'file',
      'node-name': fileNodeName(d.id),
      filename: d.path,
      cache,
      aio: cache.direct ? 'native' : 'threads',
      ...(d.discard ? { discard: 'unmap' } : {}),
    },
    format: {
      driver: d.format,
      'node-name': diskNodeName(d.id),
      file: fileNodeName(d.id),
      cache,
      ...(d.discard ? { discard: 'unmap' } : {}),
    },
  };
}

/** `buffered` disks: every node opened without O_DIRECT and with aio=threads; see diskBlockdevs. */
export interface BuildArgvOptions {
  incoming?: 'defer';
  startPaused?: boolean;
  bufferedDisks?: boolean;
  tls?: LaunchTlsObjects;
}

export function buildArgv(spec: VmSpec, opts: BuildArgvOptions = {}): string[] {
  const argv = [
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-name',
    spec.name,
    '-machine',
    spec.machine,
    '-accel',
    spec.accel,
    '-m',
    `${spec.memoryMiB}M`,
    '-smp',
    String(spec.vcpus),
    '-qmp',
    `unix:${launcherQmpSocketPath(spec)},server=on,wait=off`,
    '-qmp',
    `unix:${qmpSocketPath(spec)},server=on,wait=off`,
    // A socket the launcher reads (to timestamp guest lines on the host) plus a log of everything.
    '-chardev',
    `socket,id=serial0,path=${serialSocketPath(spec)},server=on,wait=off,logfile=${serialLogPath(spec)},logappend=on`,
    '-serial',
    'chardev:serial0',
  ];
  for (const d of spec.disks) {
    const c = cacheOptions(d.cache);
    const nodes = diskBlockdevs(d, { buffered: opts.bufferedDisks ?? false });
    argv.push(
      '-blockdev',
      blockdevArg(nodes.file),
      '-blockdev',
      blockdevArg(nodes.format),
      '-device',
      [
        'virtio-blk-pci',
        `drive=${diskNodeName(d.id)}`,
        `id=${deviceId(d.id)}`,
        `serial=${d.id}`,
        `write-cache=${c.writeCache ? 'on' : 'off'}`,
        ...('disk' in spec.boot && spec.boot.disk === d.id ? ['bootindex=0'] : []),
      ].join(','),
    );
  }
  if ('kernel' in spec.boot) {
    argv.push('-kernel', spec.boot.kernel);
    if (spec.boot.initrd) argv.push('-initrd', spec.boot.initrd);
    if (spec.boot.append) argv.push('-append', spec.boot.append);
  }
  if (opts.tls) {
    const priority = opts.tls.priority === undefined ? '' : `,priority=${escapeOpt(opts.tls.priority)}`;
    argv.push(
      '-object',
      `tls-creds-x509,id=${DATA_TLS_IDS.server},dir=${escapeOpt(opts.tls.serverDir)},endpoint=server,verify-peer=on${priority}`,
      '-object',
      `tls-creds-x509,id=${DATA_TLS_IDS.client},dir=${escapeOpt(opts.tls.clientDir)},endpoint=client,verify-peer=on${priority}`,
      '-object',
      `authz-simple,id=${DATA_TLS_IDS.authz},identity=${escapeOpt(opts.tls.peerIdentity)}`,
    );
  }
  if (opts.incoming) argv.push('-incoming', opts.incoming);
  if (opts.startPaused) argv.push('-S');
  argv.push(...spec.extraArgs);
  return argv;
}

/** An object of diskBlockdevs as -blockdev's key=value list, nested keys dotted (cache.direct=on). */
function blockdevArg(o: Record<string, unknown>, prefix = ''): string {
  return Object.entries(o)
    .map(([k, v]) => {
      if (typeof v === 'object' && v !== null) return blockdevArg(v as Record<string, unknown>, `${prefix}${k}.`);
      const text = typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v);
      return `${prefix}${k}=${escapeOpt(text)}`;
    })
    .join(',');
}

/** QEMU's option syntax doubles a comma to keep it inside a value. */
function escapeOpt(v: string): string {
  return v.replaceAll(',', ',,');
}
