/**
 * The agent's wire protocol, version 1. JSON text frames on `/v1`; every message is parsed here
 * and anything unknown (method, field, version) is refused with a clear error.
 *
 *   request   { v: 1, id, method, params }
 *   response  { v: 1, id, ok: true, result } | { v: 1, id, ok: false, error: { code, message } }
 *
 * QMP for an incoming VM goes over its own WebSocket, `/v1/qmp/<vmId>`: raw QMP lines, filtered
 * by the agent against an allowlist (see qmp-tunnel.ts), so a QmpClient works over it unchanged.
 */
import { z } from 'zod';

export const PROTOCOL_VERSION = 1;
export const MAX_MESSAGE_BYTES = 1024 * 1024;

const diskParams = z.object({ path: z.string().min(1), format: z.enum(['qcow2', 'raw']), virtualSize: z.number().int().positive() }).strict();
const vmRef = z.object({ vmId: z.string().regex(/^[a-z0-9-]{1,64}$/) }).strict();

export const methodParams = {
  'host.info': z.object({}).strict(),
  'dest.check': z.object({ spec: z.unknown() }).strict(),
  'dest.createDisk': diskParams,
  'dest.removeDisk': z.object({ path: z.string().min(1) }).strict(),
  'dest.start': z.object({ spec: z.unknown() }).strict(),
  'dest.kill': vmRef,
  'dest.release': vmRef,
  'dest.removeRunDir': vmRef,
  'vm.list': z.object({}).strict(),
  'vm.start': z.object({ spec: z.unknown() }).strict(),
  'vm.get': z.object({ name: z.string().min(1) }).strict(),
  'vm.nbdBytesSent': z.object({ vmId: z.string(), host: z.string(), port: z.number().int() }).strict(),
  'vm.waitExit': z.object({ vmId: z.string(), timeoutMs: z.number().int().positive().max(600_000) }).strict(),
} as const;

export type Method = keyof typeof methodParams;
export const METHODS = Object.keys(methodParams) as Method[];

export const requestSchema = z
  .object({
    v: z.literal(PROTOCOL_VERSION),
    id: z.union([z.string().max(64), z.number().int()]),
    method: z.string(),
    params: z.unknown().default({}),
  })
  .strict();
export type Request = z.infer<typeof requestSchema>;

export const responseSchema = z.union([
  z.object({ v: z.literal(PROTOCOL_VERSION), id: z.union([z.string(), z.number()]), ok: z.literal(true), result: z.unknown() }).strict(),
  z
    .object({
      v: z.literal(PROTOCOL_VERSION),
      id: z.union([z.string(), z.number(), z.null()]),
      ok: z.literal(false),
      error: z.object({ code: z.string(), message: z.string() }).strict(),
    })
    .strict(),
]);
export type Response = z.infer<typeof responseSchema>;

export const hostInfoSchema = z
  .object({
    name: z.string(),
    storageRoot: z.string(),
    freeBytes: z.number(),
    migrationHost: z.string(),
    portRange: z.tuple([z.number().int(), z.number().int()]),
    qemuVersion: z.string(),
  })
  .strict();
export type HostInfo = z.infer<typeof hostInfoSchema>;

export const startResultSchema = z.object({ vmId: z.string(), pid: z.number().int() }).strict();
