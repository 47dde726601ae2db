/**
 * The rollback's yank (source-yank.ts) picks only ferry's NBD client nodes and the migration out of
 * what query-yank lists, and asks for nothing a QEMU without yank (< 6.0) or without those
 * instances would refuse.
 */
import { expect, test } from 'vitest';
import { destinationYankInstances, sourceYankDestination } from '../../../src/engine/source-yank.js';
import { QmpCommandError, type QmpCapabilities, type QmpClient } from '../../../src/qmp/index.js';

// query-yank of QEMU 10.0 during a mirror and a migration (recorded), plus a chardev.
const LISTED = [{ type: 'block-node', 'node-name': 'ferry-nbd-data' }, { type: 'block-node', 'node-name': 'file-data' }, { type: 'migration' }, { type: 'chardev', id: 'serial0' }];

test('only ferry NBD nodes and the migration are yanked', () => {
  expect(destinationYankInstances(LISTED)).toEqual([{ type: 'block-node', 'node-name': 'ferry-nbd-data' }, { type: 'migration' }]);
  expect(destinationYankInstances([{ type: 'chardev', id: 'monitor0' }])).toEqual([]);
  expect(() => destinationYankInstances({ return: [] })).toThrow();
});

function fakeQmp(listed: unknown): { q: QmpClient; sent: [string, unknown][] } {
  const sent: [string, unknown][] = [];
  const q = {
    executeRaw: async (command: string, args?: unknown): Promise<unknown> => {
      sent.push([command, args]);
      return command === 'query-yank' ? listed : {};
    },
  } as unknown as QmpClient;
  return { q, sent };
}
const caps = (commands: string[]): QmpCapabilities => ({ hasCommand: (c: string) => commands.includes(c) }) as unknown as QmpCapabilities;

test('yank is sent with exactly the listed instances, and not at all without them or the command', async () => {
  const a = fakeQmp(LISTED);
  expect(await sourceYankDestination(a.q, caps(['yank', 'query-yank']), { timeoutMs: 1_000 })).toHaveLength(2);
  expect(a.sent).toEqual([['query-yank', undefined], ['yank', { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-data' }, { type: 'migration' }] }]]);
  const b = fakeQmp([{ type: 'chardev', id: 'serial0' }]);
  expect(await sourceYankDestination(b.q, caps(['yank', 'query-yank']), { timeoutMs: 1_000 })).toEqual([]);
  expect(b.sent.map(([c]) => c)).toEqual(['query-yank']);
  const c = fakeQmp(LISTED);
  expect(await sourceYankDestination(c.q, caps([]), { timeoutMs: 1_000 })).toEqual([]);
  expect(c.sent).toEqual([]);
});

test('with OOB the yank names each instance blindly, out-of-band, one per command; a refusal of one is not a failure', async () => {
  const sent: [string, unknown][] = [];
  const q = {
    oob: true,
    executeRaw: async (): Promise<unknown> => {
      throw new Error('in-band must not be used: the main loop may be the thing that waits');
    },
    executeOob: async (command: string, args: { instances: { type: string; 'node-name'?: string }[] }): Promise<unknown> => {
      sent.push([command, args]);
      if (args.instances[0]?.['node-name'] === 'ferry-nbd-gone') throw new QmpCommandError('yank', 'DeviceNotFound', 'Instance not found');
      return {};
    },
  } as unknown as QmpClient;
  const yanked = await sourceYankDestination(q, caps(['yank']), { timeoutMs: 1_000, diskIds: ['data', 'gone'] });
  expect(yanked).toEqual([{ type: 'migration' }, { type: 'block-node', 'node-name': 'ferry-nbd-data' }]);
  expect(sent.map(([, a]) => a)).toEqual([
    { instances: [{ type: 'migration' }] },
    { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-data' }] },
    { instances: [{ type: 'block-node', 'node-name': 'ferry-nbd-gone' }] },
  ]);
});

test('an OOB yank that no instance answered (a broken session) is a failure', async () => {
  const q = { oob: true, executeOob: async (): Promise<unknown> => Promise.reject(new Error('session closed')) } as unknown as QmpClient;
  await expect(sourceYankDestination(q, caps(['yank']), { timeoutMs: 1_000, diskIds: ['data'] })).rejects.toThrow('session closed');
});
