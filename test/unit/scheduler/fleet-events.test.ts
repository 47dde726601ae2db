/**
 * FleetEvents: what one replica's engines do reaches watchers of every replica. The store here is
 * an in-memory bus standing in for NOTIFY (the real one is exercised by
 * scheduler-replicas.test.ts on PostgreSQL); two schedulers are bare event sources.
 */
import { EventEmitter } from 'node:events';
import { expect, test } from 'vitest';
import { FleetEvents, type EventSource, type WatchEvent } from '../../../src/scheduler/fleet-events.js';
import type { SchedulerEvents } from '../../../src/scheduler/scheduler.js';
import type { FleetMessage } from '../../../src/scheduler/store.js';
import { silentLogger as silent } from '../../../src/log.js';
import type { MigrationJob } from '../../../src/scheduler/types.js';

const job = (id: string, state: MigrationJob['state']): MigrationJob => ({
  id,
  vm: 'web1',
  from: 'A',
  to: 'B',
  reason: 'drain',
  priority: 1,
  mode: 'precopy',
  state,
  attempts: 1,
  phase: null,
  error: null,
  bandwidthBytesPerSec: null,
  memoryMiB: 512,
  diskBytes: 1e9,
  notBefore: 0,
  createdAt: 1,
  updatedAt: 2,
  seq: 1,
});

function source(owner: string): EventSource {
  return Object.assign(new EventEmitter<SchedulerEvents>(), { owner });
}

/** A shared store reduced to what FleetEvents uses: rows by id, and a bus every listener hears. */
function sharedStore(rows: Map<string, MigrationJob>, published: FleetMessage[]) {
  const listeners = new Set<(m: FleetMessage) => void>();
  return {
    listeners,
    // A slow read: a later event must still not overtake the job event read back before it.
    get: async (id: string) => (await new Promise((r) => setTimeout(r, 20)), rows.get(id)),
    publish: async (m: FleetMessage) => {
      // Through JSON, as NOTIFY carries it.
      const wire = JSON.parse(JSON.stringify(m)) as FleetMessage;
      published.push(wire);
      for (const l of listeners) l(wire);
    },
    listen: async (l: (m: FleetMessage) => void) => {
      listeners.add(l);
      return async () => void listeners.delete(l);
    },
  };
}

test('a replica watcher sees the other replica\'s migration: jobs read back from the store, in order, its own events once', async () => {
  const rows = new Map([['m-1', job('m-1', 'succeeded')]]);
  const published: FleetMessage[] = [];
  const store = sharedStore(rows, published);
  const one = source('replica-1');
  const two = source('replica-2');
  const busOne = await FleetEvents.start(one, store, silent);
  const busTwo = await FleetEvents.start(two, store, silent);
  const seenOne: WatchEvent[] = [];
  const seenTwo: WatchEvent[] = [];
  busOne.on('event', (e) => seenOne.push(e));
  busTwo.on('event', (e) => seenTwo.push(e));

  // Replica 1 runs m-1; its row in the store already says succeeded (the truth a reader gets).
  one.emit('job', job('m-1', 'running'));
  one.emit('phase', { id: 'm-1', vm: 'web1', phase: 'mirror' });
  one.emit('finished', { job: job('m-1', 'succeeded'), durationMs: 1234.6, result: { downtimeMs: 40, diskBytes: 10, ramBytes: 20 } });

  // Between replicas a job travels as its id only.
  expect(published.map((m) => m.event)).toEqual([
    { type: 'job', id: 'm-1' },
    { type: 'phase', id: 'm-1', vm: 'web1', phase: 'mirror' },
    { type: 'finished', id: 'm-1', vm: 'web1', state: 'succeeded', durationMs: 1235, downtimeMs: 40, diskBytes: 10, ramBytes: 20 },
  ]);
  // Its own watchers: each event once, straight from the engine (not echoed back by the bus).
  expect(seenOne.map((e) => e.type)).toEqual(['job', 'phase', 'finished']);
  expect(seenOne[0]).toEqual({ type: 'job', job: job('m-1', 'running') });
  // The other replica's watchers: the same story, the job read back, nothing overtaking it.
  await expect.poll(() => seenTwo.length).toBe(3);
  expect(seenTwo).toEqual([
    { type: 'job', job: job('m-1', 'succeeded') },
    { type: 'phase', id: 'm-1', vm: 'web1', phase: 'mirror' },
    { type: 'finished', id: 'm-1', vm: 'web1', state: 'succeeded', durationMs: 1235, downtimeMs: 40, diskBytes: 10, ramBytes: 20 },
  ]);
  expect(busTwo.counts).toEqual({ received: 3, skipped: 0 });
  expect(busOne.counts).toEqual({ received: 0, skipped: 0 });

  // What another replica cannot read is skipped and counted, never passed on.
  for (const l of store.listeners) l({ origin: 'replica-3', event: { type: 'phase', id: 'm-2' } });
  for (const l of store.listeners) l({ origin: 'replica-3', event: 'not an event' });
  expect(busTwo.counts.skipped).toBe(2);
  expect(seenTwo).toHaveLength(3);

  await busOne.stop();
  await busTwo.stop();
  expect(store.listeners.size).toBe(0);
  one.emit('phase', { id: 'm-1', vm: 'web1', phase: 'ram' });
  expect(seenOne).toHaveLength(3);
});

test('on a store without publish and listen (SQLite) it is the scheduler\'s own events', async () => {
  const s = source('solo');
  const bus = await FleetEvents.start(s, { get: async () => undefined }, silent);
  const seen: WatchEvent[] = [];
  bus.on('event', (e) => seen.push(e));
  s.emit('progress', { id: 'm-1', vm: 'web1', phase: 'mirror', doneBytes: 1, totalBytes: 2, bytesPerSec: 3, etaMs: null });
  expect(seen).toEqual([{ type: 'progress', id: 'm-1', vm: 'web1', phase: 'mirror', doneBytes: 1, totalBytes: 2, bytesPerSec: 3, etaMs: null }]);
  await bus.stop();
});

