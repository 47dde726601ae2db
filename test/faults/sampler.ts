/**
 * Watches both copies of the guest while a cell runs: every 100 ms the run state of each QEMU
 * (query-status on its free monitor, `qmp.sock`) and every tick line either console printed
 * (the source's from its console, the destination's from its serial.log, which QEMU writes).
 * The guest's tick counter travels with its RAM, so the same tick number on both consoles means
 * the guest ran the same stretch twice; both QEMUs `running` in one sample means two copies at
 * once. Either fails the cell.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { QmpClient } from '../../src/qmp/index.js';
import { parseSerialLine } from '../../src/guest/serial.js';

export interface RunSample {
  at: number;
  source: string;
  destination: string;
}

export interface SideWatch {
  /** Where its run dirs are: the source's one run dir, or the folders a destination makes run-* dirs in. */
  runDirs: () => Promise<string[]>;
  /** The run state from a monitor the harness already holds (else: `qmp.sock` in each run dir). */
  status?: () => Promise<string>;
}

export class Sampler {
  readonly samples: RunSample[] = [];
  /** Tick numbers per side, and the acks each console printed (disk → highest seq). */
  readonly ticks = { source: new Set<number>(), destination: new Set<number>() };
  readonly acks = new Map<string, number>();
  /** Host time the last new tick of each side was read. */
  readonly lastTickAt = { source: -Infinity, destination: -Infinity };
  /** The destination run dirs seen (each one's serial.log is kept even after the dir goes). */
  readonly destinationRunDirs = new Set<string>();
  readonly #qmp = new Map<string, QmpClient | 'connecting' | 'dead'>();
  readonly #consumed = new Map<string, number>();
  #timer: NodeJS.Timeout | undefined;
  #busy = false;

  /**
   * exactRunState false: the states come from tick arrival (the netns rig), so right after a
   * switchover both look 'running' for a moment; then only the tick numbers judge two copies.
   */
  constructor(
    readonly source: SideWatch,
    readonly destination: SideWatch,
    readonly exactRunState = true,
  ) {}

  start(): void {
    this.#timer = setInterval(() => void this.sampleOnce(), 100);
  }

  async stop(): Promise<void> {
    clearInterval(this.#timer);
    while (this.#busy) await new Promise((r) => setTimeout(r, 20));
    await this.sampleOnce();
    for (const q of this.#qmp.values()) if (q instanceof QmpClient) await q.close().catch(() => undefined);
    this.#qmp.clear();
  }

  /** Both running in one sample: two copies at once. */
  bothRunning(): RunSample | undefined {
    if (!this.exactRunState) return undefined;
    return this.samples.find((s) => s.source === 'running' && s.destination === 'running');
  }

  /** Tick numbers printed on both consoles: the guest ran the same stretch twice. */
  doubleTicks(): number[] {
    return [...this.ticks.destination].filter((n) => this.ticks.source.has(n)).slice(0, 10);
  }

  last(): RunSample | undefined {
    return this.samples.at(-1);
  }

  async sampleOnce(): Promise<void> {
    if (this.#busy) return;
    this.#busy = true;
    try {
      const [s, d] = await Promise.all([this.#side(this.source, 'source'), this.#side(this.destination, 'destination')]);
      this.samples.push({ at: performance.now(), source: s, destination: d });
    } finally {
      this.#busy = false;
    }
  }

  async #side(w: SideWatch, side: 'source' | 'destination'): Promise<string> {
    const dirs = await w.runDirs().catch(() => [] as string[]);
    const states: string[] = [];
    for (const dir of dirs) {
      if (side === 'destination') this.destinationRunDirs.add(dir);
      await this.#readSerial(dir, side);
      if (!w.status) states.push(await this.#status(dir));
    }
    if (w.status) states.push(await w.status().catch(() => 'gone'));
    return states.find((s) => s === 'running') ?? states.find((s) => s !== 'gone') ?? 'gone';
  }

  async #readSerial(dir: string, side: 'source' | 'destination'): Promise<void> {
    const text = await readFile(join(dir, 'serial.log'), 'utf8').catch(() => undefined);
    if (text === undefined) return;
    // Whole lines only (the last may still be being written); `consumed` is where they end.
    const consumed = this.#consumed.get(dir) ?? 0;
    const end = text.lastIndexOf('\n') + 1;
    if (end <= consumed) return;
    this.#consumed.set(dir, end);
    for (const line of text.slice(consumed, end).split('\n')) if (line) this.noteLine(side, line);
  }

  noteLine(side: 'source' | 'destination', line: string): void {
    const m = parseSerialLine(line);
    if (m.kind === 'tick' && !this.ticks[side].has(m.n)) {
      this.ticks[side].add(m.n);
      this.lastTickAt[side] = performance.now();
    }
    if (m.kind === 'ack') this.acks.set(m.disk, Math.max(this.acks.get(m.disk) ?? -1, m.seq));
  }

  async #status(dir: string): Promise<string> {
    const sock = join(dir, 'qmp.sock');
    let q = this.#qmp.get(sock);
    if (q === 'dead') return 'gone';
    if (q === undefined) {
      if (!(await stat(sock).then(() => true, () => false))) return 'gone';
      this.#qmp.set(sock, 'connecting');
      try {
        q = await QmpClient.connect({ path: sock }, { timeoutMs: 2_000, name: 'fault-sampler' });
        this.#qmp.set(sock, q);
      } catch {
        this.#qmp.delete(sock);
        return 'gone';
      }
    }
    if (q === 'connecting') return 'starting';
    try {
      return (await q.execute('query-status', undefined, { timeoutMs: 2_000 })).status;
    } catch {
      this.#qmp.set(sock, 'dead');
      await q.close().catch(() => undefined);
      return 'gone';
    }
  }
}

/** The run-* folders a destination made under `root` (and, for an agent, under root/<vm>). */
export async function runDirsUnder(root: string): Promise<string[]> {
  const names = await readdir(root).catch(() => [] as string[]);
  return names.filter((n) => n.startsWith('run-')).map((n) => join(root, n));
}
