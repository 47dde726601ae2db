/**
 * The VMs an agent owns, persisted one JSON file per VM under the agent's state dir, so that a
 * restarted agent knows them again. A record is written before the agent acts on the VM it
 * describes (style: persist the phase before the next side effect), and every state change goes
 * through `transition`, which refuses the impossible ones.
 *
 *   stopped ──start──► running ──quit/stop──► stopped
 *                         │ └──exit nobody asked for──► died ──start──► running
 *                         └──retired after a migration──► (record removed)
 *
 * role 'incoming' is a migration's destination QEMU; `adopt` turns it into an ordinary VM of
 * this host once the engine releases it (the guest now runs here).
 */
import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import { parseVmSpec, type VmSpec } from '../qemu/spec.js';

export type VmState = 'stopped' | 'running' | 'died';
export type VmRole = 'vm' | 'incoming';

const recordSchema = z
  .object({
    vmId: z.string().regex(/^[a-z0-9-]{1,64}$/),
    name: z.string().min(1),
    principal: z.string().min(1),
    role: z.enum(['vm', 'incoming']),
    state: z.enum(['stopped', 'running', 'died']),
    spec: z.unknown(),
    pid: z.number().int().positive().optional(),
    /** /proc/<pid>/stat field 22: tells a re-used PID from our QEMU after a restart. */
    pidStart: z.string().optional(),
    contForwarded: z.boolean().optional(),
    updatedAt: z.number(),
  })
  .strict();

export interface VmRecord {
  readonly vmId: string;
  readonly name: string;
  readonly principal: string;
  role: VmRole;
  state: VmState;
  readonly spec: VmSpec;
  pid?: number | undefined;
  pidStart?: string | undefined;
  /**
   * An incoming VM: whether a `cont` for it ever went through this agent's tunnel, persisted
   * before QEMU got it. `false` is the proof that it never ran (nothing else sends it `cont`);
   * absent (a record of an older agent) proves nothing.
   */
  contForwarded?: boolean | undefined;
  updatedAt: number;
}

const ALLOWED: Record<VmState, readonly VmState[]> = {
  stopped: ['running'],
  running: ['stopped', 'died'],
  died: ['running', 'stopped'],
};

export class RegistryError extends FerryError {
  override name = 'RegistryError';
}

export class VmRegistry {
  readonly #dir: string;
  readonly #log: Logger;
  readonly #records = new Map<string, VmRecord>();

  constructor(stateDir: string, log: Logger) {
    this.#dir = join(stateDir, 'vms');
    this.#log = log;
    mkdirSync(this.#dir, { recursive: true, mode: 0o700 });
  }

  /** Reads every record back; a file that does not parse is set aside, loudly, never deleted. */
  load(storageRoot: string): VmRecord[] {
    for (const f of readdirSync(this.#dir)) {
      if (!f.endsWith('.json')) continue;
      const path = join(this.#dir, f);
      try {
        const raw = recordSchema.parse(JSON.parse(readFileSync(path, 'utf8')));
        const spec = parseVmSpec(raw.spec, { allowedRoots: [storageRoot] });
        this.#records.set(raw.vmId, { ...raw, spec });
      } catch (err) {
        this.#log.error({ path, err: String(err) }, 'unreadable VM record set aside (renamed to .bad)');
        renameSync(path, `${path}.bad`);
      }
    }
    return [...this.#records.values()];
  }

  get(vmId: string): VmRecord | undefined {
    return this.#records.get(vmId);
  }

  all(): VmRecord[] {
    return [...this.#records.values()];
  }

  byName(principal: string, name: string): VmRecord | undefined {
    return this.all().find((r) => r.principal === principal && r.name === name && r.role === 'vm');
  }

  add(rec: Omit<VmRecord, 'updatedAt'>): VmRecord {
    if (this.#records.has(rec.vmId)) throw new RegistryError('VM_EXISTS', `VM id '${rec.vmId}' is taken`);
    const r: VmRecord = { ...rec, updatedAt: Date.now() };
    this.#records.set(r.vmId, r);
    this.#save(r);
    return r;
  }

  transition(r: VmRecord, to: VmState, fields: { pid?: number | undefined; pidStart?: string | undefined } = {}): void {
    if (!ALLOWED[r.state].includes(to)) {
      throw new RegistryError('BAD_TRANSITION', `VM '${r.name}' cannot go from ${r.state} to ${to}`, { userError: true, context: { vmId: r.vmId } });
    }
    this.#log.info({ vmId: r.vmId, vm: r.name, from: r.state, to }, 'VM state');
    r.state = to;
    if ('pid' in fields) r.pid = fields.pid;
    if ('pidStart' in fields) r.pidStart = fields.pidStart;
    r.updatedAt = Date.now();
    this.#save(r);
  }

  /** The engine released a destination QEMU: from now on it is an ordinary VM of this host. */
  adopt(r: VmRecord): void {
    r.role = 'vm';
    r.updatedAt = Date.now();
    this.#save(r);
  }

  /** Synchronous: on disk before the `cont` it records reaches QEMU. */
  markContForwarded(r: VmRecord): void {
    if (r.contForwarded === true) return;
    r.contForwarded = true;
    r.updatedAt = Date.now();
    this.#save(r);
  }

  remove(r: VmRecord): void {
    this.#records.delete(r.vmId);
    rmSync(join(this.#dir, `${r.vmId}.json`), { force: true });
  }

  #save(r: VmRecord): void {
    const path = join(this.#dir, `${r.vmId}.json`);
    // Write then rename: a crash leaves the old record or the new one, never half of one.
    writeFileSync(`${path}.tmp`, JSON.stringify(r), { mode: 0o600 });
    renameSync(`${path}.tmp`, path);
  }
}

/** The kernel's start time of `pid`, or undefined if there is no such process or it is a zombie. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // comm (field 2) may hold spaces and parentheses: count fields after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (rest[0] === 'Z' || rest[0] === 'X') return undefined;
    return rest[19];
  } catch {
    return undefined;
  }
}
