/**
 * The pre-copy flow on raw QMP, in steps a test can stop between (bench/floor.ts is the same
 * sequence in one go): a destination in -incoming defer -S with NBD exports, one mirror per disk
 * from the source, then RAM with pause-before-switchover and the mirrors cancelled at
 * pre-switchover. For tests of the convergence helpers, which the engine calls at these points.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { freePort } from '../../src/host/ports.js';
import { promisify } from 'node:util';
import { startNbdRelay, type NbdRelay } from '../../src/engine/convergence/nbd-relay.js';
import { eventIs, type QmpEvent } from '../../src/qmp/index.js';
import { launchVm, type LaunchOptions, type VmProcess } from '../../src/qemu/launcher.js';
import { diskNodeName, retargetSpec, type VmSpec } from '../../src/qemu/spec.js';

const run = promisify(execFile);
const call = { timeoutMs: 30_000 };

export { freePort };

export const mirrorJob = (diskId: string): string => `mirror-${diskId}`;
const targetNode = (diskId: string): string => `nbd-${diskId}`;

export interface RawDestination {
  vm: VmProcess;
  spec: VmSpec;
  /** Where the source's NBD client connects: QEMU's NBD server, or the relay in front of it. */
  nbdPort: number;
  relay?: NbdRelay;
}

/**
 * A destination in -incoming defer -S, fresh disks of the source's sizes, each exported over NBD.
 * `relay`: QEMU's NBD server on a unix socket behind an NBD relay (src/engine/convergence).
 */
export async function startRawDestination(
  source: VmSpec,
  hostB: string,
  opts: Pick<LaunchOptions, 'bufferedDisks' | 'qemuBinary'> & { relay?: boolean } = {},
): Promise<RawDestination> {
  const spec = retargetSpec(source, { dir: hostB, runDir: join(hostB, 'run') });
  for (const [i, d] of spec.disks.entries()) {
    const { stdout } = await run('qemu-img', ['info', '--output=json', '-U', source.disks[i]!.path]);
    const size = (JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'];
    await run('qemu-img', ['create', '-q', '-f', d.format, d.path, String(size)]);
  }
  const { relay: withRelay, ...launch } = opts;
  const vm = await launchVm(spec, { incoming: true, startPaused: true, timeoutMs: 30_000, ...launch });
  let nbdPort: number;
  let relay: NbdRelay | undefined;
  if (withRelay) {
    const unixPath = join(spec.runDir, 'nbd.sock');
    await vm.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: unixPath } } }, call);
    relay = await startNbdRelay({ host: '127.0.0.1', ports: [0], unixPath });
    nbdPort = relay.port;
  } else {
    nbdPort = await freePort();
    await vm.qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(nbdPort) } } }, call);
  }
  for (const d of spec.disks) {
    await vm.qmp.execute('block-export-add', { type: 'nbd', id: d.id, 'node-name': diskNodeName(d.id), name: d.id, writable: true }, call);
  }
  return { vm, spec, nbdPort, ...(relay ? { relay } : {}) };
}

/** One background mirror per disk; returns the source's event cursor taken before them. */
export async function startRawMirrors(source: VmProcess, dest: RawDestination): Promise<number> {
  const q = source.qmp;
  for (const d of source.spec.disks) {
    await q.execute('blockdev-add', { driver: 'nbd', 'node-name': targetNode(d.id), server: { type: 'inet', host: '127.0.0.1', port: String(dest.nbdPort) }, export: d.id }, call);
  }
  const since = q.eventCursor();
  for (const d of source.spec.disks) {
    await q.execute('blockdev-mirror', { 'job-id': mirrorJob(d.id), device: diskNodeName(d.id), target: targetNode(d.id), sync: 'top', 'copy-mode': 'background', 'auto-dismiss': false }, call);
  }
  return since;
}

/** ms until every mirror is READY, or undefined when `boundMs` passes first. */
export async function readyWithin(source: VmProcess, since: number, boundMs: number): Promise<number | undefined> {
  const t0 = performance.now();
  try {
    for (const d of source.spec.disks) {
      const job = mirrorJob(d.id);
      await source.qmp.waitForEvent((e) => eventIs(e, 'BLOCK_JOB_READY') && e.data.device === job, { since, timeoutMs: Math.max(1, t0 + boundMs - performance.now()), what: `${job} READY` });
    }
    return performance.now() - t0;
  } catch {
    return undefined;
  }
}

/**
 * RAM migration to the switchover, the mirrors cancelled (completed without pivot) at
 * pre-switchover, until the destination reports completed. The destination stays paused.
 */
export async function migrateRawToCompleted(source: VmProcess, dest: RawDestination): Promise<void> {
  const sq = source.qmp;
  const dq = dest.vm.qmp;
  await sq.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'pause-before-switchover', state: true }] }, call);
  await sq.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40, 'downtime-limit': 300 }, call);
  await dq.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'late-block-activate', state: true }] }, call);
  const port = await freePort();
  const sinceDest = dq.eventCursor();
  await dq.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` }, call);
  const since = sq.eventCursor();
  await sq.execute('migrate', { uri: `tcp:127.0.0.1:${port}` }, call);
  const status = (s: string) => (e: QmpEvent): boolean => eventIs(e, 'MIGRATION') && e.data.status === s;
  const ended = (e: QmpEvent): boolean => eventIs(e, 'MIGRATION') && ['completed', 'failed', 'cancelled'].includes(e.data.status);
  const pre = await sq.waitForEvent((e) => status('pre-switchover')(e) || ended(e), { since, timeoutMs: 120_000, what: 'pre-switchover' });
  if (!status('pre-switchover')(pre)) throw new Error(`migration ended before switchover: ${JSON.stringify(pre.data)}`);
  const sinceCancel = sq.eventCursor();
  for (const d of source.spec.disks) await sq.execute('block-job-cancel', { device: mirrorJob(d.id) }, call);
  for (const d of source.spec.disks) {
    const job = mirrorJob(d.id);
    await sq.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === job && e.data.status === 'concluded', { since: sinceCancel, timeoutMs: 60_000, what: `${job} concluded` });
  }
  await sq.execute('migrate-continue', { state: 'pre-switchover' }, call);
  const end = await dq.waitForEvent(ended, { since: sinceDest, timeoutMs: 60_000, what: "the destination's migration to end" });
  if (!status('completed')(end)) throw new Error(`the destination's migration ended ${JSON.stringify(end.data)}`);
}
