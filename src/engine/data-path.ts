/**
 * Where the data path's QEMU arguments are built: the NBD servers (the destination's for the
 * mirrors, the source's for lazy mode), and the migration stream's URI; and where its TLS is set
 * up and taken down. The NBD client side is `targetNodeArguments` (source-mirror.ts) and the
 * overlay's backing (endpoint.ts), both given TLS from the same plan.
 */
import { join } from 'node:path';
import { SERVER_TLS } from '../host/data-tls.js';
import type { NbdServerStartArgs } from '../qmp/index.js';
import { QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceState } from './context.js';
import { MigrationError, type MigrationPlan } from './types.js';

/** An NBD server; over TLS it admits exactly the peer host's certificate name (authz). */
export function nbdServerArguments(host: string, port: number, tls = false): NbdServerStartArgs {
  return { addr: { type: 'inet', data: { host, port: String(port) } }, ...(tls ? SERVER_TLS : {}) };
}

export function migrationUri(host: string, port: number): string {
  return `tcp:${host}:${port}`;
}

/**
 * The source gets ferry's TLS objects for the destination and the stream's TLS parameters, before
 * its first NBD client node or server. The undo is registered first: it runs after the nodes'.
 */
export async function sourceBeginDataTls(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  const tls = input.plan.dataTls;
  if (!tls.encrypted) return;
  const src = ctx.req.source;
  if (!src.beginDataTls || !src.endDataTls) throw new MigrationError('DATA_TLS_UNAVAILABLE', `${src.name} cannot set up data-path TLS`, { phase: ctx.phase });
  const end = src.endDataTls.bind(src);
  ctx.undo.push('end the source\'s data-path TLS', 'source', () => end(input.source.qmp, { timeoutMs: QMP_TIMEOUT_MS }));
  await src.beginDataTls(input.source.qmp, { peerIdentity: tls.destination.identity, peerHostname: tls.destination.hostname }, { timeoutMs: QMP_TIMEOUT_MS });
}

/** After the migration (a tidy step): the source's TLS objects and credentials go before it quits. */
export async function sourceEndDataTls(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan }): Promise<void> {
  if (!input.plan.dataTls.encrypted) return;
  await ctx.req.source.endDataTls?.(input.source.qmp, { timeoutMs: QMP_TIMEOUT_MS });
}

/** The peer a TLS destination is started for (undefined: plain text). */
export function destinationTlsPeer(plan: MigrationPlan): { peerIdentity: string; peerHostname: string } | undefined {
  return plan.dataTls.encrypted ? { peerIdentity: plan.dataTls.source.identity, peerHostname: plan.dataTls.source.hostname } : undefined;
}

/** After the migration (a tidy step): the destination keeps no TLS parameters, objects or files of it. */
export async function destinationEndDataTls(ctx: MigrationContext, input: { dest: DestinationState; plan: MigrationPlan }): Promise<void> {
  if (!input.plan.dataTls.encrypted) return;
  await ctx.req.destination.endDataTls?.(input.dest.spec, input.dest.vm, { timeoutMs: QMP_TIMEOUT_MS });
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

export function nbdServerUnixArguments(path: string, tls = false): NbdServerStartArgs {
  // Behind the relay the TLS session runs end to end, source QEMU to destination QEMU: the relay
  // only copies bytes.
  return { addr: { type: 'unix', data: { path } }, ...(tls ? SERVER_TLS : {}) };
}
