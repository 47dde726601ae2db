/**
 * multifdChannels (issue 16, item 2): both QEMUs get the multifd capability and the same channel
 * count before the destination listens; the source's count is saved first (for the rollback and
 * a recovery) and only when multifd is asked; without it nothing of multifd is sent. Scripted
 * QMP peers for both sides.
 */
import { describe, expect, test } from 'vitest';
import { MigrationContext, type DestinationState, type SourceState } from '../../../src/engine/context.js';
import { sourcePerformRam } from '../../../src/engine/source-perform.js';
import { MigrationOptionsSchema, type MigrationEvent, type MigrationPlan } from '../../../src/engine/types.js';
import { parseVmSpec } from '../../../src/qemu/spec.js';
import type { QmpCapabilities } from '../../../src/qmp/index.js';
import { FakeQmp } from '../qmp/fake-qmp.js';
import { fakeClients } from './fake-client.js';

const connect = fakeClients();
const spec = parseVmSpec({ name: 'vm', memoryMiB: 64, disks: [{ id: 'root', path: '/x/root.qcow2', format: 'qcow2' }], boot: { kernel: '/k' }, runDir: '/x/run' });

function peer(replies: Record<string, unknown>) {
  const fake = new FakeQmp();
  const sent: { execute: string; arguments: unknown }[] = [];
  fake.onMessage((m) => {
    const cmd = String(m.execute);
    if (cmd !== 'qmp_capabilities') sent.push({ execute: cmd, arguments: m.arguments });
    fake.send({ return: replies[cmd] ?? {}, id: m.id });
  });
  fake.greet();
  return { fake, sent };
}

async function performRam(options: Record<string, unknown>) {
  const src = peer({ 'query-migrate-capabilities': [{ capability: 'multifd', state: false }, { capability: 'events', state: false }], 'query-migrate-parameters': { 'max-bandwidth': 1, 'downtime-limit': 300, 'multifd-channels': 2 } });
  const dst = peer({});
  const sq = await connect(src.fake);
  const dq = await connect(dst.fake);
  const events: MigrationEvent[] = [];
  const destination = { migrationHost: '127.0.0.1', candidatePorts: () => [20001] } as never;
  const ctx = new MigrationContext({ spec, source: {} as never, destination, onEvent: (e) => events.push(e) }, MigrationOptionsSchema.parse(options));
  const caps = { migrationCapabilities: new Set(['multifd', 'events', 'pause-before-switchover']) } as unknown as QmpCapabilities;
  const source: SourceState = { qmp: sq, caps, wasRunning: true };
  const vm = { pid: 1, qmp: dq, exited: new Promise(() => undefined), running: () => true, kill: async () => undefined, release: async () => undefined };
  const dest: DestinationState = { spec, vm, caps, nbdPort: 1, convergence: undefined, relay: undefined };
  await sourcePerformRam(ctx, { source, dest, plan: { mode: 'precopy', disks: [], bitmaps: [] } as unknown as MigrationPlan });
  return { source: src.sent, destination: dst.sent, events };
}

describe('RAM over multifd channels', () => {
  test('both sides get the capability and the count, the destination before it listens; the source count is saved', async () => {
    const { source, destination, events } = await performRam({ multifdChannels: 3 });
    expect(destination.map((m) => m.execute)).toEqual(['migrate-set-capabilities', 'migrate-set-parameters', 'migrate-incoming']);
    expect(destination[0]!.arguments).toMatchObject({ capabilities: expect.arrayContaining([{ capability: 'multifd', state: true }]) });
    expect(destination[1]!.arguments).toEqual({ 'multifd-channels': 3 });
    const setCaps = source.find((m) => m.execute === 'migrate-set-capabilities')!;
    expect(setCaps.arguments).toMatchObject({ capabilities: expect.arrayContaining([{ capability: 'multifd', state: true }]) });
    expect(source.find((m) => m.execute === 'migrate-set-parameters')!.arguments).toMatchObject({ 'multifd-channels': 3 });
    const saved = events.find((e) => e.event === 'source-saved');
    expect(saved).toMatchObject({ saved: { capabilities: expect.arrayContaining([{ capability: 'multifd', state: false }]), parameters: { 'multifd-channels': 2 } } });
  });

  test('without multifdChannels nothing of multifd is sent or saved', async () => {
    const { source, destination, events } = await performRam({});
    expect(JSON.stringify([...source, ...destination])).not.toMatch(/multifd/);
    expect(JSON.stringify(events)).not.toMatch(/multifd/);
    expect(destination.map((m) => m.execute)).toEqual(['migrate-set-capabilities', 'migrate-incoming']);
  });
});
