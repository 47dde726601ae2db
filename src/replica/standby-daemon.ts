/**
 * The standby side of one protected VM: a qemu-storage-daemon that holds the replica chain of each
 * disk and serves, per sync, a fresh qcow2 overlay on top of it as a writable NBD export. The
 * daemon outlives the process that started it (own process group); its pid and kernel start time
 * are in the manifest, so a restarted owner re-attaches, or starts it again on the same chains.
 *
 * A sync, seen from here:
 *   prepareSync(seq)   overlay files on the chain tops, opened and exported (manifest.pending first)
 *   completeSync(seq)  the source's backups all completed: exports dropped, the overlays join the
 *                      chains and become the consistent point (one manifest write), then each
 *                      chain is committed into its base (block-commit; the chain stays the same
 *                      point while it runs, see docs/standby.md)
 *   abortSync(seq)     anything else: the overlays are discarded; the previous point stands
 */
import { spawn } from 'node:child_process';
import { execFile } from 'node:child_process';
import { mkdirSync, openSync, closeSync, rmSync, existsSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { processStartTime } from '../agent/registry.js';
import { eventIs, QmpClient } from '../qmp/index.js';
import { ReplicaError } from './errors.js';
import { readManifest, writeManifest, type Manifest, type SyncFigures } from './manifest.js';
import { layerNode, syncExportName } from './names.js';
import { DATA_TLS_IDS, SERVER_TLS, writeCredentialDirs, type HostTlsMaterial } from '../host/data-tls.js';

const run = promisify(execFile);
const CMD = { timeoutMs: 30_000 };
/** Room kept free on the standby beyond the replica's data. */
export const REPLICA_SPACE_MARGIN_BYTES = 64 << 20;

/** Where a sync's backups write: the standby's NBD server and one export per disk. */
export interface ReplicaTarget {
  seq: number;
  host: string;
  port: number;
  exports: Record<string, string>;
}

/**
 * A sync over TLS: the daemon's NBD server takes this host's certificate (tls-creds-x509, server,
 * verify-peer) and an authz-simple that admits exactly `peerIdentity`, the source host's
 * certificate name. Anyone else, a plain client included, is refused before any export is seen.
 */
export interface ReplicaServerTls {
  material: HostTlsMaterial;
  peerIdentity: string;
}

export interface StandbyOptions {
  /** The replica's own folder (manifest, chains, daemon socket and log). */
  dir: string;
  /** The address the source's QEMU reaches this host's NBD server at. */
  host: string;
  binary?: string;
  log?: Logger;
}

export class StandbyReplica {
  readonly dir: string;
  readonly #host: string;
  readonly #binary: string;
  readonly #log: Logger;
  #m: Manifest;
  #qmp: QmpClient | undefined;
  /**
   * What the daemon's NBD server runs with now: the admitted peer's identity, null for plain
   * text, undefined when not known (not started yet, or a daemon this process re-attached to).
   * The server starts at the first sync, with that sync's TLS, never before: nothing listens
   * that a sync did not ask for.
   */
  #serving: string | null | undefined;

  private constructor(opts: StandbyOptions, m: Manifest) {
    this.dir = opts.dir;
    this.#host = opts.host;
    this.#binary = opts.binary ?? 'qemu-storage-daemon';
    this.#log = (opts.log ?? silentLogger).child({ replica: m.vm });
    this.#m = m;
  }

  /**
   * A new, empty replica: checks the room first (`needBytes`: what the source's disks hold), then
   * an empty base per disk, the manifest, and the daemon. Refuses a folder that holds a replica.
   */
  static async create(opts: StandbyOptions & { vm: string; disks: { id: string; virtualSize: number }[]; needBytes: number; port: number }): Promise<StandbyReplica> {
    mkdirSync(opts.dir, { recursive: true, mode: 0o700 });
    if (existsSync(join(opts.dir, 'manifest.json'))) throw new ReplicaError('EXISTS', `a replica of ${opts.vm} already exists in ${opts.dir}`, { userError: true });
    const free = freeBytesAt(opts.dir);
    if (free < opts.needBytes + REPLICA_SPACE_MARGIN_BYTES) {
      throw new ReplicaError('SPACE', `not enough space for the replica of ${opts.vm} in ${opts.dir}: its disks hold ${mib(opts.needBytes)} MiB, ${mib(free)} MiB free`, { userError: true });
    }
    const disks = [];
    for (const d of opts.disks) {
      const file = join(opts.dir, `${d.id}.base.qcow2`);
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(d.virtualSize)]);
      disks.push({ id: d.id, virtualSize: d.virtualSize, chain: [{ seq: 0, file }] });
    }
    const m: Manifest = { version: 1, vm: opts.vm, state: 'active', disks, consistent: null, pending: null, daemon: null, lastSync: null, failedSyncs: 0 };
    writeManifest(opts.dir, m);
    const r = new StandbyReplica(opts, m);
    r.#port = opts.port;
    await r.#startDaemon();
    return r;
  }

  /** An existing replica after its owner restarted: re-attached to its daemon, or the daemon started again. */
  static async open(opts: StandbyOptions): Promise<StandbyReplica> {
    const m = readManifest(opts.dir);
    const r = new StandbyReplica(opts, m);
    r.#port = m.daemon?.port ?? m.port ?? 0;
    if (m.state !== 'active') return r;
    const d = m.daemon;
    if (d && processStartTime(d.pid) === d.pidStart) {
      r.#qmp = await QmpClient.connect({ path: r.#socket }, { timeoutMs: 5_000, name: 'replica-daemon' });
      r.#log.info({ pid: d.pid }, 're-attached to the replica daemon');
      // A sync in flight when the owner went is not trusted: the source's side of it is unknown.
      if (r.#m.pending) await r.abortSync(r.#m.pending.seq);
      await r.#commitAll();
      return r;
    }
    await r.#startDaemon();
    return r;
  }

  #port = 0;

  get manifest(): Readonly<Manifest> {
    return this.#m;
  }

  get #socket(): string {
    return join(this.dir, 'qsd.sock');
  }

  get pid(): number | undefined {
    return this.#m.daemon?.pid;
  }

  /**
   * The overlays of sync `seq`, opened on the chain tops and exported for writing, by an NBD
   * server over TLS that admits only `tls.peerIdentity` (or plain, without `tls`).
   */
  async prepareSync(seq: number, opts: { tls?: ReplicaServerTls | undefined } = {}): Promise<ReplicaTarget> {
    const q = this.#daemon();
    if (this.#m.pending) await this.abortSync(this.#m.pending.seq);
    if (this.#m.consistent && seq <= this.#m.consistent.seq) throw new ReplicaError('SEQ', `sync ${seq} is not after the consistent sync ${this.#m.consistent.seq}`);
    await this.#serve(q, opts.tls);
    const overlays: Record<string, string> = {};
    for (const d of this.#m.disks) overlays[d.id] = join(this.dir, `${d.id}.${seq}.qcow2`);
    // Recorded before the files exist: a crash from here on leaves files the next start removes.
    this.#save({ pending: { seq, overlays } });
    const exports: Record<string, string> = {};
    for (const d of this.#m.disks) {
      const top = d.chain.at(-1)!;
      const file = overlays[d.id]!;
      // -u: the backing is open in the daemon; its size is given, nothing needs to read it.
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', top.file, '-F', 'qcow2', file, String(d.virtualSize)]);
      await q.executeRaw('blockdev-add', { driver: 'qcow2', 'node-name': layerNode(d.id, seq), file: { driver: 'file', filename: file }, backing: layerNode(d.id, top.seq) }, CMD);
      const name = syncExportName(this.#m.vm, d.id, seq);
      await q.executeRaw('block-export-add', { type: 'nbd', id: name, 'node-name': layerNode(d.id, seq), name, writable: true }, CMD);
      exports[d.id] = name;
    }
    return { seq, host: this.#host, port: this.#m.daemon!.port, exports };
  }

  /**
   * Every backup job of sync `seq` completed on the source (and its NBD client nodes are gone):
   * the overlays become the consistent point, in one manifest write; then each chain is committed
   * into its base. A failed commit leaves a longer chain, which is the same point.
   */
  async completeSync(seq: number, figures: Omit<SyncFigures, 'seq'>): Promise<void> {
    const p = this.#m.pending;
    if (!p || p.seq !== seq) throw new ReplicaError('SEQ', `sync ${seq} is not the one in flight (${p?.seq ?? 'none'})`);
    await this.#dropExports(seq);
    const disks = this.#m.disks.map((d) => ({ ...d, chain: [...d.chain, { seq, file: p.overlays[d.id]! }] }));
    this.#save({ disks, consistent: { seq, pointAt: figures.pointAt }, pending: null, lastSync: { seq, ...figures }, failedSyncs: 0 });
    this.#log.info({ seq, bytes: figures.bytes, durationMs: figures.durationMs }, 'replica sync consistent');
    await this.#commitAll();
  }

  /** Sync `seq` will not complete: its overlays go; the consistent point is untouched. Idempotent. */
  async abortSync(seq: number): Promise<void> {
    const p = this.#m.pending;
    if (!p || p.seq !== seq) return;
    const q = this.#qmp;
    if (q) {
      await this.#dropExports(seq).catch((err: unknown) => this.#log.warn({ err: errorText(err) }, 'dropping a sync export failed'));
      for (const d of this.#m.disks) await q.executeRaw('blockdev-del', { 'node-name': layerNode(d.id, seq) }, CMD).catch(() => undefined);
    }
    for (const f of Object.values(p.overlays)) rmSync(f, { force: true });
    this.#save({ pending: null, failedSyncs: this.#m.failedSyncs + 1 });
    this.#log.warn({ seq }, 'replica sync discarded; the previous point stands');
  }

  /**
   * The daemon lets go of the chains (a recovery or a delta evacuation opens them in a VM): any
   * sync in flight discarded, the chains committed where possible, the daemon quit. Returns the
   * top file of each disk's chain (its qcow2 header names the rest).
   */
  async release(): Promise<{ tops: Record<string, string>; consistent: Manifest['consistent'] }> {
    if (!this.#m.consistent) throw new ReplicaError('NO_REPLICA', `the replica of ${this.#m.vm} has no consistent point yet`, { userError: true });
    if (this.#m.state === 'active') {
      if (this.#m.pending) await this.abortSync(this.#m.pending.seq);
      await this.#commitAll();
      await this.#stopDaemon();
      rmSync(this.#tlsDir, { recursive: true, force: true });
      this.#save({ state: 'released', daemon: null, ...(this.#port > 0 ? { port: this.#port } : {}) });
    }
    return { tops: Object.fromEntries(this.#m.disks.map((d) => [d.id, d.chain.at(-1)!.file])), consistent: this.#m.consistent };
  }

  /** Undo of release (a delta evacuation rolled back): the daemon serves the chains again. */
  async reactivate(): Promise<void> {
    if (this.#m.state === 'active') return;
    this.#save({ state: 'active' });
    await this.#startDaemon();
  }

  /**
   * The NBD server as this sync wants it. Changed only between syncs (no export is open then):
   * the server stops, the TLS objects are replaced, it starts again. A protection that follows
   * its VM to another host thus admits the new source's certificate from its next sync on.
   */
  async #serve(q: QmpClient, tls: ReplicaServerTls | undefined): Promise<void> {
    const want = tls?.peerIdentity ?? null;
    if (this.#serving === want) return;
    this.#serving = undefined;
    await q.executeRaw('nbd-server-stop', undefined, CMD).catch(() => undefined);
    // qemu-storage-daemon has no /objects until the first object-add (qom-list fails there):
    // each is deleted blind; one that could not go makes the object-add below fail loudly.
    for (const id of [DATA_TLS_IDS.authz, DATA_TLS_IDS.server]) await q.executeRaw('object-del', { id }, CMD).catch(() => undefined);
    rmSync(this.#tlsDir, { recursive: true, force: true });
    const addr = { type: 'inet', data: { host: this.#host, port: String(this.#m.daemon!.port) } };
    if (tls) {
      const { serverDir } = await writeCredentialDirs(this.#tlsDir, tls.material);
      await q.executeRaw('object-add', { 'qom-type': 'tls-creds-x509', id: DATA_TLS_IDS.server, dir: serverDir, endpoint: 'server', 'verify-peer': true }, CMD);
      await q.executeRaw('object-add', { 'qom-type': 'authz-simple', id: DATA_TLS_IDS.authz, identity: tls.peerIdentity }, CMD);
      await q.executeRaw('nbd-server-start', { addr, ...SERVER_TLS }, CMD);
    } else {
      await q.executeRaw('nbd-server-start', { addr }, CMD);
    }
    this.#serving = want;
    this.#log.info({ port: this.#m.daemon!.port, tls: tls ? { admits: tls.peerIdentity } : false }, 'replica NBD server started');
  }

  /** The daemon's TLS files (0700), there while its NBD server runs over TLS. */
  get #tlsDir(): string {
    return join(this.dir, 'tls');
  }

  /** This owner lets go; the daemon keeps the replica. */
  async detach(): Promise<void> {
    await this.#qmp?.close();
    this.#qmp = undefined;
  }

  /** Unprotect: the daemon quits and the replica's files go (unless released into a VM's use). */
  async destroy(opts: { keepFiles?: boolean } = {}): Promise<void> {
    await this.#stopDaemon();
    rmSync(this.#tlsDir, { recursive: true, force: true });
    if (!opts.keepFiles && this.#m.state === 'active') rmSync(this.dir, { recursive: true, force: true });
  }

  #daemon(): QmpClient {
    if (!this.#qmp || this.#m.state !== 'active') throw new ReplicaError('DAEMON', `the replica daemon of ${this.#m.vm} is not running`);
    return this.#qmp;
  }

  #save(patch: Partial<Manifest>): void {
    this.#m = { ...this.#m, ...patch };
    writeManifest(this.dir, this.#m);
  }

  async #startDaemon(): Promise<void> {
    rmSync(this.#socket, { force: true });
    const logFd = openSync(join(this.dir, 'qsd.log'), 'a', 0o600);
    const child = spawn(this.#binary, ['--chardev', `socket,id=mon,path=${this.#socket},server=on,wait=off`, '--monitor', 'chardev=mon'], {
      detached: true,
      stdio: ['ignore', 'ignore', logFd],
    });
    closeSync(logFd);
    const spawned = new Promise<void>((resolve, reject) => child.once('spawn', resolve).once('error', reject));
    await spawned.catch((err: unknown) => {
      throw new ReplicaError('DAEMON', `cannot start ${this.#binary}: ${errorText(err)}`, { cause: err });
    });
    child.unref();
    const pid = child.pid!;
    this.#qmp = await connectWhenUp(this.#socket, 10_000);
    const pidStart = processStartTime(pid);
    if (pidStart === undefined) throw new ReplicaError('DAEMON', `${this.#binary} exited at start (see ${join(this.dir, 'qsd.log')})`);
    this.#save({ daemon: { pid, pidStart, port: this.#port, host: this.#host } });
    const q = this.#qmp;
    // No NBD server yet: the first sync starts it, with its TLS (#serve).
    this.#serving = undefined;
    rmSync(this.#tlsDir, { recursive: true, force: true });
    for (const d of this.#m.disks) {
      for (const [i, layer] of d.chain.entries()) {
        const backing = i === 0 ? null : layerNode(d.id, d.chain[i - 1]!.seq);
        await q.executeRaw('blockdev-add', { driver: 'qcow2', 'node-name': layerNode(d.id, layer.seq), file: { driver: 'file', filename: layer.file }, backing }, CMD);
      }
    }
    this.#log.info({ pid, port: this.#port }, 'replica daemon started');
    // What a crash left: a sync in flight is discarded, an interrupted commit finished.
    const p = this.#m.pending;
    if (p) {
      for (const f of Object.values(p.overlays)) rmSync(f, { force: true });
      this.#save({ pending: null, failedSyncs: this.#m.failedSyncs + 1 });
    }
    await this.#commitAll();
  }

  async #stopDaemon(): Promise<void> {
    const d = this.#m.daemon;
    const q = this.#qmp;
    this.#qmp = undefined;
    if (q) {
      await q.executeRaw('quit', undefined, CMD).catch(() => undefined);
      await q.close();
    }
    if (!d) return;
    const deadline = performance.now() + 10_000;
    while (processStartTime(d.pid) === d.pidStart) {
      if (performance.now() > deadline) {
        this.#log.warn({ pid: d.pid }, 'replica daemon did not quit: SIGKILL');
        try {
          process.kill(d.pid, 'SIGKILL');
        } catch {
          // gone meanwhile
        }
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async #dropExports(seq: number): Promise<void> {
    const q = this.#daemon();
    const names = new Set(this.#m.disks.map((d) => syncExportName(this.#m.vm, d.id, seq)));
    for (const id of names) await q.executeRaw('block-export-del', { id, mode: 'hard' }, CMD).catch(() => undefined);
    const deadline = performance.now() + 10_000;
    for (;;) {
      const list = parseExports(await q.executeRaw('query-block-exports', undefined, CMD));
      if (!list.some((e) => names.has(e))) return;
      if (performance.now() > deadline) throw new ReplicaError('DAEMON', `exports of sync ${seq} still there 10 s after block-export-del`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Each chain longer than its base is committed into the base (an active block-commit), then the overlays go. */
  async #commitAll(): Promise<void> {
    const q = this.#daemon();
    for (const d of this.#m.disks) {
      if (d.chain.length < 2) continue;
      const top = d.chain.at(-1)!;
      const base = d.chain[0]!;
      const job = `commit-${d.id}`;
      try {
        const since = q.eventCursor();
        await q.executeRaw('block-commit', { 'job-id': job, device: layerNode(d.id, top.seq), 'base-node': layerNode(d.id, base.seq), 'auto-dismiss': true }, CMD);
        await q.waitForEvent((e) => eventIs(e, 'BLOCK_JOB_READY') && e.data.device === job, { since, timeoutMs: 600_000, what: `commit ${job} to be ready` });
        await q.executeRaw('block-job-complete', { device: job }, CMD);
        const done = await q.waitForEvent((e) => (eventIs(e, 'BLOCK_JOB_COMPLETED') || eventIs(e, 'BLOCK_JOB_CANCELLED')) && e.data.device === job, { since, timeoutMs: 60_000, what: `commit ${job} to complete` });
        if (!eventIs(done, 'BLOCK_JOB_COMPLETED') || done.data.error !== undefined) throw new ReplicaError('COMMIT', `commit of ${d.id} ended without completing`);
      } catch (err) {
        this.#log.warn({ disk: d.id, err: errorText(err) }, 'commit into the replica base failed; the chain stays (same point)');
        continue;
      }
      for (const layer of d.chain.slice(1).reverse()) await q.executeRaw('blockdev-del', { 'node-name': layerNode(d.id, layer.seq) }, CMD).catch(() => undefined);
      // The base now holds the point; the manifest says so before the overlay files go.
      this.#save({ disks: this.#m.disks.map((x) => (x.id === d.id ? { ...x, chain: [base] } : x)) });
      for (const layer of d.chain.slice(1)) rmSync(layer.file, { force: true });
    }
  }
}

function parseExports(raw: unknown): string[] {
  if (!Array.isArray(raw)) return [];
  const out: string[] = [];
  for (const e of raw as unknown[]) if (e && typeof e === 'object' && 'id' in e && typeof e.id === 'string') out.push(e.id);
  return out;
}

async function connectWhenUp(path: string, timeoutMs: number): Promise<QmpClient> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    try {
      return await QmpClient.connect({ path }, { timeoutMs: 2_000, name: 'replica-daemon' });
    } catch (err) {
      if (performance.now() > deadline) throw new ReplicaError('DAEMON', `the replica daemon's monitor at ${path} did not answer within ${timeoutMs} ms: ${errorText(err)}`, { cause: err });
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

export function freeBytesAt(dir: string): number {
  const s = statfsSync(dir);
  return s.bavail * s.bsize;
}

function mib(n: number): number {
  return Math.round(n / 2 ** 20);
}
