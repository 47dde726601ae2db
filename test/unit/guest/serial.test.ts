import { expect, test } from 'vitest';
import { parseSerialLine, workloadAppend } from '../../../src/guest/serial.js';

test('the serial protocol, latency probes included', () => {
  expect(parseSerialLine('ack data 41')).toEqual({ kind: 'ack', disk: 'data', seq: 41 });
  expect(parseSerialLine('lat r data 1234')).toEqual({ kind: 'latency', op: 'r', disk: 'data', us: 1234 });
  expect(parseSerialLine('lat w root 87')).toEqual({ kind: 'latency', op: 'w', disk: 'root', us: 87 });
  expect(parseSerialLine('lat x data 1')).toEqual({ kind: 'other', line: 'lat x data 1' });
  expect(parseSerialLine('tick 7')).toEqual({ kind: 'tick', n: 7 });
});

test('workload kernel arguments', () => {
  expect(workloadAppend({ write: { rate: 50 }, tickMs: 20, disks: 1, probeMs: 100 })).toBe('ferry.write=50 ferry.tick=20 ferry.disks=1 ferry.probe=100');
  expect(() => workloadAppend({ probeMs: 0 })).toThrow(/probeMs must be an integer >= 1/);
});
