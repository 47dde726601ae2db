/**
 * QMP events as a discriminated union on `event`. The events ferry acts on have their `data`
 * parsed by zod (unknown fields tolerated, a missing required field is a protocol error); any
 * other event arrives as OtherQmpEvent with `data: unknown`.
 *
 * TypeScript cannot narrow `e.event === 'STOP'` away from the fallback (its `event` is any string),
 * so after that check `e.data` is still `unknown`. Use the guard instead:
 * `isEvent('JOB_STATUS_CHANGE')(e) && e.data.id === id`, or `switch (e.event)` then `isEvent`.
 */
import { z } from 'zod';

export const jobStatusSchema = z.enum([
  'undefined', 'created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending', 'aborting', 'concluded', 'null',
]);
export type JobStatus = z.infer<typeof jobStatusSchema>;

export const migrationStatusSchema = z.enum([
  'none', 'setup', 'cancelling', 'cancelled', 'active', 'postcopy-active', 'postcopy-paused', 'postcopy-recover',
  'completed', 'failed', 'colo', 'pre-switchover', 'device', 'wait-unplug',
]);
export type MigrationStatus = z.infer<typeof migrationStatusSchema>;

/** Enums QEMU may extend are parsed as plain strings, so a newer QEMU cannot break the session. */
const blockJobInfo = z.object({
  type: z.string(),
  device: z.string(),
  len: z.number(),
  offset: z.number(),
  speed: z.number(),
});

export const eventDataSchemas = {
  BLOCK_JOB_READY: blockJobInfo,
  BLOCK_JOB_COMPLETED: blockJobInfo.extend({ error: z.string().optional() }),
  BLOCK_JOB_CANCELLED: blockJobInfo,
  BLOCK_JOB_ERROR: z.object({ device: z.string(), operation: z.string(), action: z.string() }),
  JOB_STATUS_CHANGE: z.object({ id: z.string(), status: jobStatusSchema }),
  MIGRATION: z.object({ status: migrationStatusSchema }),
  MIGRATION_PASS: z.object({ pass: z.number() }),
  STOP: z.object({}).optional(),
  RESUME: z.object({}).optional(),
  SHUTDOWN: z.object({ guest: z.boolean(), reason: z.string() }),
  BLOCK_EXPORT_DELETED: z.object({ id: z.string() }),
} as const;

export type KnownEventName = keyof typeof eventDataSchemas;
export const knownEventNames: ReadonlySet<string> = new Set(Object.keys(eventDataSchemas));

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

type EventOf<N extends KnownEventName> = {
  event: N;
  data: z.infer<(typeof eventDataSchemas)[N]>;
  timestamp: QmpTimestamp;
};

export type BlockJobReadyEvent = EventOf<'BLOCK_JOB_READY'>;
export type BlockJobCompletedEvent = EventOf<'BLOCK_JOB_COMPLETED'>;
export type BlockJobCancelledEvent = EventOf<'BLOCK_JOB_CANCELLED'>;
export type BlockJobErrorEvent = EventOf<'BLOCK_JOB_ERROR'>;
export type JobStatusChangeEvent = EventOf<'JOB_STATUS_CHANGE'>;
export type MigrationEvent = EventOf<'MIGRATION'>;
export type MigrationPassEvent = EventOf<'MIGRATION_PASS'>;
export type StopEvent = EventOf<'STOP'>;
export type ResumeEvent = EventOf<'RESUME'>;
export type ShutdownEvent = EventOf<'SHUTDOWN'>;
export type BlockExportDeletedEvent = EventOf<'BLOCK_EXPORT_DELETED'>;

/** Any event without a typed shape here (and, by type, any name at all). */
export interface OtherQmpEvent {
  event: string;
  data: unknown;
  timestamp: QmpTimestamp;
}

export type KnownQmpEvent = { [N in KnownEventName]: EventOf<N> }[KnownEventName];
export type QmpEvent = KnownQmpEvent | OtherQmpEvent;

/** Type guard for one known event name: `waitForEvent(isEvent('STOP'), ...)`. */
export function isEvent<N extends KnownEventName>(name: N): (e: QmpEvent) => e is EventOf<N> {
  return (e: QmpEvent): e is EventOf<N> => e.event === name;
}

/** The same as a plain check: `if (eventIs(e, 'MIGRATION')) e.data.status`. */
export function eventIs<N extends KnownEventName>(e: QmpEvent, name: N): e is EventOf<N> {
  return e.event === name;
}

const timestampSchema = z.object({ seconds: z.number(), microseconds: z.number() });

export type EventParse = { ok: true; event: QmpEvent } | { ok: false; problem: string };

/** Parses one event message (already known to have a string `event`). */
export function parseEvent(name: string, msg: { data?: unknown; timestamp?: unknown }): EventParse {
  const ts = timestampSchema.safeParse(msg.timestamp);
  if (!ts.success) return { ok: false, problem: `event ${name} has no valid timestamp` };
  if (!knownEventNames.has(name)) {
    return { ok: true, event: { event: name, data: msg.data, timestamp: ts.data } };
  }
  const schema = eventDataSchemas[name as KnownEventName];
  const data = schema.safeParse(msg.data);
  if (!data.success) return { ok: false, problem: `event ${name} has unexpected data: ${z.prettifyError(data.error)}` };
  return { ok: true, event: { event: name, data: data.data, timestamp: ts.data } as QmpEvent };
}

/** One line naming an event, for timeout messages and logs. */
export function describeEvent(e: QmpEvent): string {
  const data = e.data === undefined ? '' : ` ${JSON.stringify(e.data)}`;
  return `${e.event}${data.length > 200 ? data.slice(0, 200) + '…' : data}`;
}
