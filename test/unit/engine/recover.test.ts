/**
 * Crash recovery's hydration against a scripted QMP peer: the same rate cap as the live engine,
 * typed errors, and done only when the overlay has lost its backing.
 */
import { describe, expect, test } from 'vitest';
import { HydrationError } from '../../../src/engine/hydrate.js';
import { finishHydration, recoveryFor } from '../../../src/engine/recover.js';
import { silentLogger } from '../../../src/log.js';
import { FakeQmp } from '../qmp/fake-qmp.js';
import { fakeClients } from './fake-client.js';

const node = (backed: boolean): Record<string, unknown> => ({
  file: backed ? 'json:{"driver":"nbd"}' : '/b/data.qcow2',
  'node-name': 'disk-data',
  ro: false,
  drv: 'qcow2',
  ...(backed ? { backing_file: 'json:{"driver":"nbd"}' } : {}),
  backing_file_depth: backed ? 1 : 0,
  encrypted: false,
  detect_zeroes: 'off',
  image: { filename: '/b/data.qcow2', format: 'qcow2', 'virtual-size': 1 << 20 },
  cache: { writeback: true, direct: false, 'no-flush': false },
  write_threshold: 0,
});

/** A destination QEMU with one backed overlay whose stream ends `outcome` after two polls. */
function scriptedDestination(outcome: 'ok' | 'error'): { fake: FakeQmp; streams: Record<string, unknown>[] } {
  const fake = new FakeQmp();
  const streams: Record<string, unknown>[] = [];
  let job: { status: string; polls: number; error?: string } | undefined;
  let backed = true;
  const reply = (m: Record<string, unknown>, ret: unknown): void => fake.send({ return: ret, id: m.id });
  const jobInfo = (): Record<string, unknown>[] =>
    job ? [{ id: 'ferry-stream-data', type: 'stream', status: job.status, 'current-progress': job.polls, 'total-progress': 2, ...(job.error ? { error: job.error } : {}) }] : [];
  fake.onMessage((m) => {
    switch (m.execute) {
      case 'qmp_capabilities':
        return reply(m, {});
      case 'query-named-block-nodes':
        return reply(m, [node(backed)]);
      case 'block-stream':
        streams.push(m.arguments as Record<string, unknown>);
        job = { status: 'running', polls: 0 };
        return reply(m, {});
      case 'query-block-jobs':
        return reply(m, job ? [{ type: 'stream', device: 'ferry-stream-data', len: 2, offset: job.polls, busy: true, paused: false, speed: 0, 'io-status': 'ok', ready: false, status: job.status, 'auto-finalize': false, 'auto-dismiss': false }] : []);
      case 'query-jobs':
        if (job && job.status === 'running' && ++job.polls >= 2) job.status = 'pending';
        return reply(m, jobInfo());
      case 'job-finalize':
        if (job) {
          job.status = 'concluded';
          if (outcome === 'error') job.error = 'Input/output error';
          else backed = false;
        }
        reply(m, {});
        fake.send({ event: 'JOB_STATUS_CHANGE', data: { id: 'ferry-stream-data', status: 'concluded' }, timestamp: { seconds: 1, microseconds: 0 } });
        return;
      case 'job-dismiss':
        job = undefined;
        return reply(m, {});
      default:
        return fake.send({ error: { class: 'CommandNotFound', desc: `fake: ${String(m.execute)}` }, id: m.id });
    }
  });
  fake.greet();
  return { fake, streams };
}

const connect = fakeClients();

describe('finishHydration (crash recovery)', () => {
  test('defect 6: the stream runs at the configured rate cap, and the overlay ends standing alone', async () => {
    const { fake, streams } = scriptedDestination('ok');
    const client = await connect(fake);
    const did = await finishHydration(client, silentLogger, { bytesPerSec: 1 << 20, timeoutMs: 2_000 });
    expect(streams).toEqual([expect.objectContaining({ 'job-id': 'ferry-stream-data', device: 'disk-data', speed: 1 << 20 })]);
    expect(did).toEqual(['hydrated disk-data']);
  });

  test('defect 6: a stream that keeps failing ends in a typed error with a stable code, not a plain Error', async () => {
    const { fake } = scriptedDestination('error');
    const client = await connect(fake);
    const err = await finishHydration(client, silentLogger, { timeoutMs: 2_000, attempts: 1 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HydrationError);
    expect(err).toMatchObject({ code: 'HYDRATION_FAILED', message: expect.stringMatching(/Input\/output error/) });
  });
});

describe('recovery table (defect 5)', () => {
  test.each([
    [null, 'roll-back'],
    ['preflight', 'roll-back'],
    ['prepare-destination', 'roll-back'],
    ['mirror', 'roll-back'],
    ['ram', 'roll-back'],
    ['switchover', 'roll-back'],
    ['rollback', 'roll-back'],
    ['confirm', 'ask-destination'],
    ['failed', 'ask-destination'],
    ['hydrate', 'hand-over'],
    ['cleanup', 'hand-over'],
    ['done', 'hand-over'],
    ['some-future-phase', 'ask-destination'],
  ] as const)('a migration left in phase %s: %s', (phase, action) => {
    expect(recoveryFor(phase)).toBe(action);
  });
});
