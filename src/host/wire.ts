import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * Bytes acknowledged by the peer on every established TCP socket of this host connected to
 * host:port, from `ss -ti` (iproute2). The mirror's own job counters include zero ranges that
 * cross the wire as a few bytes of NBD WRITE_ZEROES, so this is the honest "bytes sent" figure.
 * Undefined when ss is missing or prints nothing we can read.
 */
export function tcpBytesAcked(peer: { host: string; port: number }): Promise<number | undefined> {
  return sumBytesAcked(['dst', `${peer.host}:${peer.port}`]);
}

/** Bytes sent and acknowledged on every established TCP socket of this host whose local port is `port`. */
export function tcpBytesAckedFrom(port: number): Promise<number | undefined> {
  return sumBytesAcked(['sport', '=', `:${port}`]);
}

async function sumBytesAcked(filter: string[]): Promise<number | undefined> {
  let stdout: string;
  try {
    ({ stdout } = await run('ss', ['-tinH', 'state', 'established', ...filter], { timeout: 5_000 }));
  } catch {
    return undefined;
  }
  let total = 0;
  let seen = false;
  for (const m of stdout.matchAll(/\bbytes_acked:(\d+)/g)) {
    total += Number(m[1]);
    seen = true;
  }
  return seen ? total : undefined;
}

/**
 * Bytes received by the process `pid` on its established TCP sockets to host:port, from `ss -tinp`:
 * one QEMU's own NBD client connections (also across reconnects), never another reader's.
 * Undefined when ss is missing, cannot show the owning process, or prints nothing we can read.
 */
export async function tcpBytesReceivedBy(pid: number, peer: { host: string; port: number }): Promise<number | undefined> {
  let stdout: string;
  try {
    ({ stdout } = await run('ss', ['-tinpH', 'state', 'established', 'dst', `${peer.host}:${peer.port}`], { timeout: 5_000 }));
  } catch {
    return undefined;
  }
  return bytesReceivedByPid(stdout, pid);
}

/** The sum of bytes_received over the sockets of `pid` in `ss -tinp` output; undefined if none. */
export function bytesReceivedByPid(stdout: string, pid: number): number | undefined {
  let total = 0;
  let seen = false;
  let ours = false;
  for (const line of stdout.split('\n')) {
    if (line.trim() === '') continue;
    if (!/^\s/.test(line)) {
      // A socket's first line names its process; the indented line after it holds the counters.
      ours = new RegExp(`\\bpid=${pid},`).test(line);
      continue;
    }
    const m = /\bbytes_received:(\d+)/.exec(line);
    if (ours && m) {
      total += Number(m[1]);
      seen = true;
    }
  }
  return seen ? total : undefined;
}
