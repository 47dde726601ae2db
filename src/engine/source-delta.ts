/**
 * Source side of a delta evacuation: NBD client nodes on the destination's exports (the same as
 * the mirrors', source-mirror.ts), then blockdev-backup passes, each ONE transaction per pass over
 * every disk: add bitmap ferry-delta-<p>, back up what bitmap p-1 (pass 1: the replica's
 * ferry-replica-<seq>) holds, with bitmap-mode `never`. Backup copies the disks as they were at
 * the pass's instant; what the guest writes meanwhile is in bitmap p, which the next pass copies.
 * Passes run until one is small, then keep running behind RAM pre-copy; the last runs with the
 * guest paused at pre-switchover, after which the destination's disks equal the source's.
 *
 * A failed pass removes its own bitmap; the older one still holds every block since its instant.
 * Nothing here touches the replica's bitmap: a rollback leaves protection able to go on.
 */
import { diskNodeName } from '../qemu/spec.js';
import { eventIs, type QmpClient } from '../qmp/index.js';
import { QMP_TIMEOUT_MS, type DestinationState, type MigrationContext, type SourceState } from './context.js';
import { deltaBitmapName, deltaJobId, type DeltaReplica } from './delta.js';
import { targetNodeName } from './names.js';
import { cancelJob, deleteNode } from './primitives.js';
import { targetNodeArguments } from './source-mirror.js';
import { MigrationError, type MigrationPlan } from './types.js';

/** A pass this small (bytes over all disks) ends the live passes before RAM. */
const SMALL_PASS_BYTES = 8 << 20;
const MAX_LIVE_PASSES = 8;

export interface DeltaPassFigures {
  passes: number;
  /** Bytes the passes copied, all disks, the pause's pass included. */
  bytes: number;
  /** The pause's pass: bytes and ms (it is in the downtime). */
  finalBytes: number;
  finalMs: number;
}

export class SourceDeltaPasses {
  readonly #ctx: MigrationContext;
  readonly #q: QmpClient;
  readonly #plan: MigrationPlan;
  #pass = 0;
  /** The bitmap the next pass copies. */
  #from: string;
  #bytes = 0;
  #background: Promise<void> | undefined;
  #stop = false;
  #failed: unknown;
  #final = { bytes: 0, ms: 0 };

  constructor(ctx: MigrationContext, input: { source: SourceState; plan: MigrationPlan; delta: DeltaReplica }) {
    this.#ctx = ctx;
    this.#q = input.source.qmp;
    this.#plan = input.plan;
    this.#from = `ferry-replica-${input.delta.seq}`;
  }

  /** The NBD client nodes, each undo registered before its node is made. */
  async attach(dest: DestinationState): Promise<void> {
    const q = this.#q;
    for (const disk of this.#plan.disks) {
      const node = targetNodeName(disk.id);
      this.#ctx.undo.push(`delete source NBD node ${node}`, 'source', () => deleteNode(q, node, QMP_TIMEOUT_MS));
      await q.execute('blockdev-add', targetNodeArguments(this.#ctx, dest, disk, this.#plan.dataTls), this.#ctx.call());
    }
    this.#ctx.undo.push('remove the delta passes’ bitmaps', 'source', () => this.#removePassBitmaps());
  }

  /** Passes with the guest running until one copies little (or MAX_LIVE_PASSES). */
  async converge(): Promise<void> {
    for (let i = 0; i < MAX_LIVE_PASSES; i++) {
      this.#ctx.throwIfAborted();
      if ((await this.#runPass(true)) < SMALL_PASS_BYTES) return;
    }
  }

  /** Keeps passing behind RAM pre-copy, so the pause's pass has little left; failures kept for finish(). */
  startBackground(): void {
    this.#background = (async () => {
      while (!this.#stop) {
        try {
          await this.#runPass(true);
        } catch (err) {
          this.#failed = err;
          return;
        }
        await new Promise((r) => setTimeout(r, 200));
      }
    })();
  }

  /** For the RAM phase's checks: a background pass that failed fails the migration now. */
  check(): void {
    if (this.#failed !== undefined) throw this.#failed;
  }

  /** In the pause at pre-switchover: the background ends, and one last pass copies what is left. */
  async finish(): Promise<void> {
    this.#stop = true;
    await this.#background;
    this.check();
    const t = performance.now();
    // Nothing is asked of the source's block layer in the pause but the pass itself: QEMU 7.2
    // died (SIGSEGV) answering query-named-block-nodes at pre-switchover after delta passes.
    this.#final.bytes = await this.#runPass(false);
    this.#final.ms = Math.round(performance.now() - t);
  }

  figures(): DeltaPassFigures {
    return { passes: this.#pass, bytes: this.#bytes, finalBytes: this.#final.bytes, finalMs: this.#final.ms };
  }

  /** After `cont`: the NBD client nodes and the passes' bitmaps go (tidy). */
  async detach(): Promise<void> {
    for (const disk of this.#plan.disks) await deleteNode(this.#q, targetNodeName(disk.id), QMP_TIMEOUT_MS);
    await this.#removePassBitmaps();
  }

  /** One pass over every disk; `track`: add the next bitmap (not in the pause: nothing writes). Returns its bytes. */
  async #runPass(track: boolean): Promise<number> {
    const q = this.#q;
    const pass = ++this.#pass;
    const next = deltaBitmapName(pass);
    const actions = this.#plan.disks.flatMap((d) => [
      ...(track ? [{ type: 'block-dirty-bitmap-add', data: { node: diskNodeName(d.id), name: next, persistent: false } }] : []),
      { type: 'blockdev-backup', data: { 'job-id': deltaJobId(d.id), device: diskNodeName(d.id), target: targetNodeName(d.id), sync: 'bitmap', bitmap: this.#from, 'bitmap-mode': 'never' } },
    ]);
    const since = q.eventCursor();
    try {
      await q.executeRaw('transaction', { actions }, this.#ctx.call());
      let bytes = 0;
      await Promise.all(
        this.#plan.disks.map(async (d) => {
          const id = deltaJobId(d.id);
          const ev = await q.waitForEvent((e) => (eventIs(e, 'BLOCK_JOB_COMPLETED') || eventIs(e, 'BLOCK_JOB_CANCELLED')) && e.data.device === id, {
            since,
            timeoutMs: Math.max(30_000, this.#plan.deadlineMs),
            signal: this.#ctx.signal,
            what: `delta pass ${pass} of disk ${d.id} to complete`,
          });
          if (!eventIs(ev, 'BLOCK_JOB_COMPLETED') || ev.data.error !== undefined) {
            throw new MigrationError('DELTA_PASS_FAILED', `delta pass ${pass} of disk '${d.id}' did not complete: ${eventIs(ev, 'BLOCK_JOB_COMPLETED') ? ev.data.error : 'cancelled'}`, { phase: this.#ctx.phase });
          }
          bytes += ev.data.len;
        }),
      );
      this.#bytes += bytes;
      if (track) {
        // The pass is in: the bitmap it copied is superseded (the replica's own stays for protection).
        if (this.#from.startsWith('ferry-delta-')) await this.#removeBitmap(this.#from);
        this.#from = next;
      }
      this.#ctx.log.info({ pass, bytes, paused: !track }, 'delta pass');
      return bytes;
    } catch (err) {
      for (const d of this.#plan.disks) await cancelJob(q, deltaJobId(d.id)).catch(() => undefined);
      if (track) await this.#removeBitmap(next).catch(() => undefined);
      throw err;
    }
  }

  async #removeBitmap(name: string): Promise<void> {
    for (const d of this.#plan.disks) {
      await this.#q.executeRaw('block-dirty-bitmap-remove', { node: diskNodeName(d.id), name }, { timeoutMs: QMP_TIMEOUT_MS }).catch(() => undefined);
    }
  }

  async #removePassBitmaps(): Promise<void> {
    for (let p = 1; p <= this.#pass; p++) await this.#removeBitmap(deltaBitmapName(p));
  }
}
