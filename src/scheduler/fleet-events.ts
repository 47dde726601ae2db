/**
 * The watch stream's events for one API, whichever replica runs the migration. A scheduler emits
 * what its own engines do; on a shared store (PostgreSQL) every replica also publishes those
 * events and hears the others' (LISTEN/NOTIFY), so `ferry watch` and the web view on any replica
 * see every migration of the fleet, not only the ones that replica happens to have claimed.
 *
 * Between replicas a `job` event carries only the migration's id: a row may outgrow NOTIFY's
 * 8000-byte payload (an error with QEMU's last lines), and the row in the database is the truth
 * anyway. The receiver reads it back before it passes the event on; events are passed on in the
 * order they arrived, so a phase never overtakes the job change published before it.
 */
import { EventEmitter } from 'node:events';
import { z } from 'zod';
import { errorText } from '../errors.js';
import type { Logger } from '../log.js';
import type { SchedulerEvents } from './scheduler.js';
import type { FleetMessage, SchedulerStore } from './store.js';
import type { MigrationJob } from './types.js';

/** One event as the API sends it to a watcher. */
export type WatchEvent =
  | { type: 'job'; job: MigrationJob }
  | { type: 'phase'; id: string; vm: string; phase: string }
  | ({ type: 'progress' } & SchedulerEvents['progress'][0])
  | { type: 'finished'; id: string; vm: string; state: string; durationMs: number; downtimeMs?: number; diskBytes?: number; ramBytes?: number };

/** What crosses between replicas: a WatchEvent, with a job reduced to its id. */
const publishedSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('job'), id: z.string() }),
  z.object({ type: z.literal('phase'), id: z.string(), vm: z.string(), phase: z.string() }),
  z.object({
    type: z.literal('progress'),
    id: z.string(),
    vm: z.string(),
    phase: z.string(),
    doneBytes: z.number(),
    totalBytes: z.number(),
    bytesPerSec: z.number(),
    etaMs: z.number().nullable(),
  }),
  z.object({
    type: z.literal('finished'),
    id: z.string(),
    vm: z.string(),
    state: z.string(),
    durationMs: z.number(),
    downtimeMs: z.number().optional(),
    diskBytes: z.number().optional(),
    ramBytes: z.number().optional(),
  }),
]);
type Published = z.infer<typeof publishedSchema>;

/** What FleetEvents needs of a Scheduler: its events, and the owner name it claims under. */
export type EventSource = EventEmitter<SchedulerEvents> & { readonly owner: string };

/** The scheduler's own events in the watch stream's shape. */
function watchEventsOf(scheduler: EventSource, emit: (e: WatchEvent) => void): () => void {
  const onJob = (...[job]: SchedulerEvents['job']): void => emit({ type: 'job', job });
  const onPhase = (...[p]: SchedulerEvents['phase']): void => emit({ type: 'phase', ...p });
  const onProgress = (...[p]: SchedulerEvents['progress']): void => emit({ type: 'progress', ...p });
  const onFinished = (...[f]: SchedulerEvents['finished']): void =>
    emit({ type: 'finished', id: f.job.id, vm: f.job.vm, state: f.job.state, durationMs: Math.round(f.durationMs), ...(f.result ?? {}) });
  scheduler.on('job', onJob);
  scheduler.on('phase', onPhase);
  scheduler.on('progress', onProgress);
  scheduler.on('finished', onFinished);
  return () => {
    scheduler.off('job', onJob);
    scheduler.off('phase', onPhase);
    scheduler.off('progress', onProgress);
    scheduler.off('finished', onFinished);
  };
}

function published(e: WatchEvent): Published {
  return e.type === 'job' ? { type: 'job', id: e.job.id } : e;
}

export class FleetEvents extends EventEmitter<{ event: [WatchEvent] }> {
  readonly #stops: (() => unknown)[] = [];
  /** Remote events in arrival order: each waits for the one before it (a job is read back first). */
  #remote: Promise<void> = Promise.resolve();
  #received = 0;
  #skipped = 0;

  private constructor() {
    super();
    // Every watcher of the API adds a listener: there is no leak in having many.
    this.setMaxListeners(0);
  }

  /** Starts relaying; on a store without publish/listen it is just the scheduler's own events. */
  static async start(scheduler: EventSource, store: Pick<SchedulerStore, 'get' | 'publish' | 'listen'>, log: Logger): Promise<FleetEvents> {
    const bus = new FleetEvents();
    const origin = scheduler.owner;
    const { publish, listen } = store;
    bus.#stops.push(
      watchEventsOf(scheduler, (e) => {
        bus.emit('event', e);
        if (publish) publish.call(store, { origin, event: published(e) }).catch((err: unknown) => log.warn({ err: errorText(err), type: e.type }, 'an event could not be published to the other replicas'));
      }),
    );
    if (listen) {
      const stop = await listen.call(store, (m) => {
        if (m.origin !== origin) bus.#fromReplica(m, store, log);
      });
      bus.#stops.push(stop);
    }
    return bus;
  }

  /** Events heard from other replicas, and those that did not parse (skipped). */
  get counts(): { received: number; skipped: number } {
    return { received: this.#received, skipped: this.#skipped };
  }

  #fromReplica(m: FleetMessage, store: Pick<SchedulerStore, 'get'>, log: Logger): void {
    const p = publishedSchema.safeParse(m.event);
    if (!p.success) {
      this.#skipped++;
      log.warn({ origin: m.origin, issue: p.error.issues[0]?.message }, 'skipped an event from another replica that this one cannot read');
      return;
    }
    this.#received++;
    const e = p.data;
    this.#remote = this.#remote.then(async () => {
      if (e.type !== 'job') return void this.emit('event', e);
      const job = await store.get(e.id).catch((err: unknown) => void log.warn({ id: e.id, err: errorText(err) }, 'reading a migration another replica changed'));
      if (job) this.emit('event', { type: 'job', job });
    }).catch((err: unknown) => log.warn({ err: errorText(err) }, 'a watcher failed on an event from another replica'));
  }

  async stop(): Promise<void> {
    for (const s of this.#stops.splice(0).reverse()) await s();
    await this.#remote;
  }
}
