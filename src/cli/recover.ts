/**
 * `migrate-vm --recover --spec VM.json --to-dir DIR`: settles what a migrate-vm that died left
 * (its watchdog died with it, or the machine went down), on both sides, from what the QEMUs report
 * (src/engine/settle-local.ts): the destinations it may have started are `DIR/run-<vm>-*`. Safe to
 * run when nothing is left: it then says so and changes nothing.
 */
import { join } from 'node:path';
import type { Logger } from '../log.js';
import { destinationRunDirs, settleLocalMigration, type SettledWhere } from '../engine/settle-local.js';
import { lazyTargetSpec } from '../engine/source-preflight.js';
import { retargetSpec, type VmSpec } from '../qemu/spec.js';

export interface RecoverIo {
  out: (line: string) => void;
  json: ((obj: Record<string, unknown>) => void) | undefined;
}

/** Exit codes of --recover, the same words as a migration's (./migrate-vm.ts EXIT). */
export const RECOVER_EXIT: Record<SettledWhere, number> = { source: 0, destination: 0, nowhere: 5, uncertain: 3 };

export async function recoverLocal(opts: { spec: VmSpec; sourceQmp: string; toDir: string; logger: Logger }, io: RecoverIo): Promise<number> {
  const runDirs = await destinationRunDirs(opts.toDir, opts.spec.name);
  const destinations = runDirs.map((runDir) => {
    // A run used one of the two layouts (pre-copy keeps the names, lazy makes .qcow2 overlays).
    const target = retargetSpec(opts.spec, { dir: opts.toDir, runDir });
    const disks = new Set([...target.disks, ...lazyTargetSpec(target).disks].map((d) => d.path));
    return { runDir, dir: opts.toDir, disks: [...disks] };
  });
  const report = await settleLocalMigration({ sourceQmp: opts.sourceQmp, destinations, fresh: false, log: opts.logger });
  for (const d of report.did) io.out(d);
  if (report.did.length === 0 && report.where === 'source') io.out('nothing to settle: no run of ferry left anything');
  io.out(`${WHERE[report.where]}${report.advice ? `: ${report.advice}` : ''}`);
  io.json?.({ event: 'recover', where: report.where, did: report.did, ...(report.advice ? { advice: report.advice } : {}), destinationsFound: runDirs.map((d) => join(d)) });
  return RECOVER_EXIT[report.where];
}

const WHERE = {
  source: 'the guest runs on the source',
  destination: 'the guest runs on the destination',
  nowhere: 'no QEMU runs the guest',
  uncertain: 'NOT SETTLED, OUTCOME UNCERTAIN',
} as const;
