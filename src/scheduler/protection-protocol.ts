/** The scheduler's standby-replica methods (issue 12), spread into schedulerMethods (protocol.ts). */
import { z } from 'zod';

export const protectionMethods = {
  protect: z.object({ vm: z.string().min(1), standby: z.string().min(1), intervalMs: z.number().int().min(1_000).max(86_400_000).default(30_000) }).strict(),
  unprotect: z.object({ vm: z.string().min(1) }).strict(),
  'protect-status': z.object({}).strict(),
  /**
   * Failover from the replica. Refused while the source agent says the VM runs; refused too when
   * the source agent cannot be reached, unless sourceFenced: the operator states the host is off.
   */
  recover: z.object({ vm: z.string().min(1), sourceFenced: z.boolean().default(false) }).strict(),
} as const;

export const protectionStatusSchema = z.looseObject({
  vm: z.string(),
  source: z.string(),
  standby: z.string(),
  intervalMs: z.number(),
  state: z.string(),
  consistentAt: z.number().nullable(),
  rpoMs: z.number().nullable(),
  lastBytes: z.number().nullable(),
  lastDurationMs: z.number().nullable(),
  syncs: z.number(),
  failedSyncs: z.number(),
  lastError: z.string().nullable(),
  /** The sync's data path as planned for the loop this scheduler runs: 'tls', 'plain: why', or null (not planned here yet). */
  dataPath: z.string().nullable().optional(),
});
export type ProtectionStatusRow = z.infer<typeof protectionStatusSchema>;

export const recoveryRecordSchema = z.looseObject({
  id: z.string(),
  vm: z.string(),
  source: z.string(),
  standby: z.string(),
  state: z.enum(['succeeded', 'failed']),
  seq: z.number().nullable(),
  pointAt: z.number().nullable(),
  rpoMs: z.number().nullable(),
  detail: z.string().nullable(),
  createdAt: z.number(),
});

export const protectionReplies = {
  protect: protectionStatusSchema,
  unprotect: z.looseObject({ vm: z.string() }),
  'protect-status': z.array(protectionStatusSchema),
  recover: recoveryRecordSchema,
} as const;
