import type { MigrationPlan, MigrationResult, MirrorConvergence, ProgressSnapshot } from '../engine/types.js';

export function fmtBytes(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(0)} KiB`;
  return `${n} B`;
}

export function fmtMs(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60_000)}m${String(Math.round((ms % 60_000) / 1000)).padStart(2, '0')}s`;
}

function bar(fraction: number, width: number): string {
  const f = Math.max(0, Math.min(1, fraction));
  const full = Math.round(f * width);
  return `[${'#'.repeat(full)}${'.'.repeat(width - full)}]`;
}

/** One line: phase, a bar over disk + RAM bytes, what moved, rate and ETA. */
export function renderProgress(p: ProgressSnapshot, width = 24): string {
  const ramDone = p.ram ? p.ram.transferredBytes : 0;
  const ramLeft = p.ram ? p.ram.remainingBytes : 0;
  const total = p.diskTotalBytes + ramDone + ramLeft;
  const done = p.diskCopiedBytes + ramDone;
  const fraction = total > 0 ? done / total : 0;
  const parts = [
    `${p.phase.padEnd(19)}`,
    bar(fraction, width),
    `disk ${fmtBytes(p.diskCopiedBytes)}/${fmtBytes(p.diskTotalBytes)}`,
    p.ram ? `ram ${fmtBytes(ramDone)} (${fmtBytes(ramLeft)} left)` : 'ram -',
    `${fmtBytes(p.rateBytesPerSec)}/s`,
    `eta ${p.etaMs === undefined ? '-' : fmtMs(p.etaMs)}`,
  ];
  return parts.join('  ');
}

export function renderPlan(plan: MigrationPlan): string {
  const lines = [
    `plan ${plan.migrationId}: ${plan.vm} from ${plan.source} to ${plan.destination} (${plan.destinationHost})`,
    `  RAM ${fmtBytes(plan.ramBytes)}, copy mode ${plan.copyMode}, deadline ${fmtMs(plan.deadlineMs)}`,
    ...plan.disks.map(
      (d) => `  disk ${d.id}: ${d.format}, ${fmtBytes(d.virtualSize)} virtual, ${fmtBytes(d.allocatedBytes)} allocated, ${d.sourcePath} -> ${d.destinationPath}`,
    ),
  ];
  return lines.join('\n');
}

/** The mirrors' path to convergence, in words: `auto:active-sync, READY after 0.4 s, write-blocking at 0.4 s, actively-synced at 0.5 s`. */
export function renderMirrorConvergence(m: MirrorConvergence): string {
  return [
    `${m.path}, READY after ${fmtMs(m.readyMs)}`,
    ...(m.switchedAtMs === undefined ? [] : [`write-blocking at ${fmtMs(m.switchedAtMs)}`]),
    ...(m.syncedAtMs === undefined ? [] : [`actively-synced at ${fmtMs(m.syncedAtMs)}`]),
  ].join(', ');
}

export function renderSummary(r: MigrationResult): string {
  const phases = Object.entries(r.phaseMs)
    .filter(([k]) => k !== 'done')
    .map(([k, v]) => `${k} ${fmtMs(v ?? 0)}`)
    .join(', ');
  return [
    `migrated ${r.plan.vm} to ${r.plan.destination} in ${fmtMs(r.totalMs)}`,
    `  downtime ${fmtMs(r.downtimeMs)} (QEMU's own figure ${r.qemuDowntimeMs === undefined ? '-' : fmtMs(r.qemuDowntimeMs)})`,
    `  disk ${fmtBytes(r.diskBytes)} sent for ${fmtBytes(r.plan.disks.reduce((s, d) => s + d.allocatedBytes, 0))} allocated, RAM ${fmtBytes(r.ramBytes)}`,
    `  phases: ${phases}`,
    `  data path: ${r.plan.dataTls.encrypted ? `TLS, the destination admits only ${r.plan.dataTls.source.identity}, the source only ${r.plan.dataTls.destination.identity}` : `plain text (${r.plan.dataTls.reason})`}`,
    ...(r.convergence.mirrors ? [`  mirrors: ${renderMirrorConvergence(r.convergence.mirrors)}`] : []),
    `  convergence: downtime limit ${r.convergence.downtimeLimitMs} ms, ${r.convergence.steps} step(s), auto-converge ${r.convergence.autoConverge ? 'on' : 'off'}${r.convergence.forced ? ', switchover FORCED at the deadline' : ''}`,
    ...(r.lazy
      ? [`  lazy: the destination ran ${fmtMs(r.lazy.destinationRunningMs)} after the start; hydration took ${fmtMs(r.lazy.hydrationMs)} and moved ${r.lazy.hydratedWireBytes === undefined ? '(not measurable)' : fmtBytes(r.lazy.hydratedWireBytes)}`]
      : []),
    `  the guest runs on the destination; the source QEMU has exited`,
  ].join('\n');
}

/** lazy mode, after the destination runs: what is hydrated and what the source still serves. */
export function renderHydration(e: { disks: { id: string; doneBytes: number; totalBytes: number }[]; wireBytes: number | undefined; elapsedMs: number }): string {
  const done = e.disks.reduce((s, d) => s + d.doneBytes, 0);
  const total = e.disks.reduce((s, d) => s + d.totalBytes, 0);
  const pct = total > 0 ? Math.floor((100 * done) / total) : 100;
  return `hydrate ${pct}% ${fmtBytes(done)}/${fmtBytes(total)}, ${fmtBytes(Math.max(0, total - done))} left, ${e.wireBytes === undefined ? '' : `${fmtBytes(e.wireBytes)} on the wire, `}${fmtMs(e.elapsedMs)}`;
}
