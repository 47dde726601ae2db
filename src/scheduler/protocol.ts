/**
 * The scheduler's API, version 1, for operators and tools: the agent's framing (JSON text
 * frames on /v1, `{ v, id, method, params }` answered `{ v, id, ok, result | error }`), bearer
 * token at the upgrade, and `watch` turning the session into a stream of `{ v, event }` frames.
 */
import { z } from 'zod';
import { protectionMethods } from './protection-protocol.js';

export const SCHEDULER_PROTOCOL_VERSION = 1;

export const schedulerMethods = {
  hosts: z.object({}).strict(),
  vms: z.object({}).strict(),
  migrate: z.object({ vm: z.string().min(1), to: z.string().min(1).optional(), reason: z.enum(['manual', 'rebalance']).optional(), mode: z.enum(['precopy', 'lazy']).optional() }).strict(),
  drain: z.object({ host: z.string().min(1), mode: z.enum(['precopy', 'lazy']).optional() }).strict(),
  queue: z.object({ all: z.boolean().default(false), limit: z.number().int().positive().max(10_000).default(200) }).strict(),
  get: z.object({ id: z.string().min(1) }).strict(),
  journal: z.object({ id: z.string().min(1) }).strict(),
  cancel: z.object({ id: z.string().min(1) }).strict(),
  watch: z.object({}).strict(),
  /** Standby replicas (issue 12): protection-protocol.ts. */
  ...protectionMethods,
} as const;
export type SchedulerMethod = keyof typeof schedulerMethods;
