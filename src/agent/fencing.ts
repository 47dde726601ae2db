/**
 * Fencing: the highest epoch this agent has seen per VM, so that a scheduler replica that lost
 * its claim on a migration (paused past its lease, partitioned) cannot act on it any more.
 *
 * A session or QMP tunnel may carry a fence (a VM name and an epoch, at the upgrade). A fence
 * higher than the one remembered raises it, at once and persisted, before anything else happens
 * on that session; a session whose epoch is below the remembered one is stale, and its mutating
 * calls are refused (STALE_EPOCH) and counted. Sessions without a fence (migrate-vm, a single
 * SQLite scheduler) are not fenced. Persisted beside the VM records (write + rename), so a
 * restarted agent still refuses what it refused before. A raised epoch also cuts the QMP tunnels
 * opened under an older one (server.ts): QEMU's monitor takes one client at a time, and a stale
 * replica that holds it (paused, partitioned) would keep the new owner from settling the VM.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import type { Logger } from '../log.js';
import { AgentError } from './errors.js';

const fileSchema = z.object({ epochs: z.record(z.string(), z.number().int().nonnegative()), refused: z.number().int().nonnegative() }).strict();

/** What a session presented: the VM (by name, within its principal) and the claim's epoch. */
export interface SessionFence {
  key: string;
  vm: string;
  epoch: number;
}

export const fenceHeadersSchema = z.object({
  vm: z.string().min(1).max(256),
  epoch: z.string().regex(/^\d{1,15}$/, 'must be a non-negative integer').transform(Number),
});

export class Fences {
  readonly #file: string;
  readonly #log: Logger;
  readonly #epochs = new Map<string, number>();
  #refused = 0;
  readonly #onRefused: ((what: string) => void) | undefined;

  /** onRefused: each refusal, as it happens (the agent's metrics count them). */
  constructor(stateDir: string, log: Logger, onRefused?: (what: string) => void) {
    this.#file = join(stateDir, 'fencing.json');
    this.#log = log;
    this.#onRefused = onRefused;
    let text: string | undefined;
    try {
      text = readFileSync(this.#file, 'utf8');
    } catch {
      text = undefined;
    }
    if (text === undefined) return;
    try {
      const f = fileSchema.parse(JSON.parse(text));
      for (const [k, v] of Object.entries(f.epochs)) this.#epochs.set(k, v);
      this.#refused = f.refused;
    } catch (err) {
      log.error({ path: this.#file, err: String(err) }, 'unreadable fencing epochs set aside (renamed to .bad)');
      renameSync(this.#file, `${this.#file}.bad`);
    }
  }

  /** A session's fence: raises the remembered epoch if it is higher (`raised`). */
  present(principal: string, vm: string, epoch: number): { fence: SessionFence; raised: boolean } {
    const key = `${principal}/${vm}`;
    const seen = this.#epochs.get(key) ?? 0;
    if (epoch > seen) {
      this.#epochs.set(key, epoch);
      this.#save();
      this.#log.info({ vm, epoch, was: seen }, 'fencing epoch raised');
    }
    return { fence: { key, vm, epoch }, raised: epoch > seen };
  }

  /** True when a later epoch than the fence's is known. */
  isStale(fence: SessionFence): boolean {
    return fence.epoch < (this.#epochs.get(fence.key) ?? 0);
  }

  /** undefined if the session may mutate; otherwise why not (and the refusal is counted). */
  staleReason(fence: SessionFence | undefined, what: string): string | undefined {
    if (!fence) return undefined;
    const seen = this.#epochs.get(fence.key) ?? 0;
    if (fence.epoch >= seen) return undefined;
    this.#refused++;
    this.#save();
    this.#onRefused?.(what);
    this.#log.warn({ vm: fence.vm, epoch: fence.epoch, seen, what }, 'refused a call with a stale fencing epoch');
    return `${what} carries epoch ${fence.epoch} for VM '${fence.vm}', but this agent has seen epoch ${seen}: another scheduler replica owns this migration now`;
  }

  /** Throws AgentError(STALE_EPOCH) for a stale session. */
  check(fence: SessionFence | undefined, what: string): void {
    const why = this.staleReason(fence, what);
    if (why !== undefined) throw new AgentError('STALE_EPOCH', why, { userError: true, context: { vm: fence?.vm, epoch: fence?.epoch } });
  }

  /** For the status RPC (and metrics): refusals since the state dir was made, and the epochs known. */
  status(): { staleRefused: number; epochs: Record<string, number> } {
    return { staleRefused: this.#refused, epochs: Object.fromEntries(this.#epochs) };
  }

  #save(): void {
    writeFileSync(`${this.#file}.tmp`, JSON.stringify({ epochs: Object.fromEntries(this.#epochs), refused: this.#refused }), { mode: 0o600 });
    renameSync(`${this.#file}.tmp`, this.#file);
  }
}
