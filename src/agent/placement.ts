/**
 * Where a caller's VM may live on this host, and whose each path is. A principal's token grants
 * its own VMs and the files they use, nothing more:
 *   - every path of a spec confined (paths.ts): disks and run dir in the storage root, kernel and
 *     initrd there or in a boot root, never through a symbolic link, never in the agent's state;
 *   - no raw QEMU options (extraArgs) from the API: they reach QEMU's argv verbatim;
 *   - a disk that another principal's VM uses, or that another principal claimed, is refused; so
 *     is one that a running VM of the same principal uses;
 *   - a run dir is removed whole when its VM is deleted, so it may hold nothing but that VM's
 *     own run files: not the root, not the state dir, not another VM's disk or run dir, not the
 *     VM's own disks, and not inside another VM's run dir.
 * Admin principals (config adminPrincipals) pass the ownership checks, never the confinement.
 */
import { canonicalPath, parseVmSpec, type VmSpec } from '../qemu/spec.js';
import type { DiskClaims } from './claims.js';
import { AgentError } from './errors.js';
import { confinedPath, within } from './paths.js';
import type { VmRecord } from './registry.js';

export interface PlacementDeps {
  storageRoot: string;
  bootRoots: readonly string[];
  stateDir: string;
  admins: ReadonlySet<string>;
  claims: DiskClaims;
  records: () => VmRecord[];
}

export class Placement {
  readonly #d: PlacementDeps;

  /** The agent's state dir where it really is: the agent makes it before any caller can ask. */
  readonly #stateDir: string;

  constructor(deps: PlacementDeps) {
    this.#d = deps;
    this.#stateDir = canonicalPath(deps.stateDir);
  }

  isAdmin(principal: string): boolean {
    return this.#d.admins.has(principal);
  }

  /** A spec from a caller, parsed, with every path confined and resolved onto its root. */
  confineSpec(input: unknown): VmSpec {
    const spec = parseVmSpec(input);
    if (spec.extraArgs.length > 0) {
      throw new AgentError('EXTRA_ARGS_REFUSED', 'extraArgs: raw QEMU options are not accepted over the API (they reach QEMU verbatim); the agent builds every option itself', {
        userError: true,
        context: { field: 'extraArgs' },
      });
    }
    const disks = spec.disks.map((d, i) => ({ ...d, path: this.diskPath(d.path, `disks.${i}.path`) }));
    const runDir = this.diskPath(spec.runDir, 'runDir');
    const bootRoots = [this.#d.storageRoot, ...this.#d.bootRoots];
    const boot =
      'kernel' in spec.boot
        ? {
            ...spec.boot,
            kernel: confinedPath(spec.boot.kernel, bootRoots, 'boot.kernel'),
            ...(spec.boot.initrd ? { initrd: confinedPath(spec.boot.initrd, bootRoots, 'boot.initrd') } : {}),
          }
        : spec.boot;
    return { ...spec, disks, runDir, boot };
  }

  /** A path for a disk or run dir: in the storage root, outside the agent's state. */
  diskPath(p: string, field: string): string {
    const c = confinedPath(p, [this.#d.storageRoot], field);
    const state = this.#stateDir;
    if (within(c, state) || within(state, c)) throw new AgentError('PATH_REFUSED', `${field}: ${p} is inside the agent's state directory`, { userError: true, context: { field } });
    return c;
  }

  /** Who owns a disk file: its claim, else the record that uses it. */
  ownerOf(path: string): string | undefined {
    return this.#d.claims.owner(path) ?? this.#d.records().find((r) => r.spec.disks.some((d) => d.path === path))?.principal;
  }

  /**
   * May `principal` run `spec` here (vm.create, vm.start, dest.start)? `self` is the record being
   * started; `claimed`: every disk must already be this principal's (dest.start: made by
   * dest.createDisk), not merely unowned.
   */
  checkPlacement(principal: string, spec: VmSpec, opts: { self?: VmRecord; claimed?: boolean } = {}): void {
    const others = this.#d.records().filter((r) => r !== opts.self);
    const admin = this.isAdmin(principal);
    for (const [i, d] of spec.disks.entries()) {
      const field = `disks.${i}.path`;
      const owner = this.ownerOf(d.path);
      if (owner !== undefined && owner !== principal && !admin) throw new AgentError('NOT_YOURS', `${field}: ${d.path} belongs to another principal`, { userError: true, context: { field } });
      if (opts.claimed && owner === undefined) throw new AgentError('NOT_YOURS', `${field}: ${d.path} was not made by dest.createDisk for you`, { userError: true, context: { field } });
      for (const r of others) {
        if (r.spec.disks.some((o) => o.path === d.path) && r.state === 'running') {
          throw new AgentError('PATH_IN_USE', `${field}: ${d.path} is a disk of VM '${r.name}', which runs`, { userError: true, context: { field } });
        }
        if (within(d.path, r.spec.runDir)) throw new AgentError('NOT_YOURS', `${field}: ${d.path} is inside the run dir of VM '${r.name}'`, { userError: true, context: { field } });
      }
    }
    this.checkRunDir(spec, others);
  }

  /** Before a run dir is created or removed whole: it holds only this VM's run files. */
  checkRunDir(spec: VmSpec, others: VmRecord[] = this.#d.records()): void {
    const dir = spec.runDir;
    const refuse = (why: string): never => {
      throw new AgentError('RUNDIR_REFUSED', `runDir: ${dir} ${why}`, { userError: true, context: { field: 'runDir' } });
    };
    for (const d of spec.disks) if (within(d.path, dir)) refuse(`holds the VM's own disk ${d.path} (vm.delete removes the run dir whole)`);
    for (const r of others) {
      if (within(dir, r.spec.runDir)) refuse(`is inside the run dir of VM '${r.name}'`);
      if (within(r.spec.runDir, dir)) refuse(`holds the run dir of VM '${r.name}'`);
      for (const d of r.spec.disks) if (within(d.path, dir)) refuse(`holds a disk of VM '${r.name}'`);
    }
  }

  /** Before a run dir is removed whole (vm.delete, dest.*): confined again, and only its own. */
  checkRemovable(r: VmRecord): void {
    this.diskPath(r.spec.runDir, 'runDir');
    this.checkRunDir(r.spec, this.#d.records().filter((o) => o !== r));
  }

  /** dest.createDisk / dest.removeDisk: the canonical path, if `principal` may make or remove it. */
  diskOp(principal: string, path: string, op: 'create' | 'remove'): string {
    const c = this.diskPath(path, 'path');
    const owner = this.ownerOf(c);
    const admin = this.isAdmin(principal);
    if (op === 'remove' && owner === undefined && !admin) throw new AgentError('NOT_YOURS', `path: ${path} is no disk of yours`, { userError: true });
    if (owner !== undefined && owner !== principal && !admin) throw new AgentError('NOT_YOURS', `path: ${path} belongs to another principal`, { userError: true });
    for (const r of this.#d.records()) {
      if (op === 'remove' && r.state === 'running' && r.spec.disks.some((d) => d.path === c)) {
        throw new AgentError('PATH_IN_USE', `path: ${path} is a disk of VM '${r.name}', which runs`, { userError: true });
      }
      if (within(c, r.spec.runDir)) throw new AgentError('NOT_YOURS', `path: ${path} is inside the run dir of VM '${r.name}'`, { userError: true });
    }
    return c;
  }
}
