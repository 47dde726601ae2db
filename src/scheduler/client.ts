/**
 * A session with ferry-scheduler's API: calls with deadlines, and the watch stream. Every reply
 * and every event is parsed here against the method's own schema; a reply that does not fit is
 * a SchedulerCallError SCHEDULER_BAD_REPLY naming the method and the field, never a cast.
 * The schemas keep fields they do not know (a newer scheduler may add some).
 */
import type { WebSocket } from 'ws';
import { z } from 'zod';
import { FerryError } from '../errors.js';
import { openSocket, RpcSession, type PeerLabel } from '../rpc/ws-client.js';
import { SCHEDULER_PROTOCOL_VERSION, type SchedulerMethod } from './protocol.js';
import { protectionReplies } from './protection-protocol.js';
import { MIGRATION_STATES, type MigrationJob } from './types.js';

export class SchedulerCallError extends FerryError {
  override name = 'SchedulerCallError';
}

export const migrationJobSchema = z.looseObject({
  id: z.string(),
  vm: z.string(),
  from: z.string(),
  to: z.string(),
  reason: z.enum(['drain', 'manual', 'rebalance']),
  priority: z.number(),
  mode: z.enum(['precopy', 'lazy']),
  state: z.enum(MIGRATION_STATES),
  attempts: z.number().int(),
  phase: z.string().nullable(),
  error: z.string().nullable(),
  bandwidthBytesPerSec: z.number().nullable(),
  memoryMiB: z.number(),
  diskBytes: z.number(),
  notBefore: z.number(),
  createdAt: z.number(),
  updatedAt: z.number(),
  seq: z.number().int(),
}) satisfies z.ZodType<MigrationJob>;

const enqueued = z.looseObject({ job: migrationJobSchema, existing: z.boolean() });

/** What each method answers. */
export const schedulerReplies = {
  hosts: z.array(
    z.looseObject({
      name: z.string(),
      url: z.string(),
      reachable: z.boolean(),
      freeMemoryMiB: z.number().nullable(),
      freeDiskBytes: z.number().nullable(),
      vms: z.number().int(),
      outgoing: z.number().int(),
      incoming: z.number().int(),
      queued: z.number().int().optional(),
    }),
  ),
  vms: z.array(z.looseObject({ name: z.string(), host: z.string(), memoryMiB: z.number(), diskBytes: z.number() })),
  migrate: enqueued,
  drain: z.array(enqueued),
  queue: z.array(migrationJobSchema),
  get: migrationJobSchema,
  journal: z.array(z.looseObject({ at: z.number(), state: z.enum(MIGRATION_STATES), phase: z.string().nullable(), detail: z.string().nullable() })),
  cancel: migrationJobSchema,
  watch: z.looseObject({}),
  ...protectionReplies,
} as const satisfies Record<SchedulerMethod, z.ZodType>;
export type SchedulerReply<M extends SchedulerMethod> = z.infer<(typeof schedulerReplies)[M]>;
const replyParsers: { [M in SchedulerMethod]: z.ZodType<SchedulerReply<M>> } = schedulerReplies;

/** The watch stream's events. */
export const schedulerEventSchema = z.discriminatedUnion('type', [
  z.looseObject({ type: z.literal('job'), job: migrationJobSchema }),
  z.looseObject({ type: z.literal('phase'), id: z.string(), vm: z.string(), phase: z.string() }),
  z.looseObject({
    type: z.literal('progress'),
    id: z.string(),
    vm: z.string(),
    phase: z.string(),
    doneBytes: z.number(),
    totalBytes: z.number(),
    bytesPerSec: z.number(),
    etaMs: z.number().nullable(),
  }),
  z.looseObject({ type: z.literal('finished'), id: z.string(), vm: z.string(), state: z.enum(MIGRATION_STATES), durationMs: z.number(), downtimeMs: z.number().optional() }),
]);
export type SchedulerEvent = z.infer<typeof schedulerEventSchema>;

export class SchedulerClient {
  readonly #session: RpcSession;
  readonly #url: string;
  readonly #listeners = new Set<(e: SchedulerEvent) => void>();
  #badEvents = 0;
  readonly closed: Promise<void>;

  private constructor(ws: WebSocket, url: string) {
    this.#url = url;
    this.#session = new RpcSession(ws, {
      version: SCHEDULER_PROTOCOL_VERSION,
      peer: schedulerPeer(url),
      onEvent: (raw) => {
        // An event this client cannot read (malformed, or of a newer kind) is counted and skipped.
        const e = schedulerEventSchema.safeParse(raw);
        if (!e.success) return void this.#badEvents++;
        for (const l of this.#listeners) l(e.data);
      },
    });
    this.closed = this.#session.closed;
  }

  /** `heartbeatMs`: ping interval (default 10 s); a scheduler that stops answering is dropped within twice this. */
  static async connect(url: string, token: string, timeoutMs = 10_000, opts: { heartbeatMs?: number } = {}): Promise<SchedulerClient> {
    return openSocket(`${url}/v1`, { token, timeoutMs, peer: schedulerPeer(url), ...opts }, (ws) => new SchedulerClient(ws, url));
  }

  async call<M extends SchedulerMethod>(method: M, params: Record<string, unknown> = {}, timeoutMs = 60_000, signal?: AbortSignal): Promise<SchedulerReply<M>> {
    const raw = await this.#session.call(method, params, timeoutMs, signal);
    const r = replyParsers[method].safeParse(raw);
    if (!r.success) {
      const issue = r.error.issues[0]!;
      throw new SchedulerCallError('SCHEDULER_BAD_REPLY', `the scheduler at ${this.#url} answered ${method} with something this client cannot read: ${issue.path.join('.') || '(reply)'}: ${issue.message}`);
    }
    return r.data;
  }

  async watch(listener: (e: SchedulerEvent) => void): Promise<void> {
    this.#listeners.add(listener);
    await this.call('watch');
  }

  /** Events of the watch stream that did not parse, and were skipped. */
  get skippedEvents(): number {
    return this.#badEvents;
  }

  close(): void {
    this.#session.close();
  }
}

function schedulerPeer(url: string): PeerLabel {
  return { who: `the scheduler at ${url}`, code: 'SCHEDULER', error: (code, message, opts) => new SchedulerCallError(code, message, opts) };
}
