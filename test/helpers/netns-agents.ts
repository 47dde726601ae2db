/**
 * Agents and commands inside a test's network namespaces: run a command there, call an agent
 * from there (a separate process: the test process cannot reach the namespace's addresses), and
 * start ferry-agent there, waiting for its "listening" line. The caller kills what it started.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { resolve } from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { cleanupAll } from './guest.js';
import { createNetnsPair, type NetnsPair } from './netns.js';

const REPO = resolve(import.meta.dirname, '../..');

/** Runs argv inside namespace `ns`; resolves with exit code and output. */
export function inNs(ns: string, argv: string[], opts: { token?: string; timeoutMs?: number; env?: Record<string, string> } = {}): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  return new Promise((resolveRun) => {
    const child = spawn('ip', ['netns', 'exec', ns, ...argv], { cwd: REPO, env: { ...process.env, FERRY_TOKEN: opts.token ?? '', FERRY_LOG_LEVEL: 'warn', ...opts.env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolveRun({ code, stdout, stderr });
    });
  });
}

export async function call(ns: string, url: string, token: string, method: string, params: Record<string, unknown> = {}): Promise<unknown> {
  const r = await inNs(ns, ['node', '--import', 'tsx', 'test/helpers/agent-call.ts', url, method, JSON.stringify(params)], { token, timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`${method} on ${url} failed: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as unknown;
}

/** Starts ferry-agent in `ns` and waits for its "listening" line; the child goes into `started`. */
export async function startAgentIn(ns: string, config: string, started: ChildProcess[]): Promise<ChildProcess> {
  return startBinIn(ns, 'bin/ferry-agent.mjs', config, started);
}

/** Starts a ferry bin that takes `--config` (an agent, a scheduler) in `ns`, once it says it is listening. */
export async function startBinIn(ns: string, bin: string, config: string, started: ChildProcess[]): Promise<ChildProcess> {
  const child = spawn('ip', ['netns', 'exec', ns, 'node', bin, '--config', config], { cwd: REPO, env: { ...process.env, FERRY_LOG_LEVEL: 'info' }, stdio: ['ignore', 'pipe', 'pipe'] });
  started.push(child);
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
  await new Promise<void>((ready, fail) => {
    const timer = setTimeout(() => fail(new Error(`${bin} in ${ns} did not start: ${err}`)), 30_000);
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('listening on')) {
        clearTimeout(timer);
        ready();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      fail(new Error(`${bin} in ${ns} exited (${code}): ${err}`));
    });
  });
  return child;
}


/**
 * A test file's namespaces and agents: made before its tests (when the machine can), and in
 * afterAll every agent killed and the namespaces removed (which kills what the agents started
 * there), then the file's QEMUs and temp folders; also when a test failed.
 */
export function useNetnsAgents(opts: Parameters<typeof createNetnsPair>[0], canRun: boolean): { pair: () => NetnsPair; agents: ChildProcess[] } {
  let pair: NetnsPair | undefined;
  const agents: ChildProcess[] = [];
  beforeAll(async () => {
    if (canRun) pair = await createNetnsPair(opts);
  }, 30_000);
  afterAll(async () => {
    for (const a of agents) a.kill('SIGKILL');
    await pair?.remove();
    await cleanupAll();
  }, 30_000);
  return {
    pair: () => {
      if (!pair) throw new Error('no network namespaces on this machine');
      return pair;
    },
    agents,
  };
}
