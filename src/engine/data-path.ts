/**
 * Where the data path's QEMU arguments are built: the NBD servers (the destination's for the
 * mirrors, the source's for lazy mode), and the migration stream's URI. The NBD client side is
 * `targetNodeArguments` (source-mirror.ts) and the overlay's backing (endpoint.ts). TLS on these
 * streams (tls-creds, tls-authz, tls-hostname) goes here, in one place.
 */
import { join } from 'node:path';
import type { NbdServerStartArgs } from '../qmp/index.js';

export function nbdServerArguments(host: string, port: number): NbdServerStartArgs {
  return { addr: { type: 'inet', data: { host, port: String(port) } } };
}

export function migrationUri(host: string, port: number): string {
  return `tcp:${host}:${port}`;
}

/**
 * Behind the NBD relay (a QEMU < 8.0 destination, issue 11): the destination's NBD server listens
 * on this unix socket in the VM's run dir, the only unix address the agent's QMP policy allows.
 */
export function nbdRelaySocketPath(runDir: string): string {
  return join(runDir, 'nbd.sock');
}

/** sun_path holds 108 bytes with its NUL: a longer path cannot be bound. */
export const MAX_UNIX_SOCKET_PATH = 107;

export function nbdServerUnixArguments(path: string): NbdServerStartArgs {
  return { addr: { type: 'unix', data: { path } } };
}
