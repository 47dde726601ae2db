/** The guest workload's serial protocol (images/guest/ferry-guest.c) and its kernel arguments. */
export type SerialMessage =
  | { kind: 'ready' }
  | { kind: 'ack'; disk: string; seq: number }
  | { kind: 'tick'; n: number }
  | { kind: 'full'; disk: string }
  | { kind: 'error'; text: string }
  /** ferry.probe: a timed 4 KiB read (r) or an acked write+fdatasync (w), in microseconds. */
  | { kind: 'latency'; op: 'r' | 'w'; disk: string; us: number }
  | { kind: 'other'; line: string };

export function parseSerialLine(line: string): SerialMessage {
  const t = line.trim();
  if (t === 'ferry-ready') return { kind: 'ready' };
  let m = /^ack ([a-z][a-z0-9-]{0,15}) (\d+)$/.exec(t);
  if (m) return { kind: 'ack', disk: m[1]!, seq: Number(m[2]) };
  m = /^tick (\d+)$/.exec(t);
  if (m) return { kind: 'tick', n: Number(m[1]) };
  m = /^full ([a-z][a-z0-9-]{0,15})$/.exec(t);
  if (m) return { kind: 'full', disk: m[1]! };
  m = /^lat ([rw]) ([a-z][a-z0-9-]{0,15}) (\d+)$/.exec(t);
  if (m) return { kind: 'latency', op: m[1] as 'r' | 'w', disk: m[2]!, us: Number(m[3]) };
  m = /^ferry-error (.*)$/.exec(t);
  if (m) return { kind: 'error', text: m[1]! };
  return { kind: 'other', line };
}

export interface Workload {
  /** Writes per second per disk; 0 = as fast as the guest can. */
  write?: { rate: number; ackEvery?: number };
  tickMs?: number;
  dirty?: { mib: number; mibPerSec: number };
  /** Wait for this many virtio disks before starting. */
  disks?: number;
  /** Time a random 4 KiB read of each disk every this many ms, and the writer's acked writes. */
  probeMs?: number;
}

/** The `ferry.*` kernel arguments that configure the guest workload. */
export function workloadAppend(w: Workload): string {
  const args: string[] = [];
  const int = (name: string, v: number, min: number): number => {
    if (!Number.isInteger(v) || v < min) throw new RangeError(`workload ${name} must be an integer >= ${min}, got ${v}`);
    return v;
  };
  if (w.write) {
    args.push(`ferry.write=${int('write.rate', w.write.rate, 0)}`);
    if (w.write.ackEvery !== undefined) args.push(`ferry.ack=${int('write.ackEvery', w.write.ackEvery, 1)}`);
  }
  if (w.tickMs !== undefined) args.push(`ferry.tick=${int('tickMs', w.tickMs, 1)}`);
  if (w.dirty) args.push(`ferry.dirty=${int('dirty.mib', w.dirty.mib, 1)}:${int('dirty.mibPerSec', w.dirty.mibPerSec, 0)}`);
  if (w.disks !== undefined) args.push(`ferry.disks=${int('disks', w.disks, 0)}`);
  if (w.probeMs !== undefined) args.push(`ferry.probe=${int('probeMs', w.probeMs, 1)}`);
  return args.join(' ');
}

/** Highest acknowledged sequence per disk over lines from any number of consoles. */
export function highestAcks(lines: Iterable<{ text: string }>): Map<string, number> {
  const out = new Map<string, number>();
  for (const l of lines) {
    const p = parseSerialLine(l.text);
    if (p.kind === 'ack') out.set(p.disk, Math.max(out.get(p.disk) ?? -1, p.seq));
  }
  return out;
}
