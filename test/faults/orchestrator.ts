/**
 * migrate-vm as the fault harness runs it: a real process (so kill -9 and SIGTERM are real), its
 * --json event stream read line by line (a line split across chunks is joined first), the phase
 * it is in known to the harness as soon as the event arrives.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { resolve } from 'node:path';
import { z } from 'zod';

export const REPO = resolve(import.meta.dirname, '../..');

/** One line of migrate-vm --json: what the harness reads of it, the rest kept as it came. */
const EventLine = z.looseObject({ event: z.string(), phase: z.string().optional() });

export interface Orchestrator {
  child: ChildProcess;
  /** Phases in the order their events arrived, with the host time of arrival. */
  phases: { phase: string; at: number }[];
  /** True once the engine said `point-of-no-return`. */
  pastNoReturn: () => boolean;
  events: Record<string, unknown>[];
  stderr: () => string;
  /** Resolves with the exit code, or the signal's name. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Calls `fn` as soon as phase `phase` begins (at once if it already did). */
  onPhase(phase: string, fn: () => void): void;
}

export function startOrchestrator(argv: string[], opts: { env?: NodeJS.ProcessEnv; netns?: string } = {}): Orchestrator {
  const cmd = opts.netns ? ['ip', ['netns', 'exec', opts.netns, process.execPath, 'bin/migrate-vm.mjs', ...argv]] as const : [process.execPath, ['bin/migrate-vm.mjs', ...argv]] as const;
  const child = spawn(cmd[0], [...cmd[1]], { cwd: REPO, env: { ...process.env, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const phases: { phase: string; at: number }[] = [];
  const events: Record<string, unknown>[] = [];
  const waiters: { phase: string; fn: () => void }[] = [];
  let noReturn = false;
  let err = '';
  let buf = '';
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (chunk: string) => {
    buf += chunk;
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let parsed: unknown;
      try {
        parsed = JSON.parse(line);
      } catch {
        continue;
      }
      const line_ = EventLine.safeParse(parsed);
      if (!line_.success) continue;
      const ev = line_.data;
      events.push(ev);
      if (ev.event === 'point-of-no-return') noReturn = true;
      if (ev.event === 'phase' && ev.phase !== undefined) {
        const phase = ev.phase;
        phases.push({ phase, at: performance.now() });
        for (const w of waiters.splice(0)) {
          if (w.phase === phase) w.fn();
          else waiters.push(w);
        }
      }
    }
  });
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => (err = (err + d).slice(-2_000_000)));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('exit', (code, signal) => r({ code, signal })));
  return {
    child,
    phases,
    events,
    pastNoReturn: () => noReturn,
    stderr: () => err,
    exited,
    onPhase(phase, fn) {
      if (phases.some((p) => p.phase === phase)) fn();
      else waiters.push({ phase, fn });
    },
  };
}
