/**
 * Test harness for standby replicas: a replica daemon per test (stopped, by PID, after it), and
 * the checks on a replica chain: flattened with qemu-img, then the guest's records read back.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect } from 'vitest';
import { verifyDisk, type VerifyReport } from '../../src/guest/verify.js';
import { freePort } from '../../src/host/ports.js';
import type { SerialLine } from '../../src/qemu/serial.js';
import { StandbyReplica } from '../../src/replica/standby-daemon.js';
import { parseSerialLine } from '../../src/guest/serial.js';

const run = promisify(execFile);
const daemons: StandbyReplica[] = [];
const pids = new Set<number>();

export async function makeStandby(opts: { dir: string; vm: string; disks: { id: string; virtualSize: number }[]; needBytes?: number }): Promise<StandbyReplica> {
  const r = await StandbyReplica.create({ dir: opts.dir, host: '127.0.0.1', port: await freePort(), vm: opts.vm, disks: opts.disks, needBytes: opts.needBytes ?? 0 });
  track(r);
  return r;
}

/** Also a replica opened again after a restart: its daemon is stopped after the test. */
export function track(r: StandbyReplica): void {
  daemons.push(r);
  if (r.pid) pids.add(r.pid);
}

/** Stops every replica daemon a test made: quit, then SIGKILL by PID for any left. */
export async function cleanupStandbys(): Promise<void> {
  for (const r of daemons.splice(0)) {
    if (r.pid) pids.add(r.pid);
    await r.destroy({ keepFiles: true }).catch(() => undefined);
  }
  for (const pid of [...pids]) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
    pids.delete(pid);
  }
}

/** Highest acknowledged seq of a disk among serial lines that came before `beforeMono`. */
export function ackedBefore(lines: readonly SerialLine[], disk: string, beforeMono: number): number {
  let best = -1;
  for (const l of lines) {
    if (l.at >= beforeMono) continue;
    const p = parseSerialLine(l.text);
    if (p.kind === 'ack' && p.disk === disk) best = Math.max(best, p.seq);
  }
  return best;
}

/**
 * The chain ending at `top` flattened to raw and checked: every record up to `mustHave` there, and
 * the disk a prefix (records 0..h intact, none after the first missing one, up to `upTo`).
 */
export async function expectPrefixConsistent(top: string, opts: { tmp: string; disk: string; mustHave: number; upTo: number }): Promise<VerifyReport> {
  const flat = join(opts.tmp, `${opts.disk}-flat.raw`);
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, flat]);
  const report = await verifyDisk(flat, { format: 'raw', diskId: opts.disk, ackedSeq: Math.max(opts.upTo, opts.mustHave) });
  expect(report.corruptCount, JSON.stringify(report.corrupt)).toBe(0);
  expect(report.highestContiguous, 'every record acknowledged before the consistent point').toBeGreaterThanOrEqual(opts.mustHave);
  // Prefix: every record after the first missing one is missing too.
  expect(report.missingCount).toBe(Math.max(opts.upTo, opts.mustHave) - report.highestContiguous);
  if (report.highestContiguous < opts.upTo) expect(report.beyondAck).toBe(0);
  return report;
}
