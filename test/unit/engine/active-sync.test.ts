/**
 * convergeActively against a scripted QMP peer: the sequence it sends, and each way it fails.
 * The real thing (QEMU 10.0) is in test/integration/convergence.test.ts.
 */
import { expect, test } from 'vitest';
import { convergeActively } from '../../../src/engine/convergence/active-sync.js';
import { ConvergenceError } from '../../../src/engine/convergence/errors.js';
import { QmpClient } from '../../../src/qmp/index.js';
import { FakeQmp } from '../qmp/fake-qmp.js';

const ts = { seconds: 1, microseconds: 0 };
type Job = { device: string; type: string; ready: boolean; status: string; 'actively-synced'?: boolean };

/** A peer where `jobs()` answers query-block-jobs and `change` answers block-job-change. */
async function peer(script: { jobs: (n: number) => Job[]; change?: (m: Record<string, unknown>) => unknown; readyAt?: 'before' | 'never' }) {
  const fake = new FakeQmp();
  const sent: string[] = [];
  let polls = 0;
  fake.onMessage((m) => {
    const cmd = String(m.execute);
    sent.push(cmd);
    if (cmd === 'qmp_capabilities') return fake.send({ return: {}, id: m.id });
    if (cmd === 'block-job-change') return fake.send({ ...(script.change?.(m) as object ?? { return: {} }), id: m.id });
    if (cmd === 'query-block-jobs') return fake.send({ return: script.jobs(polls++), id: m.id });
    fake.send({ error: { class: 'CommandNotFound', desc: cmd }, id: m.id });
  });
  fake.greet();
  const qmp = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 1_000 });
  const since = qmp.eventCursor();
  if (script.readyAt === 'before') fake.send({ event: 'BLOCK_JOB_READY', data: { type: 'mirror', device: 'mirror-root', len: 1, offset: 1, speed: 0 }, timestamp: ts });
  return { fake, qmp, since, sent };
}

const job = (over: Partial<Job>): Job => ({ device: 'mirror-root', type: 'mirror', ready: true, status: 'ready', ...over });

test('READY first: block-job-change to write-blocking, then polls until actively-synced', async () => {
  const { qmp, since, sent } = await peer({ readyAt: 'before', jobs: (n) => [job({ 'actively-synced': n >= 2 })] });
  const seen: unknown[] = [];
  const r = await convergeActively(qmp, ['mirror-root'], { since, readyBoundMs: 1_000, timeoutMs: 5_000, pollMs: 5, onSwitch: (e) => seen.push(e) });
  expect(r).toEqual([expect.objectContaining({ job: 'mirror-root', readyBeforeSwitch: true })]);
  expect(seen).toEqual([expect.objectContaining({ job: 'mirror-root', readyBeforeSwitch: true })]);
  expect(sent).toEqual(['qmp_capabilities', 'block-job-change', 'query-block-jobs', 'query-block-jobs', 'query-block-jobs']);
  await qmp.close();
});

test('no READY within the bound: switches anyway, and says so', async () => {
  const { qmp, since } = await peer({ readyAt: 'never', jobs: () => [job({ 'actively-synced': true })] });
  const t0 = performance.now();
  const r = await convergeActively(qmp, ['mirror-root'], { since, readyBoundMs: 100, timeoutMs: 5_000, pollMs: 5 });
  expect(performance.now() - t0).toBeGreaterThanOrEqual(95);
  expect(r[0]).toMatchObject({ readyBeforeSwitch: false });
  await qmp.close();
});

test("QEMU refuses block-job-change: JOB_CHANGE_FAILED with QEMU's words", async () => {
  const { qmp, since } = await peer({ readyAt: 'before', jobs: () => [], change: () => ({ error: { class: 'GenericError', desc: 'Change to copy mode not supported' } }) });
  const err = await convergeActively(qmp, ['mirror-root'], { since, readyBoundMs: 100, timeoutMs: 5_000 }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(ConvergenceError);
  expect(err).toMatchObject({ code: 'JOB_CHANGE_FAILED', context: { job: 'mirror-root', desc: 'Change to copy mode not supported' } });
  await qmp.close();
});

test('never actively-synced: NOT_SYNCED after the deadline, naming what it saw last', async () => {
  const { qmp, since } = await peer({ readyAt: 'before', jobs: () => [job({ 'actively-synced': false })] });
  const err = await convergeActively(qmp, ['mirror-root'], { since, readyBoundMs: 100, timeoutMs: 300, pollMs: 10 }).catch((e: unknown) => e);
  expect(err).toMatchObject({ code: 'NOT_SYNCED' });
  expect((err as Error).message).toMatch(/mirror-root ready=true actively-synced=false/);
  await qmp.close();
});

test('a mirror that vanishes or ends while waiting: MIRROR_GONE', async () => {
  for (const jobs of [() => [], () => [job({ status: 'concluded' })]]) {
    const { qmp, since } = await peer({ readyAt: 'before', jobs });
    const err = await convergeActively(qmp, ['mirror-root'], { since, readyBoundMs: 100, timeoutMs: 5_000 }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'MIRROR_GONE', context: { job: 'mirror-root' } });
    await qmp.close();
  }
});
