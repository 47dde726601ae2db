import { expect, test } from 'vitest';
import { UndoStack } from '../../../src/engine/undo.js';

function stack(log: string[]): UndoStack {
  const u = new UndoStack();
  u.push('remove disk', 'destination', async () => void log.push('remove disk'));
  u.push('stop destination', 'destination', async () => void log.push('stop destination'));
  u.push('delete nbd node', 'source', async () => {
    log.push('delete nbd node');
    throw new Error('node busy');
  });
  u.push('resume source', 'source', async () => void log.push('resume source'));
  return u;
}

test('runs newest first; a failing step is reported and the rest still run', async () => {
  const log: string[] = [];
  const reported: [string, boolean][] = [];
  const errors = await stack(log).runAll((step, err) => reported.push([step, !err]));
  expect(log).toEqual(['resume source', 'delete nbd node', 'stop destination', 'remove disk']);
  expect(reported).toEqual([
    ['resume source', true],
    ['delete nbd node', false],
    ['stop destination', true],
    ['remove disk', true],
  ]);
  expect(errors.map((e) => (e as Error).message)).toEqual(['delete nbd node: node busy']);
});

test('runNow takes one step out of order, once', async () => {
  const log: string[] = [];
  const u = stack(log);
  await u.runNow('stop destination', () => undefined);
  await u.runNow('stop destination', () => undefined);
  await u.runAll(() => undefined);
  expect(log).toEqual(['stop destination', 'resume source', 'delete nbd node', 'remove disk']);
});

test('past the point of no return, dropSide forgets what would touch a side', async () => {
  const log: string[] = [];
  const u = stack(log);
  u.dropSide('source');
  u.drop('remove disk');
  expect(u.size).toBe(1);
  await u.runAll(() => undefined);
  expect(log).toEqual(['stop destination']);
});
