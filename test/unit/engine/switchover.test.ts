/**
 * Issue 11 item 3: between pre-switchover and the destination's `cont` the engine sends only what
 * the switchover needs (every mirror's block-job-cancel at once, migrate-continue, the
 * destination's nbd-server-stop) and waits only on events registered before; no query-jobs,
 * job-dismiss, query-migrate or query-status inside the pause. Scripted QMP peers for both sides,
 * which emit the events QEMU 7.2 emits (BLOCK_JOB_COMPLETED for a soft cancel of a READY mirror,
 * MIGRATION completed on both sides after migrate-continue).
 */
import { describe, expect, test } from 'vitest';
import { MigrationContext, type DestinationState, type SourceState } from '../../../src/engine/context.js';
import { destinationIncomingComplete } from '../../../src/engine/destination-finish.js';
import { destinationStopNbdServer } from '../../../src/engine/destination-prepare.js';
import { sourceCompleteMirrors, sourceDismissMirrors } from '../../../src/engine/source-mirror.js';
import { sourceContinue } from '../../../src/engine/source-perform.js';
import { MigrationOptionsSchema, type MigrationPlan } from '../../../src/engine/types.js';
import { parseVmSpec } from '../../../src/qemu/spec.js';
import type { QmpCapabilities } from '../../../src/qmp/index.js';
import { FakeQmp } from '../qmp/fake-qmp.js';
import { fakeClients } from './fake-client.js';

const connect = fakeClients();
const ts = { seconds: 1, microseconds: 0 };

function peers(opts: { mirrorError?: string } = {}) {
  const source = new FakeQmp();
  const destination = new FakeQmp();
  const sent = { source: [] as string[], destination: [] as string[] };
  source.onMessage((m) => {
    const cmd = String(m.execute);
    if (cmd !== 'qmp_capabilities') sent.source.push(cmd);
    source.send({ return: {}, id: m.id });
    if (cmd === 'block-job-cancel') {
      const device = (m.arguments as { device: string }).device;
      source.send({ event: 'BLOCK_JOB_COMPLETED', data: { device, type: 'mirror', len: 1, offset: 1, speed: 0, ...(opts.mirrorError ? { error: opts.mirrorError } : {}) }, timestamp: ts });
    }
    if (cmd === 'migrate-continue') {
      source.send({ event: 'MIGRATION', data: { status: 'completed' }, timestamp: ts });
      destination.send({ event: 'MIGRATION', data: { status: 'completed' }, timestamp: ts });
    }
  });
  destination.onMessage((m) => {
    const cmd = String(m.execute);
    if (cmd !== 'qmp_capabilities') sent.destination.push(cmd);
    destination.send({ return: {}, id: m.id });
  });
  source.greet();
  destination.greet();
  return { source, destination, sent };
}

const spec = parseVmSpec({ name: 'vm', memoryMiB: 64, disks: [{ id: 'root', path: '/x/root.qcow2', format: 'qcow2' }, { id: 'data', path: '/x/data.raw', format: 'raw' }], boot: { kernel: '/k' }, runDir: '/x/run' });
const disk = (id: string) => ({ id, format: 'qcow2' as const, virtualSize: 1, allocatedBytes: 1, sourcePath: '/x', destinationPath: '/y', sync: 'top' as const });
const plan: Pick<MigrationPlan, 'disks'> = { disks: [disk('root'), disk('data')] };

async function setUp(opts: { mirrorError?: string } = {}) {
  const p = peers(opts);
  const sq = await connect(p.source);
  const dq = await connect(p.destination);
  const endpoint = {} as never; // never called by these steps
  const ctx = new MigrationContext({ spec, source: endpoint, destination: endpoint }, MigrationOptionsSchema.parse({ commandTimeoutMs: 2_000, progressTimeoutMs: 2_000 }));
  const caps = {} as QmpCapabilities;
  const source: SourceState = { qmp: sq, caps, wasRunning: true };
  const vm = { pid: 1, qmp: dq, exited: new Promise(() => undefined), running: () => true, kill: async () => undefined, release: async () => undefined };
  const dest: DestinationState = { spec, vm, caps, nbdPort: 1, convergence: undefined, relay: undefined };
  const ram = { sourceSince: sq.eventCursor(), destinationSince: dq.eventCursor() };
  return { ...p, ctx, source, dest, ram };
}

describe('the pause: pre-switchover to cont', () => {
  test('only the cancels (all at once), migrate-continue and nbd-server-stop; the dismissals after', async () => {
    const { ctx, source, dest, ram, sent } = await setUp();
    await sourceCompleteMirrors(ctx, { source, plan: plan as MigrationPlan });
    await sourceContinue(ctx, { source, ram });
    await destinationIncomingComplete(ctx, { dest, ram });
    await destinationStopNbdServer(ctx, dest);
    expect(sent.source).toEqual(['block-job-cancel', 'block-job-cancel', 'migrate-continue']);
    expect(sent.destination).toEqual(['nbd-server-stop']);
    // After `cont`: the completed mirrors are dismissed.
    await sourceDismissMirrors(ctx, { source, plan: plan as MigrationPlan });
    expect(sent.source.slice(3)).toEqual(['job-dismiss', 'job-dismiss']);
  });

  test("a mirror whose BLOCK_JOB_COMPLETED carries an error fails the switchover (before cont), naming the disk", async () => {
    const { ctx, source } = await setUp({ mirrorError: 'Input/output error' });
    await expect(sourceCompleteMirrors(ctx, { source, plan: plan as MigrationPlan })).rejects.toMatchObject({ code: 'MIRROR_FAILED', message: expect.stringMatching(/disk '(root|data)'.*Input\/output error/) });
  });
});
