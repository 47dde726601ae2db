/**
 * Lazy mode's floor (issue 11 item 3, second half): the flow ferry's lazy mode performs, driven by
 * the minimal QMP sequence and nothing else, so that ferry's time to "destination running" has
 * something to be compared with in the same run on the same machine.
 *
 *   t0           a fresh QMP connection to the source (any orchestrator needs one)
 *   source       nbd-server-start; block-export-add (read-only; allow-inactive where QEMU has it)
 *   destination  qemu-img create -u: a qcow2 overlay backed by the source's export; QEMU with
 *                -incoming defer -S; migrate-set-capabilities events + late-block-activate;
 *                migrate-incoming
 *   source       migrate-set-capabilities events (+ auto-converge); migrate-set-parameters (ferry's
 *                defaults: unlimited bandwidth, 300 ms); migrate
 *   running      destination MIGRATION completed -> cont: the time to destination running
 *
 * No preflight, no probe, no pause-before-switchover (no mirror to cancel). Every event wait is
 * registered before the command that causes it. The hydration that follows is not the floor's
 * concern: it stops at `cont` (plus a tick from the destination, to prove the guest runs there).
 */
import { execFile } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { eventIs, QmpClient, type QmpEvent } from '../src/qmp/index.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { diskNodeName, retargetSpec, type VmSpec } from '../src/qemu/spec.js';
import { backingNbdFilename } from '../src/engine/endpoint.js';
import { freePort } from '../src/host/ports.js';

const run = promisify(execFile);
const WAIT_MS = 120_000;
const DOWNTIME_LIMIT_MS = 300;

export interface LazyFloorRow {
  /** t0 (QMP connect) to `cont` returned on the destination. */
  destinationRunningMs: number;
  steps: { connectMs: number; exportMs: number; overlayMs: number; launchMs: number; migrateToCompletedMs: number; contMs: number };
  qemuDowntimeMs: number | undefined;
}

const ended = (e: QmpEvent): boolean => eventIs(e, 'MIGRATION') && ['completed', 'failed', 'cancelled'].includes(e.data.status);

/**
 * One lazy migration of `source` (running, its disk `root` in `spec`) into `destDir`, minimal QMP.
 * The caller owns the source VM; the destination QEMU is returned for it to inspect and kill.
 */
export async function lazyFloorOnce(spec: VmSpec, destDir: string, opts: { virtualSize: number; qemuBinary?: string }): Promise<{ row: LazyFloorRow; destination: VmProcess }> {
  const call = { timeoutMs: 30_000 };
  const t0 = performance.now();
  const sq = await QmpClient.connect({ path: join(spec.runDir, 'qmp.sock') }, { timeoutMs: 10_000, name: 'floor-source' });
  let dst: VmProcess | undefined;
  try {
    const tConnected = performance.now();
    const nbdPort = await freePort();
    await sq.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(nbdPort) } } }, call);
    // QEMU >= 10.0 refuses reads of an inactive node's export unless allowed (as ferry's lazy.ts).
    const major = sq.greeting.version.qemu.major;
    await sq.execute('block-export-add', { type: 'nbd', id: 'root', 'node-name': diskNodeName('root'), name: 'root', writable: false, ...(major >= 10 ? { 'allow-inactive': true } : {}) }, call);
    const tExported = performance.now();

    const destSpec = retargetSpec(spec, { dir: destDir, runDir: join(destDir, 'run') });
    await mkdir(destDir, { recursive: true });
    const overlay = join(destDir, 'root.qcow2');
    const backing = backingNbdFilename({ host: '127.0.0.1', port: nbdPort, export: 'root', reconnectDelayS: 5 });
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', backing, '-F', 'nbd', overlay, String(opts.virtualSize)]);
    const tOverlay = performance.now();
    const overlaySpec: VmSpec = { ...destSpec, disks: destSpec.disks.map((d) => ({ ...d, path: overlay, format: 'qcow2' as const })) };
    dst = await launchVm(overlaySpec, { incoming: true, startPaused: true, timeoutMs: 30_000, ...(opts.qemuBinary ? { qemuBinary: opts.qemuBinary } : {}) });
    const tLaunched = performance.now();
    const dq = dst.qmp;

    await dq.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'late-block-activate', state: true }] }, call);
    await sq.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'auto-converge', state: true }] }, call);
    await sq.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40, 'downtime-limit': DOWNTIME_LIMIT_MS }, call);
    const migPort = await freePort();
    const sinceDest = dq.eventCursor();
    await dq.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${migPort}` }, call);
    const destEnded = dq.waitForEvent(ended, { since: sinceDest, timeoutMs: WAIT_MS, what: "the destination's migration to end" });
    destEnded.catch(() => undefined);
    await sq.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` }, call);
    const end = await destEnded;
    if (!(eventIs(end, 'MIGRATION') && end.data.status === 'completed')) throw new Error(`the destination's migration ended ${JSON.stringify(end)}`);
    const tCompleted = performance.now();
    await dq.execute('cont', undefined, call);
    const tCont = performance.now();

    // Past the point the floor measures: QEMU's own downtime figure, read after.
    const mig = await sq.execute('query-migrate', undefined, call);
    return {
      destination: dst,
      row: {
        destinationRunningMs: Math.round(tCont - t0),
        steps: {
          connectMs: Math.round(tConnected - t0),
          exportMs: Math.round(tExported - tConnected),
          overlayMs: Math.round(tOverlay - tExported),
          launchMs: Math.round(tLaunched - tOverlay),
          migrateToCompletedMs: Math.round(tCompleted - tLaunched),
          contMs: Math.round(tCont - tCompleted),
        },
        qemuDowntimeMs: mig.downtime,
      },
    };
  } catch (err) {
    await dst?.kill().catch(() => undefined);
    throw err;
  } finally {
    await sq.close().catch(() => undefined);
  }
}
