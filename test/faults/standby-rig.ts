/**
 * The standby rig (phases `sync` and `evacuate`): two ferry-agents in two network namespaces
 * joined by a veth pair (as the netns rig), and a ferry-scheduler process in A's namespace (its
 * store SQLite in the cell's folder, one scheduler per cell). The writing guest runs on A and is
 * protected onto standby B at a 1 s interval.
 *
 *   sync      the link is slowed to 2 Mbit/s so a sync lasts seconds; the phase signal is the
 *             standby's own manifest naming a sync `pending` (written before any of its files
 *             exist); the fault strikes at a seeded offset after it. Judged: where the guest is,
 *             no acknowledged write lost (the source's disk), the replica's consistent point the
 *             one before the fault or the next one, the replica at its final point holding every
 *             record acknowledged before that point and never a torn one (a prefix), and, after
 *             the fault is removed, a later sync completes (not after kill-source-qemu: no source).
 *   evacuate  after two consistent syncs, `ferry migrate VM --to hostB` (by delta), migrations
 *             capped at 16 MiB/s and never retried (`retry.maxAttempts: 1`, so the outcome is the
 *             fault's, not a retry's); the phase signal is the scheduler's `ferry watch --json`
 *             stream; the fault strikes at a seeded offset after `mirror` began and the cell is
 *             judged by the engine phase it hit. After a rollback, the replica is served again
 *             (its manifest `active`, protect status not suspended) and a later sync completes.
 *
 * Both: one running copy at every instant (ticks on both consoles), and no debris (stray QEMUs, the
 * source's block jobs, ferry nodes, exports, migrations, replica bitmaps other than the consistent
 * point's; the standby's overlays outside its chains; B's VM folder after a rollback).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';
import { z } from 'zod';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { checkRecord, RECORD_SIZE, slot, slotCount } from '../../src/guest/record.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { QmpClient } from '../../src/qmp/index.js';
import { ManifestSchema, type Manifest } from '../../src/replica/manifest.js';
import { SYNC_BITMAP_RE } from '../../src/replica/names.js';
import { protectionStatusSchema } from '../../src/scheduler/protection-protocol.js';
import { agentGuestSpec } from '../helpers/guest.js';
import { createNetnsPair, type NetnsPair } from '../helpers/netns.js';
import { call, inNs, startAgentIn, startBinIn } from '../helpers/netns-agents.js';
import { cellId, PHASE_WINDOW_MS, rng, type Cell, type Outcome } from './cells.js';
import { cellResult, expectedFor, KEPT_LOG, pidsNaming, qemuLeftovers, type CellResult } from './local-rig.js';
import { REPO } from './orchestrator.js';
import { runDirsUnder, Sampler } from './sampler.js';
import { actualOutcome, judge } from './verdict.js';

const run = promisify(execFile);
const AGENT_TOKEN = 'fault-standby-agent-token-0123456';
const API_TOKEN = 'fault-standby-operator-token-0123';
const AGENT_PORT = 7420;
const SCHEDULER_PORT = 7430;
const SCHEDULER_URL = `ws://127.0.0.1:${SCHEDULER_PORT}`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function kill(pid: number | undefined, sig: NodeJS.Signals = 'SIGKILL'): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, sig);
  } catch {
    // gone already
  }
}

const alive = (c: ChildProcess | undefined): c is ChildProcess => !!c && c.exitCode === null && c.signalCode === null;

/** Waits for `cond` (polled every `everyMs`) until `timeoutMs`; false when it never held. */
async function waitFor(cond: () => Promise<boolean> | boolean, timeoutMs: number, everyMs = 100): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (await cond()) return true;
    if (performance.now() > deadline) return false;
    await sleep(everyMs);
  }
}

/** The pid in a run dir's qemu.pid, when that process still lives (and is no zombie). */
async function livePid(runDir: string): Promise<number | undefined> {
  const pid = Number((await readFile(join(runDir, 'qemu.pid'), 'utf8').catch(() => '')).trim());
  if (!(pid > 0)) return undefined;
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return stat && !/^\d+ \(.*\) Z/.test(stat) ? pid : undefined;
}

/** Pids of the qemu-storage-daemons serving a replica folder under `root`. */
async function daemonsNaming(root: string): Promise<number[]> {
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmd = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(root) && cmd.includes('qemu-storage-daemon')) out.push(Number(name));
  }
  return out;
}

/**
 * The guest's records 0..upTo in a flattened replica: how far they run unbroken, the ones torn
 * (a record's magic but a bad checksum, seq or offset), and intact ones after the first absent
 * one (no prefix: not one instant). Records land at scattered slots, some in the disk's 0x5a
 * fill, so an absent record reads as zeros or as 'bad magic'.
 */
async function replicaRecords(rawPath: string, upTo: number): Promise<{ contiguous: number; torn: { seq: number; reason: string }[]; afterGap: number[] }> {
  const fh = await open(rawPath, 'r');
  try {
    const nslots = slotCount((await fh.stat()).size);
    const out = { contiguous: -1, torn: [] as { seq: number; reason: string }[], afterGap: [] as number[] };
    let gap = false;
    for (let seq = 0; seq <= Math.min(upTo, nslots - 1); seq++) {
      const offset = slot(seq, nslots) * RECORD_SIZE;
      const buf = Buffer.alloc(RECORD_SIZE);
      await fh.read(buf, 0, RECORD_SIZE, offset);
      const c = checkRecord(buf, seq, offset, 'data');
      if (c.ok) {
        if (gap) out.afterGap.push(seq);
        else out.contiguous = seq;
      } else {
        gap = true;
        if (c.reason !== 'missing (zeros)' && c.reason !== 'bad magic') out.torn.push({ seq, reason: c.reason });
      }
    }
    return out;
  } finally {
    await fh.close();
  }
}

/** One line of `ferry watch --json`: what the rig reads of it. */
const WatchLine = z.looseObject({ type: z.string(), id: z.string().optional(), phase: z.string().optional() });
const JobReply = z.looseObject({ job: z.looseObject({ id: z.string(), state: z.string(), error: z.string().nullable().optional() }) });
const ShownJob = z.looseObject({ job: z.looseObject({ id: z.string(), state: z.string(), phase: z.string().nullable(), error: z.string().nullable() }) });
const VmGot = z.looseObject({ state: z.string(), spec: z.looseObject({ disks: z.array(z.looseObject({ path: z.string() })) }) });
// QEMU lists a device's bitmaps under `inserted` (the top-level field went in 6.0).
const BlockInfo = z.array(z.looseObject({ inserted: z.looseObject({ 'dirty-bitmaps': z.array(z.looseObject({ name: z.string() })).optional() }).optional() }));

/** What a scheduler job's end state claims about the guest (as migrate-vm's exit code would). */
function claimOfJob(state: string, error: string | null | undefined): Outcome | 'no-exit' {
  if (state === 'succeeded') return 'destination';
  if (state === 'needs-source') return 'needs-source';
  if (state === 'failed' && error?.startsWith('needs operator: the source QEMU')) return 'nowhere';
  if (state === 'failed' && error?.startsWith('needs operator')) return 'uncertain';
  if (state === 'failed' || state === 'cancelled') return 'source';
  return 'no-exit';
}

export class StandbyRig {
  readonly #started: ChildProcess[] = [];
  #agentA: ChildProcess | undefined;
  #agentB: ChildProcess | undefined;
  #scheduler: ChildProcess | undefined;
  /** The scheduler's log lines (pino JSON, stderr), the last few hundred: a failed cell prints its tail. */
  #schedulerLog: string[] = [];
  #n = 0;

  private constructor(
    readonly pair: NetnsPair,
    readonly roots: [string, string],
    readonly configs: [string, string],
    readonly base: string,
  ) {}

  static async create(): Promise<StandbyRig> {
    const base = await mkdtemp(join(tmpdir(), 'ferry-fault-standby-'));
    const pair = await createNetnsPair({});
    try {
      const roots: [string, string] = [join(base, 'root-a'), join(base, 'root-b')];
      const configs: [string, string] = [join(base, 'agent-a.json'), join(base, 'agent-b.json')];
      for (const i of [0, 1] as const) {
        await run('mkdir', ['-p', roots[i]]);
        const ip = pair.addresses[i];
        await writeFile(configs[i], JSON.stringify({ name: `host${'AB'[i]}`, listenHost: ip, listenPort: AGENT_PORT, storageRoot: roots[i], bootRoots: [IMAGE_DIR], tokens: { [AGENT_TOKEN]: 'scheduler' }, migrationHost: ip, portRange: [23000, 23100] }));
      }
      const rig = new StandbyRig(pair, roots, configs, base);
      rig.#agentA = rig.#keepLog(0, await startAgentIn(pair.names[0], configs[0], rig.#started));
      rig.#agentB = rig.#keepLog(1, await startAgentIn(pair.names[1], configs[1], rig.#started));
      return rig;
    } catch (err) {
      await pair.remove();
      await rm(base, { recursive: true, force: true });
      throw err;
    }
  }

  async close(): Promise<void> {
    for (const a of this.#started) a.kill('SIGKILL');
    await this.pair.remove();
    for (const root of this.roots) for (const p of [...(await pidsNaming(root)), ...(await daemonsNaming(root))]) kill(p);
    await sleep(200);
    await rm(this.base, { recursive: true, force: true });
    const ns = await run('ip', ['netns', 'list']).then((r) => r.stdout, () => '');
    if (this.pair.names.some((n) => ns.includes(n))) throw new Error(`debris: network namespace ${this.pair.names.join('/')} left`);
  }

  get urls(): [string, string] {
    return [`ws://${this.pair.addresses[0]}:${AGENT_PORT}`, `ws://${this.pair.addresses[1]}:${AGENT_PORT}`];
  }

  /** Each agent's last log lines (warnings and errors, pino JSON): a failed cell prints B's. */
  readonly #agentLog: [string[], string[]] = [[], []];

  #keepLog(side: 0 | 1, child: ChildProcess): ChildProcess {
    createInterface({ input: child.stderr! }).on('line', (l) => {
      if (!/"level":[45]0/.test(l)) return;
      const log = this.#agentLog[side];
      log.push(l.slice(0, 600));
      if (log.length > 50) log.shift();
    });
    return child;
  }

  async #restartAgent(side: 0 | 1): Promise<void> {
    if (alive(side === 0 ? this.#agentA : this.#agentB)) return;
    const fresh = this.#keepLog(side, await startAgentIn(this.pair.names[side], this.configs[side], this.#started));
    if (side === 0) this.#agentA = fresh;
    else this.#agentB = fresh;
  }

  async #startScheduler(config: string): Promise<void> {
    if (alive(this.#scheduler)) return;
    const s = await startBinIn(this.pair.names[0], 'bin/ferry-scheduler.mjs', config, this.#started);
    createInterface({ input: s.stderr! }).on('line', (l) => {
      this.#schedulerLog.push(l);
      if (this.#schedulerLog.length > 400) this.#schedulerLog.splice(0, 100);
    });
    this.#scheduler = s;
  }

  /** Stops the scheduler (SIGTERM: its loops stop, a sync in flight ends) and waits up to `ms`; then SIGKILL. */
  async #stopScheduler(ms: number): Promise<boolean> {
    const s = this.#scheduler;
    if (!alive(s)) return true;
    const exited = new Promise<void>((r) => s.once('exit', () => r()));
    kill(s.pid, 'SIGTERM');
    const clean = await Promise.race([exited.then(() => true), sleep(ms).then(() => false)]);
    if (!clean) {
      kill(s.pid);
      await exited;
    }
    return clean;
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

  async #ferry(...argv: string[]): Promise<unknown> {
    const r = await inNs(this.pair.names[0], ['node', 'bin/ferry.mjs', '--scheduler', SCHEDULER_URL, '--json', ...argv], { env: { FERRY_SCHEDULER_TOKEN: API_TOKEN }, timeoutMs: 60_000 });
    if (r.code !== 0) throw new Error(`ferry ${argv.join(' ')} exited ${r.code}: ${r.stderr.trim().slice(-500)}`);
    return JSON.parse(r.stdout) as unknown;
  }

  async runCell(cell: Cell, seed: number): Promise<CellResult> {
    const t0 = performance.now();
    const rand = rng(seed, cellId(cell));
    const offsetMs = Math.floor(rand() * PHASE_WINDOW_MS[cell.phase]);
    const cutS = 1 + Math.floor(rand() * 4);
    const name = `s${++this.#n}`;
    const [nsA] = this.pair.names;
    const [urlA, urlB] = this.urls;
    const dirA = join(this.roots[0], name);
    const dirB = join(this.roots[1], name);
    const runA = join(dirA, 'run');
    const cellDir = await mkdtemp(join(this.base, `${name}-`));
    const schedulerConfig = join(cellDir, 'scheduler.json');
    const notes: string[] = [];
    const problems: string[] = [];
    const debris: string[] = [];
    let hitPhase: string | undefined;
    let exit = 'none';
    let outcome: Outcome = 'uncertain';
    let expected: readonly Outcome[] = [];
    let sampler: Sampler | undefined;
    let watch: ChildProcess | undefined;
    let linkDown = false;
    let shaped = false;
    /** What the evacuation's end state claims (a sync cell has no run that claims anything). */
    let claimed: Outcome | 'no-exit' = 'no-exit';
    this.#schedulerLog = [];
    this.#agentLog[0].length = 0;
    this.#agentLog[1].length = 0;
    /** (wall clock, highest ack seen then): an ack sampled before an instant was printed before it. */
    const acks: { at: number; seq: number }[] = [];
    let ackTimer: NodeJS.Timeout | undefined;
    const replicaDir = async (): Promise<string | undefined> => {
      const d = (await readdir(join(this.roots[1], 'replicas')).catch(() => [] as string[])).find((n) => n.endsWith(`-${name}`));
      return d === undefined ? undefined : join(this.roots[1], 'replicas', d);
    };
    const manifest = async (): Promise<Manifest | undefined> => {
      const d = await replicaDir();
      if (!d) return undefined;
      // Read as the outside data it is: a rename may be under way, then the next read has it.
      const raw = await readFile(join(d, 'manifest.json'), 'utf8').catch(() => undefined);
      if (raw === undefined) return undefined;
      let json: unknown;
      try {
        json = JSON.parse(raw);
      } catch {
        return undefined;
      }
      const m = ManifestSchema.safeParse(json);
      return m.success ? m.data : undefined;
    };
    const consistentSeq = async (): Promise<number> => (await manifest())?.consistent?.seq ?? 0;
    try {
      await this.#restartAgent(0);
      await this.#restartAgent(1);
      await writeFile(
        schedulerConfig,
        JSON.stringify({
          listenHost: '127.0.0.1',
          listenPort: SCHEDULER_PORT,
          database: join(cellDir, 'state.db'),
          hosts: [
            { name: 'hostA', url: urlA },
            { name: 'hostB', url: urlB },
          ],
          agentToken: AGENT_TOKEN,
          tokens: { [API_TOKEN]: 'ops' },
          // The cell's outcome is the fault's: a rolled-back evacuation is not tried again.
          retry: { maxAttempts: 1, baseDelayMs: 1_000 },
          // A delta evacuation's RAM phase lasts seconds (128 MiB): a window to strike in.
          limits: { bandwidthPerHostBytesPerSec: 16 << 20 },
          heartbeatMs: 2_000,
          web: false,
        }),
      );
      await this.#startScheduler(schedulerConfig);
      const { spec } = await agentGuestSpec(this.roots[0], name, { memoryMiB: 128, diskMiB: 32, fillMiB: 8, rate: 50, tickMs: 50 });
      await call(nsA, urlA, AGENT_TOKEN, 'vm.create', { spec });
      await call(nsA, urlA, AGENT_TOKEN, 'vm.start', { name });
      const state = (side: 'source' | 'destination', dirs: () => Promise<string[]>) => async (): Promise<string> => {
        let any = false;
        for (const d of await dirs()) if ((await livePid(d)) !== undefined) any = true;
        if (!any) return 'gone';
        return performance.now() - sampler!.lastTickAt[side] < 400 ? 'running' : 'paused';
      };
      const srcDirs = async (): Promise<string[]> => [runA];
      const dstDirs = (): Promise<string[]> => runDirsUnder(dirB);
      sampler = new Sampler({ runDirs: srcDirs, status: state('source', srcDirs) }, { runDirs: dstDirs, status: state('destination', dstDirs) }, false);
      sampler.start();
      ackTimer = setInterval(() => acks.push({ at: Date.now(), seq: sampler?.acks.get('data') ?? -1 }), 100);
      if (!(await waitFor(() => (sampler?.acks.get('data') ?? -1) >= 5, 30_000))) throw new Error(`guest ${name} acked no writes on host A`);

      await this.#ferry('protect', name, '--standby', 'hostB', '--interval', '1s');
      if (!(await waitFor(async () => (await consistentSeq()) >= 2, 60_000, 200))) throw new Error(`no second consistent sync within 60 s (manifest: ${JSON.stringify(await manifest())})`);

      let seqBefore = 0;
      let seqAfterFault = 0;
      const scheduler = (): ChildProcess | undefined => this.#scheduler;
      /** The faults both phases share; link-cut-forever and the QEMU kills are each phase's own. */
      const strike = async (): Promise<void> => {
        switch (cell.fault) {
          case 'kill-source-qemu':
            kill(await livePid(runA));
            break;
          case 'kill-destination-qemu': {
            const pids = (await Promise.all((await runDirsUnder(dirB)).map(livePid))).filter((p): p is number => p !== undefined);
            if (!pids.length) notes.push('no destination QEMU to kill yet');
            for (const p of pids) kill(p);
            break;
          }
          case 'kill-orchestrator':
          case 'sigterm-orchestrator': {
            const s = scheduler();
            const exited = s && alive(s) ? new Promise<void>((r) => s.once('exit', () => r())) : Promise.resolve();
            kill(s?.pid, cell.fault === 'kill-orchestrator' ? 'SIGKILL' : 'SIGTERM');
            if (!(await Promise.race([exited.then(() => true), sleep(30_000).then(() => false)]))) {
              problems.push('the scheduler did not exit within 30 s of SIGTERM: killed');
              kill(s?.pid);
              await exited;
            }
            await sleep(2_000);
            await this.#startScheduler(schedulerConfig);
            notes.push('scheduler started again after 2 s');
            break;
          }
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
          default:
            throw new Error(`the standby rig has no fault ${cell.fault} in ${cell.phase}`);
        }
      };

      if (cell.phase === 'sync') {
        // A sync now lasts seconds: the guest dirties more than 2 Mbit/s carries between two.
        shaped = true;
        await this.#shape(2);
        const base = await consistentSeq();
        if (!(await waitFor(async () => ((await manifest())?.pending?.seq ?? 0) > base, 30_000, 50))) throw new Error('no sync began within 30 s of the link slowing down');
        await sleep(offsetMs);
        const m = await manifest();
        seqBefore = m?.consistent?.seq ?? 0;
        hitPhase = m?.pending ? 'sync' : 'between-syncs';
        if (!m?.pending) notes.push(`the sync ended before the fault (+${offsetMs} ms)`);
        if (cell.fault === 'link-cut-forever') {
          linkDown = true;
          await this.#link(false);
          const ackedAtCut = sampler.acks.get('data') ?? -1;
          // The scheduler's side (A) learns of it first: the sync fails there, or it hangs.
          const failed = await waitFor(() => this.#schedulerLog.some((l) => l.includes('sync failed')), 60_000, 200);
          // Does the guest still write while the backup's target is unreachable?
          notes.push(`guest acked ${(sampler.acks.get('data') ?? -1) - ackedAtCut} writes during the cut`);
          if (!failed) problems.push('link cut for good: the sync in flight did not fail within 60 s (the loop hangs on the dead standby)');
          const q = await QmpClient.connect({ path: join(runA, 'qmp.sock') }, { timeoutMs: 5_000, name: 'fault-debris' }).catch(() => undefined);
          if (q) {
            debris.push(...(await qemuLeftovers(q, 'source, link still down')));
            await q.close();
          }
          seqAfterFault = await consistentSeq();
          await this.#link(true);
          linkDown = false;
          notes.push('link restored once the sync had failed (or after 60 s)');
        } else {
          await strike();
          seqAfterFault = await consistentSeq();
        }
        await this.#shape(undefined);
        shaped = false;
        if (seqAfterFault < seqBefore || seqAfterFault > seqBefore + 1) problems.push(`the replica's consistent point went from ${seqBefore} to ${seqAfterFault} across the fault (the previous one or the next expected)`);
        await this.#restartAgent(0);
        await this.#restartAgent(1);
        await this.#startScheduler(schedulerConfig);
        if (cell.fault === 'kill-source-qemu') {
          // No source: no sync can complete; the point must stand as it was.
          await sleep(3_000);
          const now = await consistentSeq();
          if (now !== seqAfterFault) problems.push(`the replica's point moved from ${seqAfterFault} to ${now} with the source dead`);
        } else if (!(await waitFor(async () => (await consistentSeq()) > seqAfterFault, 60_000, 200))) {
          problems.push(`the sync loop did not resume: no consistent sync after ${seqAfterFault} within 60 s of the fault's end (${this.#schedulerLog.filter((l) => l.includes('sync failed')).slice(-1).join('').slice(0, 400)})`);
        }
        exit = 'no run';
      } else {
        // evacuate: the delta migration as the scheduler runs it, its phases off `ferry watch`.
        seqBefore = await consistentSeq();
        const phases: string[] = [];
        let struck: Promise<void> | undefined;
        const w = spawn('ip', ['netns', 'exec', nsA, 'node', 'bin/ferry.mjs', '--scheduler', SCHEDULER_URL, '--json', 'watch'], { cwd: REPO, env: { ...process.env, FERRY_SCHEDULER_TOKEN: API_TOKEN, FERRY_LOG_LEVEL: 'warn' }, stdio: ['ignore', 'pipe', 'ignore'] });
        watch = w;
        let jobId: string | undefined;
        createInterface({ input: w.stdout! }).on('line', (line) => {
          let json: unknown;
          try {
            json = JSON.parse(line);
          } catch {
            return;
          }
          const e = WatchLine.safeParse(json);
          if (!e.success || e.data.type !== 'phase' || !e.data.phase || (jobId && e.data.id !== jobId)) return;
          phases.push(e.data.phase);
          if (e.data.phase === 'mirror' && !struck) {
            struck = sleep(offsetMs).then(async () => {
              hitPhase = phases.at(-1);
              await strike();
            });
          }
        });
        await sleep(1_500); // the watch session is up before the migration starts
        const reply = JobReply.parse(await this.#ferry('migrate', name, '--to', 'hostB'));
        jobId = reply.job.id;
        let job: z.infer<typeof ShownJob>['job'] | undefined;
        const ended = await waitFor(
          async () => {
            if (!alive(this.#scheduler)) return false;
            const shown = ShownJob.safeParse(await this.#ferry('show', jobId!).catch(() => undefined));
            if (shown.success) job = shown.data.job;
            return !!job && ['succeeded', 'failed', 'cancelled', 'needs-source'].includes(job.state);
          },
          150_000,
          1_000,
        );
        await struck;
        if (!struck) problems.push(`the migration's mirror phase never began (phases seen: ${phases.join(' → ')})`);
        if (!ended) problems.push(`the migration did not end within 150 s (last: ${JSON.stringify(job)})`);
        exit = job ? `${job.state}${job.error ? `: ${job.error.slice(0, 160)}` : ''}` : 'none';
        notes.push(`phases: ${phases.join(' → ')}`);
        claimed = claimOfJob(job?.state ?? '', job?.error);
      }

      await this.#restartAgent(0);
      await this.#restartAgent(1);
      const settled = (): boolean => {
        const l = sampler!.last();
        return !!l && ((l.source === 'running' && l.destination === 'gone') || (l.destination === 'running' && l.source === 'gone') || (l.source === 'gone' && l.destination === 'gone'));
      };
      await waitFor(settled, 30_000);
      await sleep(800);
      const last = sampler.last()!;
      outcome = actualOutcome({ source: last.source, destination: last.destination }, sampler.ticks.destination.size > 0);
      expected = expectedFor(cell, hitPhase);

      if (cell.phase === 'evacuate' && outcome === 'source') {
        // Rolled back: the replica is served again and the loop goes on.
        const row = protectionStatusSchema.array().parse(await this.#ferry('protect', 'status')).find((r) => r.vm === name);
        if (!row) problems.push('rolled back, but the protection is gone from protect status');
        else if (row.state === 'suspended') problems.push(`rolled back, but the protection is suspended: ${row.lastError ?? ''}`);
        const m = await manifest();
        if (m?.state !== 'active') problems.push(`rolled back, but the replica is ${m?.state ?? 'gone'}, not active`);
        const from = await consistentSeq();
        if (!(await waitFor(async () => (await consistentSeq()) > from, 60_000, 200))) problems.push(`rolled back, but no sync completed after it within 60 s (point ${from}; ${this.#schedulerLog.filter((l) => /sync failed|suspended/.test(l)).slice(-1).join('').slice(0, 400)})`);
      }
      if (cell.phase === 'evacuate' && outcome === 'destination') {
        const rows = protectionStatusSchema.array().parse(await this.#ferry('protect', 'status'));
        if (rows.some((r) => r.vm === name)) problems.push('evacuated onto the replica, but the protection is still listed');
      }

      // The loops stop (a sync in flight ends first): the replica and the source hold still to be read.
      if (!(await this.#stopScheduler(30_000))) problems.push('the scheduler did not stop within 30 s of SIGTERM');
      const srcPid = await livePid(runA);
      if (srcPid !== undefined && outcome === 'source') {
        const q = await QmpClient.connect({ path: join(runA, 'qmp.sock') }, { timeoutMs: 5_000, name: 'fault-debris' }).catch(() => undefined);
        if (q) {
          debris.push(...(await qemuLeftovers(q, 'source')));
          // Exactly the bitmap of the standby's consistent point (a leftover one grows forever).
          const info = BlockInfo.safeParse(await q.executeRaw('query-block').catch(() => []));
          const bitmaps = (info.success ? info.data : []).flatMap((b) => (b.inserted?.['dirty-bitmaps'] ?? []).map((x) => x.name)).filter((n) => SYNC_BITMAP_RE.test(n));
          const point = (await manifest())?.consistent?.seq;
          if (cell.phase === 'sync' || (await manifest())?.state === 'active') {
            const want = point === undefined ? [] : [`ferry-replica-${point}`];
            if (bitmaps.sort().join(',') !== want.join(',')) debris.push(`source: replica bitmaps ${bitmaps.join(', ') || 'none'}, the standby's point wants ${want.join(', ') || 'none'}`);
          }
          await q.close();
        } else debris.push('source: its QMP socket does not answer');
      }
      const dstDirsNow = await runDirsUnder(dirB);
      const dstPids = (await Promise.all(dstDirsNow.map(livePid))).filter((p): p is number => p !== undefined);
      const allowed = new Set([...(srcPid !== undefined && last.source !== 'gone' ? [srcPid] : []), ...(last.destination !== 'gone' ? dstPids.slice(0, 1) : [])]);
      const qemus = [...(await pidsNaming(dirA + '/')), ...(await pidsNaming(dirB + '/'))];
      const stray = qemus.filter((p) => !allowed.has(p));
      if (stray.length) debris.push(`QEMU process(es) ${stray.join(', ')} left running`);
      const bFiles = (await readdir(dirB).catch(() => [] as string[])).filter((f) => !KEPT_LOG.test(f));
      if ((outcome === 'source' || outcome === 'nowhere') && bFiles.length) debris.push(`host B still holds ${name}/${bFiles.join(`, ${name}/`)}`);

      // The replica: its point, its files, its content (flattened: base + the overlays its chain lists).
      const rdir = await replicaDir();
      // The daemon commits a completed sync's overlay into the base after the point moved: read
      // the chain once that is done (a longer chain, if a commit failed, is the same point).
      await waitFor(async () => (await manifest())?.disks.every((d) => d.chain.length === 1) ?? true, 10_000, 100);
      const m = await manifest();
      const acked = sampler.acks.get('data') ?? -1;
      if (cell.phase === 'sync' || (cell.phase === 'evacuate' && outcome === 'source')) {
        if (!rdir || !m?.consistent) problems.push(`the replica or its consistent point is gone (${rdir ?? 'no folder'})`);
        else {
          if (m.pending) debris.push(`replica: sync ${m.pending.seq} still pending after the scheduler stopped`);
          const chained = new Set(m.disks.flatMap((d) => d.chain.map((c) => c.file)));
          const stale = (await readdir(rdir)).filter((f) => f.endsWith('.qcow2') && !chained.has(join(rdir, f)) && !chained.has(f));
          if (stale.length) debris.push(`replica: overlay(s) outside its chain: ${stale.join(', ')}`);
          const top = m.disks[0]!.chain.at(-1)!.file;
          const mustHave = Math.max(-1, ...acks.filter((a) => a.at < m.consistent!.pointAt - 100).map((a) => a.seq));
          const flat = join(cellDir, 'replica.raw');
          await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', top.startsWith('/') ? top : join(rdir, top), flat]);
          const rep = await replicaRecords(flat, Math.max(acked, mustHave));
          await rm(flat, { force: true });
          // A prefix (every record after the first absent one absent too), none torn, and every
          // record acknowledged before the point there.
          if (rep.torn.length || rep.afterGap.length || rep.contiguous < mustHave) problems.push(`replica at sync ${m.consistent.seq} is not the point it names: ${JSON.stringify({ mustHave, acked, contiguous: rep.contiguous, torn: rep.torn.slice(0, 4), presentAfterGap: rep.afterGap.slice(0, 4) })}`);
          notes.push(`replica point ${seqBefore} → ${m.consistent.seq}, ${rep.contiguous + 1} records (${mustHave + 1} acked before it)`);
        }
      }
      const listed = z.array(z.looseObject({ name: z.string(), role: z.string().optional() })).safeParse(await call(nsA, urlB, AGENT_TOKEN, 'vm.list').catch(() => []));
      const listedB = (listed.success ? listed.data : []).filter((v) => v.name === name);
      if ((outcome === 'source' || outcome === 'nowhere') && listedB.length) debris.push(`agent B still lists ${name} (${listedB.map((v) => v.role ?? '?').join(', ')})`);

      // The guest's own disk on the side it ended on (B's: an overlay on the replica chain, flattened).
      let dstDisk: string | undefined;
      if (outcome === 'destination' || outcome === 'killed') {
        const got = VmGot.safeParse(await call(nsA, urlB, AGENT_TOKEN, 'vm.get', { name }).catch(() => undefined));
        dstDisk = got.success ? got.data.spec.disks[0]?.path : undefined;
      }
      for (const p of qemus) kill(p);
      await sleep(300);
      let writes = { ok: true, detail: '' };
      if (outcome !== 'needs-source' && outcome !== 'uncertain') {
        const disk = outcome === 'destination' || outcome === 'killed' ? dstDisk : join(dirA, 'data.qcow2');
        if (!disk) writes = { ok: false, detail: "agent B does not say where the guest's disk is" };
        else {
          const flat = join(cellDir, 'disk.raw');
          const rep = await run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', disk, flat])
            .then(() => verifyDisk(flat, { format: 'raw', diskId: 'data', ackedSeq: acked }))
            .catch((e: unknown) => ({ ok: false, missingCount: -1, corruptCount: -1, highestContiguous: -1, error: String(e) }));
          await rm(flat, { force: true });
          writes = { ok: rep.ok, detail: `${disk}, acked ${acked}: ${JSON.stringify({ missing: rep.missingCount, corrupt: rep.corruptCount, contiguous: rep.highestContiguous })}` };
        }
      }
      // A sync cell has no run whose exit claims an outcome: only where the guest is counts.
      problems.push(...judge({ sampler, claimed, actual: outcome, expected, orchestratorKilled: cell.phase === 'sync', writes, debris }));
    } catch (err) {
      problems.push(`harness error: ${err instanceof Error ? err.message : String(err)}`);
    } finally {
      clearInterval(ackTimer);
      await sampler?.stop().catch(() => undefined);
      watch?.kill('SIGKILL');
      if (linkDown) await this.#link(true).catch(() => undefined);
      if (shaped) await this.#shape(undefined).catch(() => undefined);
      await this.#stopScheduler(10_000).catch(() => undefined);
      for (const p of [...(await pidsNaming(dirA + '/')), ...(await pidsNaming(dirB + '/'))]) kill(p);
      await sleep(300);
      // The agents forget the cell's VM and replica; their files go with the folders.
      await this.#restartAgent(0).catch(() => undefined);
      await this.#restartAgent(1).catch(() => undefined);
      await Promise.all([
        call(nsA, urlA, AGENT_TOKEN, 'vm.delete', { name, removeDisks: true }).catch(() => undefined),
        call(nsA, urlB, AGENT_TOKEN, 'vm.delete', { name, removeDisks: true }).catch(() => undefined),
        call(nsA, urlB, AGENT_TOKEN, 'replica.destroy', { vm: name }).catch(() => undefined),
      ]);
      const rdir = await replicaDir();
      if (rdir) for (const p of await daemonsNaming(rdir)) kill(p);
      await rm(dirA, { recursive: true, force: true });
      await rm(dirB, { recursive: true, force: true });
      if (rdir) await rm(rdir, { recursive: true, force: true });
      await rm(cellDir, { recursive: true, force: true });
    }
    if (problems.length) for (const side of [0, 1] as const) if (this.#agentLog[side].length) notes.push(`agent ${'AB'[side]} warnings (last): ${this.#agentLog[side].slice(-4).join(' | ')}`);
    const log = this.#schedulerLog;
    return cellResult(cell, seed, { t0, orch: { stderr: () => log.join('\n'), events: [] }, hitPhase, offsetMs, exit, outcome, expected, problems, notes });
  }
}
