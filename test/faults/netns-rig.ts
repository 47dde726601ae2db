/**
 * The netns rig: two ferry-agent processes, each in its own network namespace joined by a veth
 * pair (test/helpers/netns.ts), made once per run and shared by its cells (each cell its own VM
 * name). migrate-vm runs in A's namespace, `--from ws://A --to ws://B`, as a real process.
 * Faults: kill -9 of either agent (started again 2 s later, as systemd's Restart= would), the
 * link cut (veth down) and restored after 1-4 s or for good (restored once migrate-vm ended, so
 * the harness can look), and a very slow link (tc tbf 1 Mbit/s) against a 20 s deadline.
 *
 * The agents hold their VMs' monitors, so a VM's run state is read off its serial console: it
 * printed a new tick in the last 400 ms (running), its QEMU lives (paused), or not (gone).
 */
import { execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { z } from 'zod';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { QmpClient } from '../../src/qmp/index.js';
import { agentGuestSpec } from '../helpers/guest.js';
import { createNetnsPair, type NetnsPair } from '../helpers/netns.js';
import { call, startAgentIn } from '../helpers/netns-agents.js';
import { cellId, PHASE_WINDOW_MS, rng, type Cell, type Outcome } from './cells.js';
import { cellResult, expectedFor, KEPT_LOG, pidsNaming, qemuLeftovers, type CellResult } from './local-rig.js';
import { startOrchestrator, type Orchestrator } from './orchestrator.js';
import { runDirsUnder, Sampler } from './sampler.js';
import { actualOutcome, claimOf, judge } from './verdict.js';

const run = promisify(execFile);
const TOKEN = 'fault-matrix-token-0123456789abcdef';
const PORT = 7420;

function kill(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, sig);
  } catch {
    // gone already
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The pid in a run dir's qemu.pid, when that process still lives (and is no zombie). */
async function livePid(runDir: string): Promise<number | undefined> {
  const pid = Number((await readFile(join(runDir, 'qemu.pid'), 'utf8').catch(() => '')).trim());
  if (!(pid > 0)) return undefined;
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return stat && !/^\d+ \(.*\) Z/.test(stat) ? pid : undefined;
}

export class NetnsRig {
  readonly #agents: ChildProcess[] = [];
  #agentA: ChildProcess | undefined;
  #agentB: ChildProcess | undefined;
  #n = 0;

  private constructor(
    readonly pair: NetnsPair,
    readonly roots: [string, string],
    readonly configs: [string, string],
    readonly base: string,
  ) {}

  static async create(): Promise<NetnsRig> {
    const base = await mkdtemp(join(tmpdir(), 'ferry-fault-netns-'));
    const pair = await createNetnsPair({});
    try {
      const roots: [string, string] = [join(base, 'root-a'), join(base, 'root-b')];
      const configs: [string, string] = [join(base, 'agent-a.json'), join(base, 'agent-b.json')];
      for (const i of [0, 1] as const) {
        await run('mkdir', ['-p', roots[i]]);
        const ip = pair.addresses[i];
        await writeFile(configs[i], JSON.stringify({ name: `host${'AB'[i]}`, listenHost: ip, listenPort: PORT, storageRoot: roots[i], bootRoots: [IMAGE_DIR], tokens: { [TOKEN]: 'ops' }, migrationHost: ip, portRange: [21000, 21100] }));
      }
      const rig = new NetnsRig(pair, roots, configs, base);
      rig.#agentA = await startAgentIn(pair.names[0], configs[0], rig.#agents);
      rig.#agentB = await startAgentIn(pair.names[1], configs[1], rig.#agents);
      return rig;
    } catch (err) {
      await pair.remove();
      await rm(base, { recursive: true, force: true });
      throw err;
    }
  }

  async close(): Promise<void> {
    for (const a of this.#agents) a.kill('SIGKILL');
    await this.pair.remove();
    for (const root of this.roots) for (const p of await pidsNaming(root)) kill(p);
    await sleep(200);
    await rm(this.base, { recursive: true, force: true });
    const ns = await run('ip', ['netns', 'list']).then((r) => r.stdout, () => '');
    if (this.pair.names.some((n) => ns.includes(n))) throw new Error(`debris: network namespace ${this.pair.names.join('/')} left`);
  }

  get urls(): [string, string] {
    return [`ws://${this.pair.addresses[0]}:${PORT}`, `ws://${this.pair.addresses[1]}:${PORT}`];
  }

  async #restartAgent(side: 0 | 1): Promise<void> {
    const a = side === 0 ? this.#agentA : this.#agentB;
    if (a && a.exitCode === null && a.signalCode === null) return;
    const fresh = await startAgentIn(this.pair.names[side], this.configs[side], this.#agents);
    if (side === 0) this.#agentA = fresh;
    else this.#agentB = fresh;
  }

  async #link(up: boolean): Promise<void> {
    for (const i of [0, 1] as const) await run('ip', ['-n', this.pair.names[i], 'link', 'set', this.pair.veths[i], up ? 'up' : 'down']);
  }

  async #shape(rateMbit: number | undefined): Promise<void> {
    for (const i of [0, 1] as const) {
      const args = ['netns', 'exec', this.pair.names[i], 'tc', 'qdisc'];
      if (rateMbit === undefined) await run('ip', [...args, 'del', 'dev', this.pair.veths[i], 'root']).catch(() => undefined);
      else await run('ip', [...args, 'replace', 'dev', this.pair.veths[i], 'root', 'tbf', 'rate', `${rateMbit}mbit`, 'burst', '32kb', 'latency', '400ms']);
    }
  }

  async runCell(cell: Cell, seed: number): Promise<CellResult> {
    const t0 = performance.now();
    const rand = rng(seed, cellId(cell));
    const offsetMs = Math.floor(rand() * PHASE_WINDOW_MS[cell.phase]);
    const name = `f${++this.#n}`;
    const [nsA] = this.pair.names;
    const [urlA, urlB] = this.urls;
    const dirA = join(this.roots[0], name);
    const dirB = join(this.roots[1], name);
    const notes: string[] = [];
    const problems: string[] = [];
    let hitPhase: string | undefined;
    let exit = 'none';
    let outcome: Outcome = 'uncertain';
    let expected: readonly Outcome[] = [];
    let orch: Orchestrator | undefined;
    let sampler: Sampler | undefined;
    let linkDown = false;
    let shaped = false;
    try {
      await this.#restartAgent(0);
      await this.#restartAgent(1);
      const { spec } = await agentGuestSpec(this.roots[0], name, { memoryMiB: 128, diskMiB: 32, fillMiB: 8, rate: 50, tickMs: 50 });
      await call(nsA, urlA, TOKEN, 'vm.create', { spec });
      await call(nsA, urlA, TOKEN, 'vm.start', { name });
      const runA = join(dirA, 'run');
      // Ticks say running; a QEMU alive without them, paused; no QEMU, gone.
      const state = (side: 'source' | 'destination', dirs: () => Promise<string[]>) => async (): Promise<string> => {
        let alive = false;
        for (const d of await dirs()) if ((await livePid(d)) !== undefined) alive = true;
        if (!alive) return 'gone';
        return performance.now() - sampler!.lastTickAt[side] < 400 ? 'running' : 'paused';
      };
      const srcDirs = async (): Promise<string[]> => [runA];
      const dstDirs = (): Promise<string[]> => runDirsUnder(dirB);
      sampler = new Sampler({ runDirs: srcDirs, status: state('source', srcDirs) }, { runDirs: dstDirs, status: state('destination', dstDirs) }, false);
      sampler.start();
      for (let i = 0; i < 300 && (sampler.acks.get('data') ?? -1) < 5; i++) await sleep(100);
      if ((sampler.acks.get('data') ?? -1) < 5) throw new Error(`guest ${name} acked no writes on host A`);

      const slow = cell.fault === 'slow-link';
      const argv = ['--from', urlA, '--to', urlB, name, '--json', '--bandwidth', '16M', '--progress-timeout', slow ? '10' : '20', '--timeout', slow ? '20' : '90'];
      const o = startOrchestrator(argv, { netns: nsA, env: { FERRY_TOKEN: TOKEN, FERRY_LOG_LEVEL: process.env.FERRY_FAULT_LOG_LEVEL ?? 'warn' } });
      orch = o;
      const cutS = 1 + Math.floor(rand() * 4);
      let injected: Promise<void> | undefined;
      const inject = async (): Promise<void> => {
        hitPhase = o.phases.at(-1)?.phase;
        switch (cell.fault) {
          case 'kill-source-agent':
          case 'kill-destination-agent': {
            const side = cell.fault === 'kill-source-agent' ? 0 : 1;
            kill((side === 0 ? this.#agentA : this.#agentB)?.pid);
            await sleep(2_000);
            await this.#restartAgent(side);
            notes.push('agent started again after 2 s');
            break;
          }
          case 'link-cut-restore':
            linkDown = true;
            await this.#link(false);
            await sleep(cutS * 1000);
            await this.#link(true);
            linkDown = false;
            notes.push(`link cut for ${cutS} s`);
            break;
          case 'link-cut-forever':
            linkDown = true;
            await this.#link(false);
            break;
          case 'slow-link':
            shaped = true;
            await this.#shape(1);
            break;
          default:
            throw new Error(`the netns rig has no fault ${cell.fault}`);
        }
      };
      o.onPhase(cell.phase, () => {
        injected = sleep(offsetMs).then(inject);
      });
      const timeout = setTimeout(() => {
        problems.push('migrate-vm did not end within 200 s: killed');
        kill(o.child.pid);
      }, 200_000);
      const ended = await o.exited;
      clearTimeout(timeout);
      await injected;
      if (!injected) problems.push(`phase ${cell.phase} never began (phases seen: ${o.phases.map((p) => p.phase).join(' → ')})`);
      exit = ended.signal ?? String(ended.code);
      // The fault ends (the link comes back, the rate limit goes) so the harness can look.
      if (linkDown) {
        await this.#link(true);
        linkDown = false;
      }
      if (shaped) {
        await this.#shape(undefined);
        shaped = false;
      }
      await this.#restartAgent(0);
      await this.#restartAgent(1);
      // An agent that lost its orchestrator settles its side on its own: give it a moment.
      const settled = (): boolean => {
        const l = sampler!.last();
        return !!l && ((l.source === 'running' && l.destination === 'gone') || (l.destination === 'running' && l.source === 'gone') || (l.source === 'gone' && l.destination === 'gone'));
      };
      // After a cut, agent B learns the orchestrator is gone from its heartbeat (20 s without a pong).
      const cut = cell.fault.startsWith('link-cut');
      for (let i = 0; i < (cut ? 300 : 150) && !settled(); i++) await sleep(100);
      await sleep(800);
      await sampler.stop();
      const last = sampler.last()!;
      outcome = actualOutcome({ source: last.source, destination: last.destination }, sampler.ticks.destination.size > 0);
      expected = expectedFor(cell, hitPhase);

      const debris: string[] = [];
      const srcPid = await livePid(runA);
      const dstDirsNow = await runDirsUnder(dirB);
      const dstPids = (await Promise.all(dstDirsNow.map(livePid))).filter((p): p is number => p !== undefined);
      const allowed = new Set([...(srcPid !== undefined && last.source !== 'gone' ? [srcPid] : []), ...(last.destination !== 'gone' ? dstPids.slice(0, 1) : [])]);
      const qemus = [...(await pidsNaming(dirA + '/')), ...(await pidsNaming(dirB + '/'))];
      const stray = qemus.filter((p) => !allowed.has(p));
      if (stray.length) debris.push(`QEMU process(es) ${stray.join(', ')} left running`);
      if (srcPid !== undefined && outcome === 'source') {
        const q = await QmpClient.connect({ path: join(runA, 'qmp.sock') }, { timeoutMs: 5_000, name: 'fault-debris' }).catch(() => undefined);
        if (q) {
          debris.push(...(await qemuLeftovers(q, 'source')));
          await q.close();
        } else debris.push("source: its QMP socket does not answer (someone still holds it)");
      }
      const bFiles = (await readdir(dirB).catch(() => [] as string[])).filter((f) => !KEPT_LOG.test(f));
      if ((outcome === 'source' || outcome === 'nowhere') && bFiles.length) debris.push(`host B still holds ${name}/${bFiles.join(`, ${name}/`)}`);
      const listed = z.array(z.looseObject({ name: z.string(), role: z.string().optional() })).safeParse(await call(nsA, urlB, TOKEN, 'vm.list').catch(() => []));
      const listedB = (listed.success ? listed.data : []).filter((v) => v.name === name);
      if ((outcome === 'source' || outcome === 'nowhere') && listedB.length) debris.push(`agent B still lists ${name} (${listedB.map((v) => v.role ?? '?').join(', ')})`);

      for (const p of qemus) kill(p);
      await sleep(300);
      const acked = sampler.acks.get('data') ?? -1;
      let writes = { ok: true, detail: '' };
      // Uncertain with the destination running: the guest is there, and so must be its writes.
      const onB = outcome === 'destination' || outcome === 'killed' || (outcome === 'uncertain' && last.destination === 'running');
      if (outcome !== 'needs-source' && (outcome !== 'uncertain' || onB)) {
        const disk = onB ? join(dirB, 'data.qcow2') : join(dirA, 'data.qcow2');
        const rep = await verifyDisk(disk, { format: 'qcow2', diskId: 'data', ackedSeq: acked }).catch((e: unknown) => ({ ok: false, missingCount: -1, corruptCount: -1, highestContiguous: -1, error: String(e) }));
        writes = { ok: rep.ok, detail: `${disk}, acked ${acked}: ${JSON.stringify({ missing: rep.missingCount, corrupt: rep.corruptCount, contiguous: rep.highestContiguous })}` };
      }
      problems.push(...judge({ sampler, claimed: claimOf(ended.code), actual: outcome, expected, orchestratorKilled: false, writes, debris }));
      const summary = o.events.at(-1);
      if (ended.code !== 0 && summary?.event === 'summary') notes.push(`summary: ${String(summary.code)}: ${String(summary.message).slice(0, 300)}`);
    } catch (err) {
      problems.push(`harness error: ${err instanceof Error ? err.message : String(err)}`);
    } finally {
      await sampler?.stop().catch(() => undefined);
      if (orch && orch.child.exitCode === null) kill(orch.child.pid);
      if (linkDown) await this.#link(true).catch(() => undefined);
      if (shaped) await this.#shape(undefined).catch(() => undefined);
      for (const p of [...(await pidsNaming(dirA + '/')), ...(await pidsNaming(dirB + '/'))]) kill(p);
      await sleep(300);
      // The agents forget the cell's VM (its QEMU is gone); its files go with the folders.
      await Promise.all([call(nsA, urlA, TOKEN, 'vm.delete', { name, removeDisks: true }).catch(() => undefined), call(nsA, urlB, TOKEN, 'vm.delete', { name, removeDisks: true }).catch(() => undefined)]);
      await rm(dirA, { recursive: true, force: true });
      await rm(dirB, { recursive: true, force: true });
    }
    return cellResult(cell, seed, { t0, orch, hitPhase, offsetMs, exit, outcome, expected, problems, notes });
  }
}
