/**
 * Which principal owns a disk file the agent made or was given: dest.createDisk and vm.create
 * claim their disks, and deleting the file ends the claim. Persisted (write + rename) beside the
 * VM records, so ownership survives a restart; a record's own paths count as its principal's too.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import type { Logger } from '../log.js';

const claimsSchema = z.record(z.string(), z.string().min(1));

export class DiskClaims {
  readonly #file: string;
  readonly #owners = new Map<string, string>();

  constructor(stateDir: string, log: Logger) {
    this.#file = join(stateDir, 'claims.json');
    let text: string | undefined;
    try {
      text = readFileSync(this.#file, 'utf8');
    } catch {
      text = undefined;
    }
    if (text !== undefined) {
      try {
        for (const [path, principal] of Object.entries(claimsSchema.parse(JSON.parse(text)))) this.#owners.set(path, principal);
      } catch (err) {
        log.error({ path: this.#file, err: String(err) }, 'unreadable disk claims set aside (renamed to .bad)');
        renameSync(this.#file, `${this.#file}.bad`);
      }
    }
  }

  owner(path: string): string | undefined {
    return this.#owners.get(path);
  }

  claim(path: string, principal: string): void {
    this.#owners.set(path, principal);
    this.#save();
  }

  release(path: string): void {
    if (this.#owners.delete(path)) this.#save();
  }

  #save(): void {
    writeFileSync(`${this.#file}.tmp`, JSON.stringify(Object.fromEntries(this.#owners)), { mode: 0o600 });
    renameSync(`${this.#file}.tmp`, this.#file);
  }
}

/**
 * Disks dest.createDisk made for a migration whose incoming VM has not started yet (no record
 * names them). Persisted, so an agent restarted in between (its caller's session gone with it)
 * removes them: no QEMU ever opened them, nothing of a guest can be in them.
 */
export class IncomingDisks {
  readonly #file: string;
  readonly #paths = new Set<string>();

  constructor(stateDir: string, log: Logger) {
    this.#file = join(stateDir, 'incoming-disks.json');
    let text: string | undefined;
    try {
      text = readFileSync(this.#file, 'utf8');
    } catch {
      text = undefined;
    }
    if (text !== undefined) {
      try {
        for (const path of z.array(z.string().min(1)).parse(JSON.parse(text))) this.#paths.add(path);
      } catch (err) {
        log.error({ path: this.#file, err: String(err) }, 'unreadable incoming disks set aside (renamed to .bad)');
        renameSync(this.#file, `${this.#file}.bad`);
      }
    }
  }

  all(): string[] {
    return [...this.#paths];
  }

  add(path: string): void {
    this.#paths.add(path);
    this.#save();
  }

  remove(path: string): void {
    if (this.#paths.delete(path)) this.#save();
  }

  #save(): void {
    writeFileSync(`${this.#file}.tmp`, JSON.stringify([...this.#paths]), { mode: 0o600 });
    renameSync(`${this.#file}.tmp`, this.#file);
  }
}
