/**
 * The QMP client against the real QEMU: `-machine none` needs no guest image and starts in
 * milliseconds. Every QEMU started here is killed by PID and reaped in afterEach, pass or fail.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { createConnection, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isEvent, QmpClient, QmpCommandError, QmpConnectError, QmpDisconnectedError } from '../../src/qmp/index.js';

let dir: string;
const qemus: ChildProcess[] = [];
const servers: Server[] = [];
const clients: QmpClient[] = [];

async function startQemu(): Promise<{ proc: ChildProcess; path: string }> {
  const path = join(dir, `qmp-${qemus.length}.sock`);
  const proc = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${path},server=on,wait=off`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  qemus.push(proc);
  const deadline = Date.now() + 10_000;
  // The file appears at bind(), a moment before QEMU listens on it: wait until it accepts (a
  // loaded machine showed ECONNREFUSED in that moment), then let the test make its own connection.
  while (!existsSync(path) || !(await accepts(path))) {
    if (proc.exitCode !== null) throw new Error(`QEMU exited with ${proc.exitCode} before listening on its QMP socket`);
    if (Date.now() > deadline) throw new Error('QEMU did not listen on its QMP socket within 10 s');
    await new Promise((r) => setTimeout(r, 20));
  }
  return { proc, path };
}

/** Whether a unix socket takes a connection now (closed at once: QEMU's monitor then waits for the next). */
function accepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function connect(path: string): Promise<QmpClient> {
  const c = await QmpClient.connect({ path }, { timeoutMs: 5_000 });
  clients.push(c);
  return c;
}

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-qmp-it-'));
});

afterEach(async () => {
  for (const c of clients.splice(0)) await c.close();
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
  for (const p of qemus.splice(0)) {
    if (p.exitCode === null && p.signalCode === null && p.pid !== undefined) {
      const exited = new Promise((r) => p.once('exit', r));
      process.kill(p.pid, 'SIGKILL');
      await exited;
    }
  }
  await rm(dir, { recursive: true, force: true });
});

describe('QmpClient against QEMU 7.2', () => {
  it('negotiates and answers query-status', async () => {
    const { path } = await startQemu();
    const qmp = await connect(path);
    expect(qmp.greeting.version.qemu.major).toBeGreaterThanOrEqual(7);
    expect(qmp.greeting.capabilities).toContain('oob');
    const status = await qmp.execute('query-status');
    expect(status).toMatchObject({ running: true, status: 'running' });
  });

  it('connects over TCP too', async () => {
    const probe = createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const port = (probe.address() as { port: number }).port;
    await new Promise((r) => probe.close(r));
    const proc = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `tcp:127.0.0.1:${port},server=on,wait=off`], {
      stdio: 'ignore',
    });
    qemus.push(proc);
    let qmp: QmpClient | undefined;
    for (let tries = 0; !qmp; tries++) {
      try {
        qmp = await QmpClient.connect({ host: '127.0.0.1', port }, { timeoutMs: 2_000 });
      } catch (err) {
        if (tries > 100 || !(err instanceof QmpConnectError)) throw err;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    clients.push(qmp);
    expect((await qmp.execute('query-status')).running).toBe(true);
  });

  it('negotiates oob when asked and runs an out-of-band command', async () => {
    const { path } = await startQemu();
    const qmp = await QmpClient.connect({ path }, { timeoutMs: 5_000, oob: true });
    clients.push(qmp);
    expect(qmp.oob).toBe(true);
    // migrate-pause is allow-oob; with no migration it fails, which proves it ran.
    await expect(qmp.executeOob('migrate-pause')).rejects.toMatchObject({ code: 'QMP_COMMAND' });
  });

  it('keeps the class and description of an error', async () => {
    const { path } = await startQemu();
    const qmp = await connect(path);
    const err = await qmp.execute('blockdev-del', { 'node-name': 'nope' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpCommandError);
    expect(err).toMatchObject({ errorClass: 'GenericError', command: 'blockdev-del', code: 'QMP_COMMAND' });
    expect((err as QmpCommandError).desc).toContain('nope');
    await expect(qmp.executeRaw('no-such-command')).rejects.toMatchObject({ errorClass: 'CommandNotFound' });
    // The session survives errors.
    expect((await qmp.execute('query-status')).status).toBe('running');
  });

  it('stop and cont produce STOP and RESUME events, caught through a cursor', async () => {
    const { path } = await startQemu();
    const qmp = await connect(path);
    const since = qmp.eventCursor();
    await qmp.execute('stop');
    // QEMU sends STOP before the reply to `stop`: only the cursor lets this wait see it.
    const stop = await qmp.waitForEvent(isEvent('STOP'), { since, timeoutMs: 2_000, what: 'STOP' });
    expect(stop.timestamp.seconds).toBeGreaterThan(0);
    expect((await qmp.execute('query-status')).status).toBe('paused');
    const since2 = qmp.eventCursor();
    await qmp.execute('cont');
    await qmp.waitForEvent(isEvent('RESUME'), { since: since2, timeoutMs: 2_000, what: 'RESUME' });
  });

  it('probes capabilities from the schema', async () => {
    const { path } = await startQemu();
    const qmp = await connect(path);
    const caps = await qmp.probeCapabilities({ timeoutMs: 5_000 });
    expect(caps.hasCommand('blockdev-mirror')).toBe(true);
    expect(caps.hasCommand('no-such-command')).toBe(false);
    expect(caps.migrationCapabilities.has('pause-before-switchover')).toBe(true);
    expect(caps.hasArgument('blockdev-mirror', 'copy-mode')).toBe(true);
    expect(caps.hasArgument('block-export-add', 'name')).toBe(true);
    expect(caps.enumValues('MirrorCopyMode')).toEqual(new Set(['background', 'write-blocking']));
    expect(caps.enumValues('MigrationCapability')?.has('pause-before-switchover')).toBe(true);
    expect(caps.hasMigrationParameter('downtime-limit')).toBe(true);
    expect(caps.hasMigrationParameter('no-such-parameter')).toBe(false);
    expect(caps.events.has('JOB_STATUS_CHANGE')).toBe(true);
    expect(await qmp.probeCapabilities()).toBe(caps);
  });

  it('types the replies of the migration queries', async () => {
    const { path } = await startQemu();
    const qmp = await connect(path);
    expect(await qmp.execute('query-migrate')).toEqual({});
    const params = await qmp.execute('query-migrate-parameters');
    expect(typeof params['downtime-limit']).toBe('number');
    await qmp.execute('migrate-set-parameters', { 'downtime-limit': 500, 'max-bandwidth': 1 << 30 });
    expect((await qmp.execute('query-migrate-parameters'))['downtime-limit']).toBe(500);
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    const caps = await qmp.execute('query-migrate-capabilities');
    expect(caps.find((c) => c.capability === 'events')?.state).toBe(true);
  });
});

describe('QmpClient connect failures', () => {
  it('names a path that does not exist', async () => {
    const path = join(dir, 'missing.sock');
    const err = await QmpClient.connect({ path }, { timeoutMs: 2_000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpConnectError);
    expect((err as Error).message).toContain(path);
    expect((err as QmpConnectError).userError).toBe(true);
  });

  it('gives up on a socket that says nothing, within its timeout', async () => {
    const path = join(dir, 'silent.sock');
    const server = createServer(() => undefined);
    servers.push(server);
    await new Promise<void>((r) => server.listen(path, r));
    const started = Date.now();
    const err = await QmpClient.connect({ path }, { timeoutMs: 300 }).catch((e: unknown) => e);
    expect(Date.now() - started).toBeLessThan(2_000);
    expect(err).toBeInstanceOf(QmpConnectError);
    expect((err as Error).message).toMatch(/timed out after 300 ms waiting for the greeting/);
    expect((err as Error).message).toContain(path);
  });

  it('rejects a socket that speaks something else', async () => {
    const path = join(dir, 'garbage.sock');
    const server = createServer((s) => s.end('SSH-2.0-OpenSSH_9.2\r\n'));
    servers.push(server);
    await new Promise<void>((r) => server.listen(path, r));
    const err = await QmpClient.connect({ path }, { timeoutMs: 2_000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpConnectError);
    expect((err as Error).message).toContain(path);
    expect((err as Error).message).toMatch(/is not a QMP server: it said SSH-2.0/);
  });

  it('fails a pending command when QEMU dies under it', async () => {
    const { proc, path } = await startQemu();
    const qmp = await connect(path);
    // query-status answers in microseconds; SIGSTOP freezes QEMU so the command is surely still
    // pending when SIGKILL ends it.
    process.kill(proc.pid!, 'SIGSTOP');
    const pending = qmp.execute('query-status', undefined, { timeoutMs: 10_000 });
    await new Promise((r) => setTimeout(r, 100));
    process.kill(proc.pid!, 'SIGKILL');
    const started = Date.now();
    await expect(pending).rejects.toBeInstanceOf(QmpDisconnectedError);
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(await qmp.closed).toBeInstanceOf(QmpDisconnectedError);
  });
});
