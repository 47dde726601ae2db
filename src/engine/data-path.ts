/**
 * Where the data path's QEMU arguments are built: the NBD servers (the destination's for the
 * mirrors, the source's for lazy mode), and the migration stream's URI. The NBD client side is
 * `targetNodeArguments` (source-mirror.ts) and the overlay's backing (endpoint.ts). TLS on these
 * streams (tls-creds, tls-authz, tls-hostname) goes here, in one place.
 */
import type { NbdServerStartArgs } from '../qmp/index.js';

export function nbdServerArguments(host: string, port: number): NbdServerStartArgs {
  return { addr: { type: 'inet', data: { host, port: String(port) } } };
}

export function migrationUri(host: string, port: number): string {
  return `tcp:${host}:${port}`;
}
