/**
 * Copy mode auto, the default, through the engine (issue 11), on the QEMU the launcher picks
 * (the system's 7.2, or FERRY_QEMU: the 10.0 leg runs this file too):
 *   - QEMU < 8.0: the destination's NBD server behind the TCP_NODELAY relay: a guest writing 200
 *     records/s into an O_DIRECT (`cache: none`) destination has its mirror READY within the
 *     bound, where plain background on 7.2 takes 4-8x as long (bench/mirror-ready.ts; run this
 *     file with FERRY_TEST_COPY_MODE=background to see the bound fail);
 *   - QEMU >= 8.2: background, then block-job-change to write-blocking, then actively-synced;
 *   - the same through agents (the relay is the destination agent's, dest.startNbdRelay).
 * Each run loses no acknowledged write, leaves no "Permission conflict" in the destination's
 * qemu.log (the NBD server stops before `cont`) and no relay listening.
 */
import { readdir, readFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterEach, beforeAll, expect, test } from 'vitest';
import { AgentClient, AgentDestination } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import type { MigrationResult, MigrationOptionsInput } from '../../src/engine/types.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { highestAcks, parseSerialLine } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { defaultQemuBinary, type VmProcess } from '../../src/qemu/launcher.js';
import { probeQemuBinary } from '../../src/qemu/versions.js';
import { bootWorkloadGuest, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';

/**
 * As in convergence.test.ts. Measured here on 7.2 (2 runs each, a quieter machine): auto 0.32-0.39 s;
 * FERRY_TEST_COPY_MODE=background 1.2, 3.3 and 4.4 s (so it fails this bound in some runs, not all:
 * plain 7.2 is slow, not stuck); the previous measurements under load: relay 0.7-1.4 s, plain 2.8-7.2 s.
 */
const READY_BOUND_MS = 2_500;
const copyMode = (process.env.FERRY_TEST_COPY_MODE ?? 'auto') as NonNullable<MigrationOptionsInput['copyMode']>;
let major = 0;
let minor = 0;
const pids: number[] = [];
let agent: RunningAgent | undefined;

beforeAll(async () => {
  const build = await probeQemuBinary(defaultQemuBinary(), { timeoutMs: 20_000 });
  ({ major, minor } = build.version);
});

afterEach(async () => {
  await agent?.close();
  agent = undefined;
  killPids(pids.splice(0));
  await cleanupAll();
});

function expectedPath(): string {
  if (major < 8) return 'auto:background+relay';
  return major > 8 || minor >= 2 ? 'auto:active-sync' : 'auto:background';
}

async function ackBeyond(vm: VmProcess, seq: number): Promise<void> {
  await vm.serial.waitForLine((l) => { const p = parseSerialLine(l.text); return p.kind === 'ack' && p.seq > seq; }, { timeoutMs: 30_000, what: `an ack beyond ${seq}` });
}

function refused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host: '127.0.0.1', port });
    s.once('connect', () => { s.destroy(); resolve(false); });
    s.once('error', () => resolve(true));
  });
}

function expectConverged(result: MigrationResult): void {
  const m = result.convergence.mirrors;
  console.log(`mirrors: ${JSON.stringify(m)} (QEMU ${major}.${minor})`);
  expect(m?.path, `QEMU ${major}.${minor}`).toBe(copyMode === 'auto' ? expectedPath() : copyMode);
  expect(m!.readyMs, `mirror READY within ${READY_BOUND_MS} ms (took ${m!.readyMs} ms on ${m!.path})`).toBeLessThan(READY_BOUND_MS);
  if (m!.path.startsWith('auto:active-sync')) {
    expect(m!.switchedAtMs).toBeGreaterThanOrEqual(0);
    // actively-synced is watched beside the RAM phase; a switchover that comes first leaves it unset.
    if (m!.syncedAtMs !== undefined) expect(m!.syncedAtMs).toBeGreaterThanOrEqual(m!.switchedAtMs!);
  }
}

const writingGuest = { disks: [{ id: 'root', format: 'qcow2' as const, size: 256 << 20, fillMiB: 64 }], workload: { write: { rate: 200 }, tickMs: 20 } };

test('auto: a guest writing 200 records/s into an O_DIRECT destination converges within the bound; nothing lost', { timeout: 240_000 }, async () => {
  const { vm, spec, hostB } = await bootWorkloadGuest(writingGuest);
  expect(spec.disks[0]!.cache).toBe('none');
  await ackBeyond(vm, 100);
  const dest = new LocalDestination({ dir: hostB });
  const events: string[] = [];
  const result = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }), destination: dest, options: { copyMode }, onEvent: (e) => { if (e.event === 'convergence') events.push(e.action); } });
  expectConverged(result);
  expect(events).toContain('mirrors-converged');
  await vm.exited;
  const b = dest.incoming!.process;
  const acked = highestAcks(vm.serial.history()).get('root') ?? -1;
  await ackBeyond(b, acked + 20);
  if (result.convergence.mirrors!.relay) expect(await refused(nbdPortOf(result))).toBe(true);
  const runDir = (await readdir(hostB)).find((f) => f.startsWith('run-'))!;
  expect(await readFile(join(hostB, runDir, 'qemu.log'), 'utf8')).not.toMatch(/Permission conflict/);
  await b.quit({ timeoutMs: 10_000 });
  const report = await verifyDisk(join(hostB, 'root.qcow2'), { format: 'qcow2', diskId: 'root', ackedSeq: acked });
  expect(report, `records 0..${acked}: ${report.missingCount} missing, ${report.corruptCount} corrupt`).toMatchObject({ ok: true });
});

test('auto through an agent: the relay is the agent\'s (dest.startNbdRelay); converges; nothing lost; the relay is gone', { timeout: 240_000 }, async () => {
  const root = await makeTempDir('ferry-agent-root-');
  agent = await startAgent({ name: 'hostB', listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { 'token-of-alice-0123456789': 'alice' } });
  const { vm, spec } = await bootWorkloadGuest(writingGuest);
  await ackBeyond(vm, 100);
  const dest = await AgentDestination.connect(agent.url, 'token-of-alice-0123456789');
  const result = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }), destination: dest, options: { copyMode } });
  expectConverged(result);
  await vm.exited;
  const client = await AgentClient.connect(agent.url, 'token-of-alice-0123456789');
  const [listed] = (await client.call('vm.list')) as { vmId: string; pid: number; running: boolean }[];
  pids.push(listed!.pid);
  expect(listed).toMatchObject({ vmId: dest.vmId, running: true });
  if (result.convergence.mirrors!.relay) expect(await refused(nbdPortOf(result))).toBe(true);
  await client.call('dest.kill', { vmId: dest.vmId! });
  const acked = highestAcks(vm.serial.history()).get('root')!;
  const report = await verifyDisk(join(root, spec.name, 'root.qcow2'), { format: 'qcow2', diskId: 'root', ackedSeq: acked });
  expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  client.close();
  dest.close();
});

/** The port the mirrors wrote to (the relay's, behind a relay). */
function nbdPortOf(result: MigrationResult): number {
  const port = result.convergence.mirrors?.nbdPort;
  expect(port).toBeGreaterThan(0);
  return port!;
}
