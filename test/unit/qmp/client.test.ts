import { getEventListeners } from 'node:events';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  isEvent,
  QmpAbortError,
  QmpClient,
  QmpCommandError,
  QmpConnectError,
  QmpDisconnectedError,
  QmpProtocolError,
  QmpTimeoutError,
  QmpUsageError,
  type QmpEvent,
} from '../../../src/qmp/index.js';
import { everyByte, FakeQmp, loadTranscript } from './fake-qmp.js';

/** Every test also checks that nothing rejected unobserved. */
const unhandled: unknown[] = [];
const onUnhandled = (reason: unknown): void => {
  unhandled.push(reason);
};
beforeEach(() => {
  unhandled.length = 0;
  process.on('unhandledRejection', onUnhandled);
});
afterEach(async () => {
  // Let any stray rejection surface before judging.
  await new Promise((r) => setTimeout(r, 10));
  process.off('unhandledRejection', onUnhandled);
  expect(unhandled).toEqual([]);
});

function capturingLogger(): { logger: pino.Logger; lines: Array<{ level: number; msg: string }> } {
  const lines: Array<{ level: number; msg: string }> = [];
  const dest = new Writable({
    write(chunk: Buffer, _e, cb) {
      for (const l of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(l) as { level: number; msg: string });
      cb();
    },
  });
  return { logger: pino({ level: 'trace' }, dest), lines };
}

async function connected(fake = new FakeQmp(), opts: { oob?: boolean; logger?: pino.Logger } = {}): Promise<{ fake: FakeQmp; qmp: QmpClient }> {
  fake.acceptNegotiation();
  const qmp = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 1_000, ...opts });
  return { fake, qmp };
}

describe('QmpClient over recorded transcripts', () => {
  it('replays the recorded session with the stream split at every byte', async () => {
    const fake = new FakeQmp();
    fake.chunker = everyByte;
    fake.replay(loadTranscript('session'));
    const qmp = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 2_000 });
    expect(qmp.greeting.version.qemu).toEqual({ major: 7, minor: 2, micro: 22 });
    expect(await qmp.execute('query-status')).toEqual({ status: 'running', singlestep: false, running: true });
    expect((await qmp.execute('query-version')).qemu.minor).toBe(2);
    await expect(qmp.executeRaw('no-such-command')).rejects.toMatchObject({ errorClass: 'CommandNotFound', command: 'no-such-command' });
    expect(await qmp.execute('query-block-jobs')).toEqual([]);
    const delErr = await qmp.execute('blockdev-del', { 'node-name': 'nope' }).catch((e: unknown) => e);
    expect(delErr).toBeInstanceOf(QmpCommandError);
    expect(delErr).toMatchObject({ errorClass: 'GenericError', desc: "Failed to find node with node-name='nope'" });
    await expect(qmp.executeRaw('migrate-set-parameters', { 'downtime-limit': 'soon' })).rejects.toMatchObject({ code: 'QMP_COMMAND' });
    const since = qmp.eventCursor();
    await qmp.execute('stop');
    const stop = await qmp.waitForEvent(isEvent('STOP'), { since, timeoutMs: 500, what: 'STOP' });
    expect(stop.timestamp.microseconds).toBe(97979);
    expect((await qmp.execute('query-status')).status).toBe('paused');
    await qmp.execute('cont');
    expect(qmp.eventCursor()).toBe(2);
    expect(await qmp.execute('query-migrate')).toEqual({});
    const caps = await qmp.execute('query-migrate-capabilities');
    expect(caps.map((c) => c.capability)).toContain('pause-before-switchover');
    const params = await qmp.execute('query-migrate-parameters');
    expect(params['downtime-limit']).toBe(300);
    await qmp.close();
  });

  it('probes capabilities from the recorded schema', async () => {
    const fake = new FakeQmp();
    fake.replay(loadTranscript('schema-full'));
    const qmp = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 2_000 });
    const caps = await qmp.probeCapabilities();
    expect(caps.hasCommand('blockdev-mirror')).toBe(true);
    expect(caps.hasCommand('blockdev-mirrror')).toBe(false);
    expect(caps.hasArgument('blockdev-mirror', 'copy-mode')).toBe(true);
    expect(caps.hasArgument('blockdev-mirror', 'bogus')).toBe(false);
    expect(caps.hasArgument('block-export-add', 'writable')).toBe(true);
    expect(caps.enumValues('MirrorCopyMode')).toEqual(new Set(['background', 'write-blocking']));
    expect(caps.enumValues('blockdev-mirror:sync')).toEqual(new Set(['top', 'full', 'none', 'incremental', 'bitmap']));
    expect(caps.enumValues('RunState')?.has('inmigrate')).toBe(true);
    expect(caps.enumValues('JobStatus')?.has('concluded')).toBe(true);
    expect(caps.enumValues('NoSuchEnum')).toBeUndefined();
    expect(caps.migrationCapabilities.has('pause-before-switchover')).toBe(true);
    expect(caps.hasMigrationParameter('downtime-limit')).toBe(true);
    expect(caps.hasMigrationParameter('x-nope')).toBe(false);
    // Cached: no second query goes out (the transcript holds only one).
    expect(await qmp.probeCapabilities()).toBe(caps);
    await qmp.close();
  });

  it('probes capabilities from the trimmed schema, the enums found by path', async () => {
    const fake = new FakeQmp();
    fake.replay(loadTranscript('schema-trimmed'));
    const qmp = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 2_000 });
    const caps = await qmp.probeCapabilities();
    expect(caps.enumValues('MigrationCapability')?.has('late-block-activate')).toBe(true);
    expect(caps.hasCommand('query-status')).toBe(true);
    await qmp.close();
  });

  it('negotiates oob only when asked and offered', async () => {
    const fake = new FakeQmp();
    fake.replay(loadTranscript('negotiation').slice(0, 1).concat(loadTranscript('negotiation').slice(5, 9)));
    const qmp = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 2_000, oob: true });
    expect(fake.received[0]).toMatchObject({ execute: 'qmp_capabilities', arguments: { enable: ['oob'] } });
    expect(qmp.oob).toBe(true);
    await qmp.close();

    const plain = await connected();
    expect(plain.fake.received[0]).not.toHaveProperty('arguments');
    await expect(plain.qmp.executeOob('migrate-pause')).rejects.toBeInstanceOf(QmpUsageError);
    await plain.qmp.close();
  });

  it('fails to connect when negotiation is refused', async () => {
    const fake = new FakeQmp();
    fake.onMessage((m) => fake.send({ id: m.id, error: { class: 'GenericError', desc: "Parameter 'null' does not accept value 'bogus'" } }));
    fake.greet();
    const err = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 1_000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpConnectError);
    expect((err as Error).message).toMatch(/refused capabilities negotiation/);
    expect(fake.clientEnd.destroyed).toBe(true);
  });

  it('rejects a peer whose first message is not a greeting', async () => {
    const fake = new FakeQmp();
    fake.send({ return: {}, id: 1 });
    const err = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 1_000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpConnectError);
    expect((err as Error).message).toMatch(/not a QMP server/);
  });

  it('times out a connect to a peer that never greets, then aborts one on signal', async () => {
    const err = await QmpClient.connect({ stream: new FakeQmp().clientEnd }, { timeoutMs: 50 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpConnectError);
    expect((err as Error).message).toMatch(/timed out after 50 ms waiting for the greeting/);
    const ac = new AbortController();
    const p = QmpClient.connect({ stream: new FakeQmp().clientEnd }, { timeoutMs: 5_000, signal: ac.signal });
    ac.abort();
    await expect(p).rejects.toBeInstanceOf(QmpAbortError);
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
  });
});

describe('QmpClient replies', () => {
  it('matches replies sent out of order', async () => {
    const { fake, qmp } = await connected();
    fake.onMessage(undefined);
    const a = qmp.executeRaw('a');
    const b = qmp.executeRaw('b');
    const c = qmp.executeRaw('c');
    const [, ma, mb, mc] = await fake.receivedCount(4);
    fake.send({ return: 'C', id: mc!.id }, { return: 'A', id: ma!.id });
    fake.send({ return: 'B', id: mb!.id });
    expect(await Promise.all([a, b, c])).toEqual(['A', 'B', 'C']);
    expect(new Set([ma!.id, mb!.id, mc!.id]).size).toBe(3);
    await qmp.close();
  });

  it('delivers events interleaved with replies, in order', async () => {
    const { fake, qmp } = await connected();
    const ts = { seconds: 1, microseconds: 2 };
    fake.onMessage((m) => {
      fake.send({ event: 'MIGRATION', data: { status: 'setup' }, timestamp: ts });
      fake.send({ return: {}, id: m.id }, { event: 'MIGRATION_PASS', data: { pass: 1 }, timestamp: ts });
      fake.send({ event: 'DEVICE_DELETED', data: { path: '/x' }, timestamp: ts });
    });
    const it = qmp.events();
    await qmp.execute('migrate', { uri: 'tcp:127.0.0.1:1' });
    const got: QmpEvent[] = [];
    for (let i = 0; i < 3; i++) got.push((await it.next()).value as QmpEvent);
    expect(got.map((e) => e.event)).toEqual(['MIGRATION', 'MIGRATION_PASS', 'DEVICE_DELETED']);
    expect(got[0]).toEqual({ event: 'MIGRATION', data: { status: 'setup' }, timestamp: ts });
    expect(got[2]!.data).toEqual({ path: '/x' });
    await qmp.close();
  });

  it('drops a reply with an unknown id and keeps going', async () => {
    const { logger, lines } = capturingLogger();
    const { fake, qmp } = await connected(new FakeQmp(), { logger });
    fake.onMessage((m) => fake.send({ return: 'stray', id: 'nobody' }, { return: { status: 'running', running: true }, id: m.id }));
    expect((await qmp.execute('query-status')).status).toBe('running');
    expect(lines.some((l) => l.level === 40 && /unknown id/.test(l.msg))).toBe(true);
    await qmp.close();
  });

  it('rejects a reply missing a required field as a protocol error', async () => {
    const { fake, qmp } = await connected();
    fake.onMessage((m) => fake.send({ return: { running: true }, id: m.id }));
    const err = await qmp.execute('query-status').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpProtocolError);
    expect((err as Error).message).toMatch(/query-status/);
    // Unknown fields are tolerated.
    fake.onMessage((m) => fake.send({ return: { running: true, status: 'running', 'new-in-qemu-11': 1 }, id: m.id }));
    expect((await qmp.execute('query-status')).status).toBe('running');
    await qmp.close();
  });

  it('ends the session on an error without id', async () => {
    const { fake, qmp } = await connected();
    fake.onMessage(() => fake.send({ error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } }));
    const err = await qmp.execute('query-status').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpDisconnectedError);
    expect((err as Error).cause).toBeInstanceOf(QmpProtocolError);
    const closed = await qmp.closed;
    expect(closed).toBeInstanceOf(QmpProtocolError);
    expect(closed!.message).toMatch(/outside any command.*JSON parse error/);
  });

  it('ends the session on malformed JSON', async () => {
    const { fake, qmp } = await connected();
    fake.onMessage(() => fake.sendRaw('{"return": {}, "id": \n'));
    await expect(qmp.execute('query-status')).rejects.toBeInstanceOf(QmpDisconnectedError);
    expect(await qmp.closed).toBeInstanceOf(QmpProtocolError);
    await expect(qmp.execute('query-status')).rejects.toBeInstanceOf(QmpDisconnectedError);
  });

  it('decodes a reply with a multi-byte character split across chunks', async () => {
    const { fake, qmp } = await connected();
    fake.chunker = everyByte;
    fake.onMessage((m) => fake.send({ id: m.id, error: { class: 'GenericError', desc: "nœud « disque-é » 😀 introuvable" } }));
    await expect(qmp.executeRaw('x')).rejects.toMatchObject({ desc: "nœud « disque-é » 😀 introuvable" });
    await qmp.close();
  });

  it('times out a call; its late reply is dropped quietly and the session goes on', async () => {
    const { logger, lines } = capturingLogger();
    const { fake, qmp } = await connected(new FakeQmp(), { logger });
    fake.onMessage(undefined);
    const err = await qmp.execute('query-status', undefined, { timeoutMs: 30 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpTimeoutError);
    expect((err as Error).message).toMatch(/query-status.*30 ms/);
    const late = fake.received[1]!;
    fake.onMessage((m) => fake.send({ return: { status: 'paused', running: false }, id: m.id }));
    fake.send({ return: { status: 'running', running: true }, id: late.id });
    expect((await qmp.execute('query-status')).status).toBe('paused');
    expect(lines.some((l) => /late reply to an abandoned/.test(l.msg))).toBe(true);
    expect(lines.some((l) => l.level >= 40)).toBe(false);
    await qmp.close();
  });

  it('aborts a call and removes its abort listener', async () => {
    const { fake, qmp } = await connected();
    fake.onMessage(undefined);
    const ac = new AbortController();
    const p = qmp.execute('query-status', undefined, { signal: ac.signal });
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(1);
    ac.abort(new Error('operator cancelled'));
    const err = await p.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpAbortError);
    expect((err as QmpAbortError).code).toBe('QMP_ABORTED');
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
    await expect(qmp.execute('query-status', undefined, { signal: ac.signal })).rejects.toBeInstanceOf(QmpAbortError);
    // A call that succeeds removes its listener too.
    const ac2 = new AbortController();
    fake.onMessage((m) => fake.send({ return: {}, id: m.id }));
    await qmp.execute('stop', undefined, { signal: ac2.signal });
    expect(getEventListeners(ac2.signal, 'abort')).toHaveLength(0);
    await qmp.close();
  });

  it('rejects every pending call when the peer hangs up mid-command', async () => {
    const { fake, qmp } = await connected();
    fake.onMessage(undefined);
    const calls = [qmp.execute('query-status'), qmp.executeRaw('query-jobs'), qmp.execute('stop')];
    const wait = qmp.waitForEvent(() => true, { timeoutMs: 5_000, what: 'anything' });
    const it = qmp.events();
    const next = it.next();
    await fake.receivedCount(4);
    fake.hangUp();
    for (const c of calls) await expect(c).rejects.toBeInstanceOf(QmpDisconnectedError);
    await expect(wait).rejects.toBeInstanceOf(QmpDisconnectedError);
    expect(await next).toEqual({ value: undefined, done: true });
    expect(await qmp.closed).toBeInstanceOf(QmpDisconnectedError);
    await qmp.close();
  });

  it('close() rejects pending calls, resolves closed with undefined, and is idempotent', async () => {
    const { fake, qmp } = await connected();
    fake.onMessage(undefined);
    const p = qmp.execute('query-status');
    await qmp.close();
    await qmp.close();
    await expect(p).rejects.toBeInstanceOf(QmpDisconnectedError);
    expect(await qmp.closed).toBeUndefined();
    expect(fake.clientEnd.destroyed).toBe(true);
  });

  it('closes on `await using`', async () => {
    const fake = new FakeQmp();
    {
      await using qmp = await connected(fake).then((c) => c.qmp);
      expect(qmp.greeting.capabilities).toEqual(['oob']);
    }
    expect(fake.clientEnd.destroyed).toBe(true);
  });
});

describe('QmpClient events', () => {
  const ts = { seconds: 5, microseconds: 6 };

  it('waitForEvent with `since` catches an event sent in the same chunk as the reply', async () => {
    const { fake, qmp } = await connected();
    // Exactly what QEMU does for `stop`: the event first, then the reply, here in one write.
    fake.onMessage((m) => fake.send({ timestamp: ts, event: 'STOP' }, { return: {}, id: m.id }));
    const since = qmp.eventCursor();
    await qmp.execute('stop');
    const ev = await qmp.waitForEvent(isEvent('STOP'), { since, timeoutMs: 100, what: 'the guest to stop' });
    expect(ev).toEqual({ event: 'STOP', timestamp: ts });
    // Without the cursor the same wait misses it: this is what the cursor is for.
    const missed = await qmp.waitForEvent(isEvent('STOP'), { timeoutMs: 30, what: 'the guest to stop' }).catch((e: unknown) => e);
    expect(missed).toBeInstanceOf(QmpTimeoutError);
    await qmp.close();
  });

  it('the timeout message says what it waited for and the last event seen', async () => {
    const { fake, qmp } = await connected();
    fake.send({ timestamp: ts, event: 'JOB_STATUS_CHANGE', data: { id: 'mirror-vda', status: 'running' } });
    const err = await qmp
      .waitForEvent((e) => isEvent('JOB_STATUS_CHANGE')(e) && e.data.status === 'concluded', { timeoutMs: 30, what: 'mirror-vda to conclude' })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpTimeoutError);
    expect((err as Error).message).toMatch(/mirror-vda to conclude/);
    expect((err as Error).message).toMatch(/last event seen: JOB_STATUS_CHANGE .*"running"/);
    await qmp.close();
  });

  it('a wait ignores events before its cursor and resolves on a later one', async () => {
    const { fake, qmp } = await connected();
    fake.send({ timestamp: ts, event: 'MIGRATION', data: { status: 'active' } });
    await new Promise((r) => setTimeout(r, 5));
    const since = qmp.eventCursor();
    expect(since).toBe(1);
    const done = qmp.waitForEvent(isEvent('MIGRATION'), { since, timeoutMs: 500 });
    fake.send({ timestamp: ts, event: 'MIGRATION', data: { status: 'completed' } });
    expect((await done).data.status).toBe('completed');
    await qmp.close();
  });

  it('parses typed event data and drops malformed known events without ending the session', async () => {
    const { fake, qmp } = await connected();
    const next = qmp.events();
    fake.send({ timestamp: ts, event: 'BLOCK_JOB_READY', data: { type: 'mirror', device: 'm0', len: 10, offset: 10, speed: 0, extra: true } });
    const ready = (await next.next()).value as QmpEvent;
    expect(ready).toMatchObject({ event: 'BLOCK_JOB_READY', data: { device: 'm0', len: 10 } });
    // status missing: dropped; the next, well-formed event is the one delivered.
    fake.send({ timestamp: ts, event: 'JOB_STATUS_CHANGE', data: { id: 'm0' } });
    fake.send({ timestamp: ts, event: 'JOB_STATUS_CHANGE', data: { id: 'm0', status: 'ready' } });
    const after = (await next.next()).value as QmpEvent;
    expect(after).toMatchObject({ event: 'JOB_STATUS_CHANGE', data: { id: 'm0', status: 'ready' } });
    const stillOpen = await Promise.race([qmp.closed.then(() => false), new Promise((r) => setTimeout(r, 10, true))]);
    expect(stillOpen).toBe(true);
    await qmp.close();
  });

  it('the events() iterator ends when the client closes, and on abort', async () => {
    const { fake, qmp } = await connected();
    const seen: string[] = [];
    const reading = (async () => {
      for await (const e of qmp.events()) seen.push(e.event);
    })();
    fake.send({ timestamp: ts, event: 'STOP' }, { timestamp: ts, event: 'RESUME' });
    await new Promise((r) => setTimeout(r, 5));
    await qmp.close();
    await reading;
    expect(seen).toEqual(['STOP', 'RESUME']);

    const again = await connected();
    const ac = new AbortController();
    const it = again.qmp.events({ signal: ac.signal });
    const n = it.next();
    ac.abort();
    await expect(n).rejects.toBeInstanceOf(QmpAbortError);
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
    await again.qmp.close();
  });

  it('a waitForEvent aborted by its signal removes its listener', async () => {
    const { qmp } = await connected();
    const ac = new AbortController();
    const w = qmp.waitForEvent(() => true, { timeoutMs: 5_000, signal: ac.signal });
    ac.abort();
    await expect(w).rejects.toBeInstanceOf(QmpAbortError);
    expect(getEventListeners(ac.signal, 'abort')).toHaveLength(0);
    await qmp.close();
  });
});
