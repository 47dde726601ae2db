import { describe, expect, test } from 'vitest';
import { WireCounter } from '../../../src/engine/wire-counter.js';
import { bytesReceivedByPid } from '../../../src/host/wire.js';

// `ss -tinpH state established dst 127.0.0.1:31877` with the destination QEMU (pid 4242) holding
// two connections (one from before a reconnect) and another reader (pid 77) one.
const SS = [
  '0      0      127.0.0.1:50100 127.0.0.1:31877 users:(("qemu-system-x86",pid=4242,fd=21))',
  '\t bbr wscale:10,10 rto:208 bytes_sent:900 bytes_acked:901 bytes_received:1000000 segs_out:8',
  '0      0      127.0.0.1:50102 127.0.0.1:31877 users:(("qemu-io",pid=77,fd=5))',
  '\t bbr wscale:10,10 rto:208 bytes_sent:100 bytes_acked:101 bytes_received:33554432 segs_out:8',
  '0      0      127.0.0.1:50104 127.0.0.1:31877 users:(("qemu-system-x86",pid=4242,fd=22))',
  '\t bbr wscale:10,10 rto:208 bytes_sent:900 bytes_acked:901 bytes_received:2500 segs_out:8',
  '',
].join('\n');

describe('bytes received by one process', () => {
  test("sums the process's own sockets and no other reader's", () => {
    expect(bytesReceivedByPid(SS, 4242)).toBe(1_002_500);
    expect(bytesReceivedByPid(SS, 77)).toBe(33_554_432);
  });

  test('a pid that is only a prefix of another does not match, and none at all is "cannot tell"', () => {
    expect(bytesReceivedByPid(SS, 424)).toBeUndefined();
    expect(bytesReceivedByPid('', 4242)).toBeUndefined();
  });
});

describe('WireCounter', () => {
  test('counts from start(), and keeps what a connection carried when a reconnect starts from zero', async () => {
    const readings = [500, 700, 1_500, 200, 900];
    const resets: [number, number][] = [];
    const c = new WireCounter(async () => readings.shift(), (before, now) => resets.push([before, now]));
    await c.start(); // 500 were there before
    await c.sample(); // 700
    await c.sample(); // 1500
    expect(c.bytes()).toBe(1_000);
    await c.sample(); // 200: a new socket
    await c.sample(); // 900
    expect(resets).toEqual([[1_500, 200]]);
    expect(c.bytes()).toBe(1_500 + 900 - 500);
  });

  test('a host that cannot tell gives undefined, not zero', async () => {
    const c = new WireCounter(async () => undefined);
    await c.start();
    await c.sample();
    expect(c.bytes()).toBeUndefined();
  });
});
