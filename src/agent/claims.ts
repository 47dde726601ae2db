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

/**
 * A state file read back through its schema: undefined when there is none; one that does not
 * parse is set aside as `.bad` (logged as `what`) and the agent starts without it.
 */
function loadState<T>(file: string, schema: z.ZodType<T>, what: string, log: Logger): T | undefined {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  try {
    return schema.parse(JSON.parse(text));
  } catch (err) {
    log.error({ path: file, err: String(err) }, `unreadable ${what} set aside (renamed to .bad)`);
    renameSync(file, `${file}.bad`);
    return undefined;
  }
}

/** Written under a temporary name and renamed into place: a crash leaves the old file or the new. */
function saveState(file: string, value: unknown): void {
  writeFileSync(`${file}.tmp`, JSON.stringify(value), { mode: 0o600 });
  renameSync(`${file}.tmp`, file);
}

export class DiskClaims {
  readonly #file: string;
  readonly #owners = new Map<string, string>();

  constructor(stateDir: string, log: Logger) {
    this.#file = join(stateDir, 'claims.json');
    for (const [path, principal] of Object.entries(loadState(this.#file, claimsSchema, 'disk claims', log) ?? {})) this.#owners.set(path, principal);
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
    saveState(this.#file, Object.fromEntries(this.#owners));
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
    for (const path of loadState(this.#file, z.array(z.string().min(1)), 'incoming disks', log) ?? []) this.#paths.add(path);
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
    saveState(this.#file, [...this.#paths]);
  }
}
