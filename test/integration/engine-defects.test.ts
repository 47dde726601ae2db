/**
 * Defects a review of the engine found, each pinned on real QEMU (TCG). Faults are injected at the
 * QMP client the engine is handed (a reply lost after QEMU acted, a capability hidden): the QEMUs,
 * sockets and files are real.
 */
import { execFile } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { LocalDestination, LocalSource, type LocalIncomingVm } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { MigrationError, type MigrationEvent } from '../../src/engine/types.js';
import { QmpTimeoutError, type QmpClient } from '../../src/qmp/index.js';
import type { VmSpec } from '../../src/qemu/spec.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';

const run = promisify(execFile);
afterEach(cleanupAll);

/** Every `command` reaches QEMU, which acts on it, but its reply is lost: the caller sees a timeout. */
function loseReplyOf(q: QmpClient, command: string): void {
  const execute = q.execute.bind(q);
  let lost = false;
  q.execute = (async (cmd: string, args?: unknown, opts?: unknown) => {
    const reply = await (execute as (c: string, a?: unknown, o?: unknown) => Promise<unknown>)(cmd, args, opts);
    if (cmd === command && !lost) {
      lost = true;
      throw new QmpTimeoutError(`no reply to '${cmd}' (injected)`);
    }
    return reply;
  }) as QmpClient['execute'];
}

class FaultySource extends LocalSource {
  constructor(
    spec: VmSpec,
    readonly fault: (q: QmpClient) => void,
  ) {
    super({ qmpSocket: join(spec.runDir, 'qmp.sock') });
  }
  override async connect(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QmpClient> {
    const q = await super.connect(opts);
    this.fault(q);
    return q;
  }
}

async function expectSourceWhole(q: QmpClient, hostB: string): Promise<void> {
  expect((await q.execute('query-status')).status).toBe('running');
  expect((await q.execute('query-migrate')).status ?? 'none').not.toMatch(/active|setup|pre-switchover|device/);
  expect(await q.execute('query-block-jobs')).toEqual([]);
  const nodes = await q.execute('query-named-block-nodes', { flat: true });
  expect(nodes.map((n) => n['node-name']).filter((n) => n?.startsWith('ferry-'))).toEqual([]);
  expect(await readdir(hostB)).toEqual([]);
}

describe('engine defects', () => {
  test("defect 2: a cancel right at the point of no return does not turn the cleanup into warnings (the destination's NBD server goes)", async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 32 << 20, fillMiB: 4 }], workload: { tickMs: 50 } });
    const dest = new LocalDestination({ dir: hostB });
    const ac = new AbortController();
    const warnings: string[] = [];
    const result = await migrate({
      spec,
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }),
      destination: dest,
      signal: ac.signal,
      onEvent: (e: MigrationEvent) => {
        if (e.event === 'point-of-no-return') ac.abort();
        if (e.event === 'warning') warnings.push(e.message);
      },
    });
    expect(result.ok).toBe(true);
    expect(warnings).toEqual([]);
    await vm.exited;
    const b = dest.incoming!.qmp;
    expect((await b.execute('query-status')).status).toBe('running');
    expect(await b.executeRaw('query-block-exports')).toEqual([]);
  }, 90_000);

  test('defect 4: a destination whose release fails is still a successful migration, with a warning', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 32 << 20, fillMiB: 4 }], workload: { tickMs: 50 } });
    class FailingRelease extends LocalDestination {
      override async startIncoming(s: VmSpec, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<LocalIncomingVm> {
        const incoming = await super.startIncoming(s, opts);
        incoming.release = async () => {
          throw new Error('release RPC lost (injected)');
        };
        return incoming;
      }
    }
    const dest = new FailingRelease({ dir: hostB });
    const warnings: string[] = [];
    const result = await migrate({
      spec,
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }),
      destination: dest,
      onEvent: (e) => {
        if (e.event === 'warning') warnings.push(e.message);
      },
    });
    expect(result.ok).toBe(true);
    expect(warnings).toEqual([expect.stringMatching(/release .*release RPC lost/)]);
    await vm.exited;
    expect((await dest.incoming!.qmp.execute('query-status')).status).toBe('running');
  }, 90_000);

  test.each(['migrate', 'blockdev-mirror'])("defect 3: the reply to '%s' is lost: the rollback still undoes it, the guest runs on the source as before", async (command) => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 32 << 20, fillMiB: 4 }], workload: { tickMs: 50 } });
    const err = await migrate({
      spec,
      source: new FaultySource(spec, (q) => loseReplyOf(q, command)),
      destination: new LocalDestination({ dir: hostB }),
      // Slow enough that the lost command is still at work when the rollback runs.
      options: { bandwidthBytesPerSec: 4 << 20 },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MigrationError);
    expect(err).toMatchObject({ outcome: 'rolledBack', cleanupErrors: [] });
    await expectSourceWhole(vm.qmp, hostB);
  }, 90_000);

  test("defect 3: the reply to the destination's start is lost: the QEMU it started is still found and stopped", async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 32 << 20, fillMiB: 4 }], workload: { tickMs: 50 } });
    class LostStart extends LocalDestination {
      override async startIncoming(s: VmSpec, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<LocalIncomingVm> {
        await super.startIncoming(s, opts);
        throw new QmpTimeoutError('no reply to dest.start (injected)');
      }
    }
    const dest = new LostStart({ dir: hostB });
    const err = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }), destination: dest }).catch((e: unknown) => e);
    expect(err).toMatchObject({ outcome: 'rolledBack', cleanupErrors: [] });
    expect(dest.incoming!.process.running()).toBe(false);
    await expectSourceWhole(vm.qmp, hostB);
  }, 60_000);

  test('defect 9: disks with dirty bitmaps and a source without the dirty-bitmaps capability: refused in preflight, nothing changed', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 32 << 20, fillMiB: 4 }], workload: { tickMs: 100 } });
    await vm.qmp.execute('block-dirty-bitmap-add', { node: 'disk-data', name: 'backup0', persistent: true });
    const hide = (q: QmpClient): void => {
      const probe = q.probeCapabilities.bind(q);
      q.probeCapabilities = async (o) => {
        const caps = await probe(o);
        return { ...caps, migrationCapabilities: new Set([...caps.migrationCapabilities].filter((c) => c !== 'dirty-bitmaps')) };
      };
    };
    const phases: string[] = [];
    const err = await migrate({
      spec,
      source: new FaultySource(spec, hide),
      destination: new LocalDestination({ dir: hostB }),
      onEvent: (e) => {
        if (e.event === 'phase') phases.push(e.phase);
      },
    }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'PREFLIGHT_REFUSED', phase: 'preflight', userError: true, outcome: 'rolledBack', message: expect.stringMatching(/dirty-bitmaps/) });
    expect(phases).toEqual(['preflight', 'failed']);
    await expectSourceWhole(vm.qmp, hostB);
  }, 60_000);
});

describe('engine defects, lazy mode', () => {
  test('defect 7: a stream job that vanishes is not taken for a finished hydration: the overlay stands alone before the source goes', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 8 }], workload: { tickMs: 100 } });
    const dest = new LocalDestination({ dir: hostB });
    let struck = false;
    let strike: Promise<void> | undefined;
    const result = await migrate({
      spec,
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }),
      destination: dest,
      options: { mode: 'lazy', hydrationBytesPerSec: 8 << 20 },
      onEvent: (e) => {
        if (e.event !== 'hydration' || struck || e.elapsedMs < 300) return;
        struck = true;
        // Someone else (an operator, a tool) cancels and dismisses the stream half-way.
        const q = dest.incoming!.qmp;
        strike = (async () => {
          const since = q.eventCursor();
          await q.execute('block-job-cancel', { device: 'ferry-stream-data', force: true });
          await q.waitForEvent((ev) => ev.event === 'JOB_STATUS_CHANGE' && (ev.data as { status?: string }).status === 'concluded', { since, timeoutMs: 10_000 });
          await q.execute('job-dismiss', { id: 'ferry-stream-data' }).catch(() => undefined);
        })();
      },
    });
    expect(struck).toBe(true);
    await strike;
    expect(result.ok).toBe(true);
    const nodes = await dest.incoming!.qmp.execute('query-named-block-nodes', { flat: true });
    expect(nodes.find((n) => n['node-name'] === 'disk-data')?.backing_file).toBeUndefined();
    await vm.exited;
  }, 120_000);
});

describe('engine defects 17', () => {
  test('17a: a compressed image is measured by the data it holds: a destination with room for its actual-size only is refused in preflight', async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 24, compress: true }], workload: { tickMs: 100 } });
    const nodes = await vm.qmp.execute('query-named-block-nodes', { flat: true });
    const actual = nodes.find((n) => n['node-name'] === 'disk-data')!.image['actual-size']!;
    expect(actual).toBeLessThan(4 << 20); // 24 MiB of one pattern compresses to almost nothing
    class Small extends LocalDestination {
      // Room for what actual-size says plus the engine's margin, far less than the 24 MiB it holds.
      override async freeBytes(): Promise<number> {
        return actual + (64 << 20) + (2 << 20);
      }
    }
    const err = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock') }), destination: new Small({ dir: hostB }) }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'PREFLIGHT_REFUSED', userError: true, message: expect.stringMatching(/not enough space .*the disks hold 2[45] MiB/) });
    await expectSourceWhole(vm.qmp, hostB);
  }, 60_000);

  test("17b: lazy mode's hydrated bytes count the destination's reads only, not another reader of the source's export", async () => {
    const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 8 }], workload: { tickMs: 100 } });
    const port = 38000 + Math.floor(Math.random() * 900);
    const dest = new LocalDestination({ dir: hostB });
    let reader: Promise<unknown> | undefined;
    const result = await migrate({
      spec,
      migrationId: 'feedf00d',
      source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock'), exportPortRange: [port, port] }),
      destination: dest,
      options: { mode: 'lazy', hydrationBytesPerSec: 8 << 20 },
      onEvent: (e) => {
        if (e.event !== 'hydration' || reader) return;
        // A backup tool reads the filled 8 MiB straight from the source's export, four times,
        // over one connection that stays open for a few seconds (so the counters see it).
        const url = `nbd://127.0.0.1:${port}/ferry-feedf00d-data`;
        reader = run('qemu-io', ['-r', '-f', 'raw', url, ...Array.from({ length: 4 }, () => ['-c', `read ${32 << 20} 8M`, '-c', 'sleep 800']).flat()]);
      },
    });
    await reader;
    expect(result.lazy!.hydratedWireBytes).toBeGreaterThan(6 << 20);
    expect(result.lazy!.hydratedWireBytes).toBeLessThan(16 << 20); // the reader's 32 MiB are not in it
    await vm.exited;
  }, 120_000);
});
