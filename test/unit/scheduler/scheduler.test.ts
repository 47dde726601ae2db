import { join } from 'node:path';
import { describe, expect, test } from 'vitest';
import { MigrationError } from '../../../src/engine/types.js';
import { FerryError } from '../../../src/errors.js';
import { Scheduler, type SchedulerLimits } from '../../../src/scheduler/scheduler.js';
import { SqliteStore as SchedulerStore } from '../../../src/scheduler/sqlite-store.js';
import { tempDir } from '../../helpers/tmp.js';
import { FakeInventory, FakeReconciler, FakeRunner, tick } from './fakes.js';

function setup(opts: { hosts?: string[]; vms?: [string, string][]; limits?: Partial<SchedulerLimits>; path?: string; memoryMiB?: number; retry?: { maxAttempts?: number; baseDelayMs?: number } } = {}) {
  const store = new SchedulerStore(opts.path ?? ':memory:');
  const inventory = new FakeInventory(opts.hosts ?? ['a', 'b', 'c'], opts.vms ?? [['v1', 'a'], ['v2', 'a'], ['v3', 'a'], ['v4', 'a']], { ...(opts.memoryMiB ? { memoryMiB: opts.memoryMiB } : {}) });
  const runner = new FakeRunner();
  const reconciler = new FakeReconciler();
  const scheduler = new Scheduler({ store, inventory, runner, reconciler, ...(opts.limits ? { limits: opts.limits } : {}), retry: opts.retry ?? { baseDelayMs: 10 } });
  return { store, inventory, runner, reconciler, scheduler };
}

describe('scheduler limits and order', () => {
  test('a drain never has more than the outgoing limit leaving the host, and every VM lands elsewhere', async () => {
    const { scheduler, runner, store } = setup({ limits: { outgoingPerHost: 2 } });
    await scheduler.start();
    const jobs = await scheduler.drain('a');
    expect(jobs).toHaveLength(4);
    expect(new Set(jobs.map((j) => j.job.to))).toEqual(new Set(['b', 'c'])); // spread by free memory
    await runner.until(2);
    await tick(30);
    expect(runner.running.size).toBe(2);
    while ((await store.inState('succeeded')).length < 4) {
      runner.finishAll();
      await tick(5);
    }
    expect(runner.maxOut.get('a')).toBe(2);
    expect(runner.started.map((j) => j.vm).sort()).toEqual(['v1', 'v2', 'v3', 'v4']);
  });

  test('incoming per host and the cluster-wide limit hold across sources', async () => {
    const vms: [string, string][] = [];
    for (const h of ['a', 'b', 'c', 'd']) for (let i = 0; i < 3; i++) vms.push([`${h}${i}`, h]);
    const { scheduler, runner, store } = setup({ hosts: ['a', 'b', 'c', 'd', 'e'], vms, limits: { outgoingPerHost: 3, incomingPerHost: 2, cluster: 3 } });
    await scheduler.start();
    for (const [vm] of vms) await scheduler.migrate(vm, { to: 'e' });
    await runner.until(2);
    await tick(30);
    expect(runner.running.size).toBe(2); // incoming limit of e
    while ((await store.inState('succeeded')).length < vms.length) {
      runner.finishAll();
      await tick(5);
    }
    expect(runner.maxIn.get('e')).toBe(2);
    const { scheduler: s2, runner: r2, store: st2 } = setup({ hosts: ['a', 'b', 'c', 'd', 'e', 'f'], vms, limits: { outgoingPerHost: 3, incomingPerHost: 5, cluster: 3 } });
    await s2.start();
    for (const h of ['a', 'b', 'c', 'd']) await s2.drain(h);
    await r2.until(3);
    await tick(30);
    expect(r2.running.size).toBe(3);
    while ((await st2.inState('succeeded')).length < vms.length) {
      r2.finishAll();
      await tick(5);
    }
    expect(r2.maxCluster).toBe(3);
  });

  test('a drain goes before a rebalance queued earlier on the same host', async () => {
    const { scheduler, runner } = setup({ limits: { outgoingPerHost: 1 } });
    await scheduler.start();
    await scheduler.migrate('v1', { to: 'b', reason: 'rebalance' });
    await runner.until(1);
    await scheduler.migrate('v2', { to: 'b', reason: 'rebalance' });
    await scheduler.migrate('v3', { to: 'c', reason: 'drain' });
    runner.finishAll();
    await runner.until(1);
    expect(runner.started.map((j) => j.vm)).toEqual(['v1', 'v3']);
  });

  test('bandwidth: a host budget is shared by its migrations', async () => {
    const { scheduler, runner } = setup({ limits: { outgoingPerHost: 2, bandwidthPerHostBytesPerSec: 100e6 } });
    await scheduler.start();
    await scheduler.migrate('v1', { to: 'b' });
    await runner.until(1);
    await scheduler.migrate('v2', { to: 'c' });
    await runner.until(2);
    expect([...runner.running.values()].map((r) => r.ctx.bandwidthBytesPerSec)).toEqual([100e6, 50e6]);
  });
});

describe('scheduler requests', () => {
  test("each request carries its mode to the runner; the scheduler's default fills in", async () => {
    const store = new SchedulerStore(':memory:');
    const inventory = new FakeInventory(['a', 'b'], [['v1', 'a'], ['v2', 'a'], ['v3', 'a']]);
    const runner = new FakeRunner();
    const scheduler = new Scheduler({ store, inventory, runner, reconciler: new FakeReconciler(), mode: 'lazy' });
    await scheduler.start();
    await scheduler.migrate('v1', { to: 'b' });
    await scheduler.migrate('v2', { to: 'b', mode: 'precopy' });
    await runner.until(2);
    expect(Object.fromEntries(runner.started.map((j) => [j.vm, j.mode]))).toEqual({ v1: 'lazy', v2: 'precopy' });
    expect((await scheduler.drain('a')).find((r) => r.job.vm === 'v3')!.job.mode).toBe('lazy');
  });

  test('a duplicate request answers with the active migration', async () => {
    const { scheduler, store } = setup();
    await scheduler.start();
    const first = await scheduler.migrate('v1', { to: 'b' });
    const again = await scheduler.migrate('v1', { to: 'c' });
    expect(again).toEqual({ job: expect.objectContaining({ id: first.job.id, to: 'b' }), existing: true });
    expect(await store.recent()).toHaveLength(1);
  });

  test('bad requests are refused by name and store nothing', async () => {
    const { scheduler, store } = setup({ hosts: ['a', 'b'], memoryMiB: 1000 });
    await scheduler.start();
    await expect(scheduler.migrate('nope')).rejects.toMatchObject({ code: 'VM_NOT_FOUND', userError: true, message: "no VM named 'nope' on any host" });
    await expect(scheduler.migrate('v1', { to: 'zz' })).rejects.toMatchObject({ code: 'HOST_NOT_FOUND' });
    await expect(scheduler.migrate('v1', { to: 'a' })).rejects.toMatchObject({ code: 'ALREADY_THERE' });
    await expect(scheduler.drain('zz')).rejects.toMatchObject({ code: 'HOST_NOT_FOUND' });
    // b has 1000 MiB: one 512 MiB VM fits, four do not.
    await expect(scheduler.drain('a')).rejects.toMatchObject({ code: 'NO_CAPACITY', message: expect.stringMatching(/no host can take v\d \(512 MiB\), v\d \(512 MiB\), v\d \(512 MiB\); nothing was queued/) });
    expect(await store.recent()).toEqual([]);
    await scheduler.migrate('v1');
    await expect(scheduler.migrate('v2')).rejects.toMatchObject({ code: 'NO_CAPACITY' }); // v1's reservation counts
  });

  test('cancel a queued and a running migration', async () => {
    const { scheduler, runner, store } = setup({ limits: { outgoingPerHost: 1 } });
    await scheduler.start();
    const running = (await scheduler.migrate('v1', { to: 'b' })).job;
    await runner.until(1);
    const queued = (await scheduler.migrate('v2', { to: 'b' })).job;
    expect((await scheduler.cancel(queued.id)).state).toBe('cancelled');
    await scheduler.cancel(running.id);
    for (let i = 0; i < 50 && (await store.get(running.id))!.state === 'running'; i++) await tick(5);
    expect((await store.get(running.id))).toMatchObject({ state: 'cancelled' });
    expect(runner.started.map((j) => j.vm)).toEqual(['v1']); // v2 never ran
    await expect(scheduler.cancel(running.id)).rejects.toThrow(/already cancelled/);
    expect((await store.journal(queued.id)).map((e) => e.state)).toEqual(['queued', 'cancelled']);
  });

  test('a transient failure is retried with backoff; a user error is not', async () => {
    const { scheduler, runner, store } = setup({ retry: { maxAttempts: 3, baseDelayMs: 20 } });
    await scheduler.start();
    const t = (await scheduler.migrate('v1', { to: 'b' })).job;
    const u = (await scheduler.migrate('v2', { to: 'c' })).job;
    await runner.until(2);
    runner.running.get(u.id)!.fail(new FerryError('PREFLIGHT', 'destination refused', { userError: true }));
    runner.running.get(t.id)!.fail(new FerryError('NBD', 'connection reset'));
    await tick(5);
    expect((await store.get(u.id))).toMatchObject({ state: 'failed', attempts: 1, error: 'destination refused' });
    expect((await store.get(t.id))).toMatchObject({ state: 'queued', attempts: 1, error: 'connection reset' });
    await runner.until(1);
    runner.running.get(t.id)!.fail(new FerryError('NBD', 'again'));
    await runner.until(1, 500); // 40 ms backoff this time
    runner.running.get(t.id)!.fail(new FerryError('NBD', 'and again'));
    for (let i = 0; i < 50 && (await store.get(t.id))!.state !== 'failed'; i++) await tick(5);
    expect((await store.get(t.id))).toMatchObject({ state: 'failed', attempts: 3, error: 'and again' });
    expect(runner.started.filter((j) => j.id === t.id)).toHaveLength(3);
  });

  test('an uncertain outcome is never retried: it needs an operator', async () => {
    const { scheduler, runner, store } = setup();
    await scheduler.start();
    const j = (await scheduler.migrate('v1', { to: 'b' })).job;
    await runner.until(1);
    runner.running.get(j.id)!.fail(new MigrationError('SWITCHOVER_UNCERTAIN', 'cont got no answer', { phase: 'confirm', outcome: 'uncertain' }));
    await tick(5);
    expect((await store.get(j.id))).toMatchObject({ state: 'failed', error: 'needs operator: cont got no answer' });
  });
});

describe('scheduler restart', () => {
  test.each([
    ['to', 'succeeded', 0],
    ['from', 'succeeded', 1],
    ['unknown', 'failed', 0],
  ] as const)('a migration in flight at the crash, guest on %s: %s, run again %i times', async (answer, end, reruns) => {
    const path = join(await tempDir('ferry-sched-'), 'state.db');
    const first = setup({ path });
    await first.scheduler.start();
    const j = (await first.scheduler.migrate('v1', { to: 'b' })).job;
    const q = (await first.scheduler.migrate('v2', { to: 'c' })).job;
    await first.scheduler.cancel(q.id);
    const k = (await first.scheduler.migrate('v3', { to: 'c' }, )).job;
    await first.runner.until(2);
    // "kill -9": the old scheduler never hears another word; a new one opens the same file.
    await first.store.close();
    const second = setup({ path });
    second.reconciler.answer = answer;
    second.runner.auto = 'finish';
    await second.scheduler.start();
    expect(second.reconciler.asked.sort()).toEqual(['v1', 'v3']);
    for (let i = 0; i < 50 && (await second.store.get(j.id))!.state !== end; i++) await tick(5);
    expect((await second.store.get(j.id))).toMatchObject({ state: end });
    expect((await second.store.get(k.id))).toMatchObject({ state: end });
    expect((await second.store.get(q.id))).toMatchObject({ state: 'cancelled' }); // stays cancelled
    expect(second.runner.started.map((x) => x.vm).sort()).toEqual(reruns ? ['v1', 'v3'] : []);
    if (answer === 'unknown') expect((await second.store.get(j.id))!.error).toMatch(/^needs operator/);
  });

  test('the store refuses a second active migration for a VM, whatever the code does', async () => {
    const store = new SchedulerStore(':memory:');
    const [a] = (await store.enqueue([{ vm: 'v', from: 'a', to: 'b', reason: 'manual', priority: 10, memoryMiB: 1, diskBytes: 1 }]));
    const [b] = (await store.enqueue([{ vm: 'v', from: 'a', to: 'c', reason: 'manual', priority: 10, memoryMiB: 1, diskBytes: 1 }]));
    expect(b).toEqual({ job: a!.job, existing: true });
    await store.transition(a!.job.id, 'running');
    await expect(store.transition(a!.job.id, 'running')).rejects.toThrow(/is running and cannot become running/);
    await store.transition(a!.job.id, 'succeeded');
    await expect(store.transition(a!.job.id, 'queued')).rejects.toThrow(/is succeeded and cannot become queued/);
    const [c] = (await store.enqueue([{ vm: 'v', from: 'b', to: 'a', reason: 'manual', priority: 10, memoryMiB: 1, diskBytes: 1 }]));
    expect(c!.existing).toBe(false);
  });
});

describe('placement hint (a protected VM prefers its standby)', () => {
  function withHint(preferredFor: (vm: string, mode: string) => Promise<string | undefined>) {
    const store = new SchedulerStore(':memory:');
    const inventory = new FakeInventory(['a', 'b', 'c'], [['v1', 'a'], ['v2', 'a']]);
    // b has less memory left than c: the usual placement picks c.
    inventory.hostList.find((h) => h.name === 'b')!.freeMemoryMiB = 4_096;
    const scheduler = new Scheduler({ store, inventory, runner: new FakeRunner(), reconciler: new FakeReconciler(), placement: { preferredFor } });
    return { scheduler, inventory };
  }

  test('a drain sends the hinted VM to its host, the others by free memory; a migrate naming no host too', async () => {
    const asked: string[] = [];
    const { scheduler } = withHint(async (vm, mode) => (asked.push(`${vm}:${mode}`), vm === 'v1' ? 'b' : undefined));
    const jobs = await scheduler.drain('a');
    expect(Object.fromEntries(jobs.map((r) => [r.job.vm, r.job.to]))).toEqual({ v1: 'b', v2: 'c' });
    expect(asked.sort()).toEqual(['v1:precopy', 'v2:precopy']);
    await scheduler.stop(0);
  });

  test('a hinted host without room, not in the fleet, or a hint that fails: the usual placement', async () => {
    for (const hint of [async () => 'b', async () => 'zz', async () => Promise.reject(new Error('standby agent down'))]) {
      const { scheduler, inventory } = withHint(hint);
      inventory.hostList.find((h) => h.name === 'b')!.freeMemoryMiB = 100; // v1 needs 512
      const jobs = await scheduler.drain('a');
      expect(jobs.every((r) => r.job.to === 'c')).toBe(true);
      await scheduler.stop(0);
    }
  });

  test('an explicit destination is never second-guessed', async () => {
    const { scheduler } = withHint(async () => 'b');
    const { job } = await scheduler.migrate('v1', { to: 'c' });
    expect(job.to).toBe('c');
    await scheduler.stop(0);
  });
});
