import { expect, test } from 'vitest';
import { SerialConsole } from '../../../src/qemu/serial.js';

test('lines survive being split at every byte, CRLF and UTF-8 included', () => {
  const text = 'ferry-ready\r\nack d0 12\ntické 3\n' + 'x'.repeat(300) + '\npartial';
  const bytes = Buffer.from(text, 'utf8');
  for (let cut = 1; cut < bytes.length; cut++) {
    const c = new SerialConsole();
    c.push(bytes.subarray(0, cut), 1);
    c.push(bytes.subarray(cut), 2);
    expect(c.history().map((l) => l.text)).toEqual(['ferry-ready', 'ack d0 12', 'tické 3', 'x'.repeat(300)]);
  }
});

test('waitForLine sees lines already received, honours since, and times out naming what it waited for', async () => {
  const c = new SerialConsole();
  c.push('tick 1\ntick 2\n');
  await expect(c.waitForLine((l) => l.text === 'tick 1', { timeoutMs: 10 })).resolves.toMatchObject({ text: 'tick 1' });
  const since = c.cursor();
  const later = c.waitForLine((l) => l.text.startsWith('tick'), { timeoutMs: 1000, since });
  c.push('tick 3\n');
  await expect(later).resolves.toMatchObject({ text: 'tick 3' });
  await expect(c.waitForLine(() => false, { timeoutMs: 10, what: 'godot' })).rejects.toThrow(/waiting for godot; last line: tick 3/);
});
