/**
 * The data path's TLS building blocks (src/host/data-tls.ts) on real QEMUs, driven with the raw
 * pre-copy sequence: a writing guest's disk is mirrored into the destination's export over NBD
 * with TLS and an authz that admits only the source host, RAM follows over a TLS migration
 * stream, and every acknowledged write arrives. Rogue NBD clients (no certificate, another CA's,
 * a valid certificate of a third host) and a plain-text client are refused while the mirror runs;
 * rogue migration streams of the same three kinds are refused before the real one, which then
 * completes: the destination QEMU is not disturbed.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, expect, test } from 'vitest';
import { LocalDestination, LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { addDataTlsObjects, certIdentity, certNames, DATA_TLS_IDS, missingDataTls, removeDataTlsObjects, throwawayPki, writeCredentialDirs } from '../../src/host/data-tls.js';
import { eventIs } from '../../src/qmp/index.js';
import { retargetSpec } from '../../src/qemu/spec.js';
import { AgentClient } from '../../src/agent/client.js';
import { startAgent } from '../../src/agent/server.js';
import { SchedulerClient } from '../../src/scheduler/client.js';
import { startSchedulerService } from '../../src/scheduler/service.js';
import { IMAGE_DIR, loadGuestImage } from '../../src/guest/image.js';
import { agentGuestSpec, bootWorkloadGuest, cleanupAll, killPids, makeDisk, makeTempDir } from '../helpers/guest.js';

const run = promisify(execFile);
afterEach(cleanupAll);

/** `qemu-img info` of the export as a client with the given credentials folder (or none). */
async function tryClient(port: number, exportName: string, clientDir?: string): Promise<string> {
  const args = clientDir
    ? ['info', '--object', `tls-creds-x509,id=t,dir=${clientDir},endpoint=client`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${port},export=${exportName},tls-creds=t`]
    : ['info', '--image-opts', `driver=nbd,host=127.0.0.1,port=${port},export=${exportName}`];
  return run('qemu-img', args, { timeout: 20_000 }).then(
    (r) => `OPENED ${r.stdout}`,
    (e: { stderr?: string }) => e.stderr ?? 'failed',
  );
}

test('mirror and migration over QEMU TLS with a one-peer authz; rogue NBD clients are refused', async () => {
  const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 4 }], workload: { write: { rate: 50 }, tickMs: 50 } });
  await vm.serial.waitForLine((l) => /^ack data \d{2,}$/.test(l.text), { timeoutMs: 30_000, what: 'acks' });
  const src = vm.qmp;
  expect(missingDataTls(await src.probeCapabilities())).toEqual([]);

  const pkiDir = await makeTempDir('ferry-pki-');
  const [hostA, hostBMat, hostC] = await throwawayPki(join(pkiDir, 'fleet'), { address: '127.0.0.1', names: ['hostA', 'hostB', 'hostC'] });
  const [rogue] = await throwawayPki(join(pkiDir, 'rogue'), { address: '127.0.0.1', names: ['hostA'] });
  expect(certIdentity(hostA!.cert)).toBe('CN=hostA');
  expect(certNames(hostA!.cert)).toEqual(['127.0.0.1']);

  const destination = new LocalDestination({ dir: hostB });
  const destSpec = retargetSpec(spec, { dir: hostB, runDir: join(hostB, 'run') });
  await destination.createDisk({ path: destSpec.disks[0]!.path, format: 'qcow2', virtualSize: 64 << 20 });
  const dest = (await destination.startIncoming(destSpec, { timeoutMs: 30_000 })).qmp;
  expect(missingDataTls(await dest.probeCapabilities())).toEqual([]);

  const srcCreds = await writeCredentialDirs(join(spec.runDir, 'tls'), hostA!);
  const dstCreds = await writeCredentialDirs(join(destSpec.runDir, 'tls'), hostBMat!);
  await addDataTlsObjects(src, { ...srcCreds, peerIdentity: certIdentity(hostBMat!.cert), timeoutMs: 10_000 });
  await addDataTlsObjects(dest, { ...dstCreds, peerIdentity: certIdentity(hostA!.cert), timeoutMs: 10_000 });
  // Repeatable: a second add replaces what the first made.
  await addDataTlsObjects(dest, { ...dstCreds, peerIdentity: certIdentity(hostA!.cert), timeoutMs: 10_000 });

  const nbdPort = 24000 + (process.pid % 1000);
  await dest.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(nbdPort) } }, 'tls-creds': DATA_TLS_IDS.server, 'tls-authz': DATA_TLS_IDS.authz });
  await dest.execute('block-export-add', { type: 'nbd', id: 'ferry-t-data', 'node-name': 'disk-data', name: 'ferry-t-data', writable: true });

  // The rogues, each with the credentials folder it would have.
  const rogueDir = async (name: string, files: Record<string, Buffer | string>): Promise<string> => {
    const d = join(pkiDir, name);
    await mkdir(d);
    for (const [f, content] of Object.entries(files)) await writeFile(join(d, f), content);
    return d;
  };
  const verdicts = {
    plain: await tryClient(nbdPort, 'ferry-t-data'),
    noCert: await tryClient(nbdPort, 'ferry-t-data', await rogueDir('nocert', { 'ca-cert.pem': hostA!.ca })),
    otherCa: await tryClient(nbdPort, 'ferry-t-data', await rogueDir('otherca', { 'ca-cert.pem': Buffer.concat([hostA!.ca, rogue!.ca]), 'client-cert.pem': rogue!.cert, 'client-key.pem': rogue!.key })),
    thirdHost: await tryClient(nbdPort, 'ferry-t-data', await rogueDir('hostc', { 'ca-cert.pem': hostC!.ca, 'client-cert.pem': hostC!.cert, 'client-key.pem': hostC!.key })),
  };
  for (const [who, v] of Object.entries(verdicts)) expect(v, who).not.toMatch(/^OPENED/);
  expect(verdicts.plain).toMatch(/TLS negotiation required/);
  const log = await readFile(join(destSpec.runDir, 'qemu.log'), 'utf8');
  expect(log).toMatch(/authz check for CN=hostC is denied/);
  expect((await dest.execute('query-status')).status).toBe('inmigrate');

  // The real client: the source, over TLS, checking the destination's name.
  await src.execute('blockdev-add', { driver: 'nbd', 'node-name': 'ferry-nbd-data', server: { type: 'inet', host: '127.0.0.1', port: String(nbdPort) }, export: 'ferry-t-data', 'tls-creds': DATA_TLS_IDS.client, 'tls-hostname': '127.0.0.1' });
  const sinceMirror = src.eventCursor();
  await src.execute('blockdev-mirror', { 'job-id': 'ferry-mirror-data', device: 'disk-data', target: 'ferry-nbd-data', sync: 'top', 'copy-mode': 'write-blocking', 'auto-dismiss': false });
  await src.waitForEvent((e) => e.event === 'BLOCK_JOB_READY', { since: sinceMirror, timeoutMs: 120_000, what: 'mirror READY over TLS' });

  const migPort = nbdPort + 1;
  await dest.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  await dest.execute('migrate-set-parameters', { 'tls-creds': DATA_TLS_IDS.server, 'tls-authz': DATA_TLS_IDS.authz });
  await dest.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${migPort}` });
  // Rogue migration streams before the real one: no certificate, another CA's, a third host's.
  const streamRogue = async (files?: { cert: Buffer; key: Buffer }): Promise<void> => {
    const args = ['s_client', '-connect', `127.0.0.1:${migPort}`, '-quiet'];
    if (files) {
      const d = await rogueDir(`stream-${Math.random().toString(36).slice(2)}`, { 'c.pem': files.cert, 'k.pem': files.key });
      args.push('-cert', join(d, 'c.pem'), '-key', join(d, 'k.pem'));
    }
    const child = execFile('openssl', args, { timeout: 5_000 }, () => undefined);
    child.stdin?.end('QEVM rogue stream\n');
    await new Promise((r) => child.once('exit', r));
  };
  await streamRogue();
  await streamRogue(rogue!);
  await streamRogue(hostC!);
  await new Promise((r) => setTimeout(r, 300));
  // Not disturbed: still waiting for its stream, still listening.
  expect((await dest.execute('query-status')).status).toBe('inmigrate');
  // Each refused at its TLS handshake, as the NBD rogues were (those lines carry "option negotiation").
  const streamLog = (await readFile(join(destSpec.runDir, 'qemu.log'), 'utf8')).split('\n').filter((l) => !/option negotiation/.test(l));
  expect(streamLog.filter((l) => /Verify failed: No certificate|hasn't got a known issuer|authz check for CN=hostC is denied/.test(l))).toHaveLength(3);
  await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'pause-before-switchover', state: true }] });
  await src.execute('migrate-set-parameters', { 'tls-creds': DATA_TLS_IDS.client, 'tls-hostname': '127.0.0.1', 'max-bandwidth': 2 ** 40 });
  const since = src.eventCursor();
  await src.execute('migrate', { uri: `tcp:127.0.0.1:${migPort}` });
  await src.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'pre-switchover', { since, timeoutMs: 120_000, what: 'pre-switchover' });
  const sinceCancel = src.eventCursor();
  await src.execute('block-job-cancel', { device: 'ferry-mirror-data' });
  await src.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === 'ferry-mirror-data' && e.data.status === 'concluded', { since: sinceCancel, timeoutMs: 30_000, what: 'mirror concluded' });
  await src.execute('migrate-continue', { state: 'pre-switchover' });
  await src.waitForEvent((e) => eventIs(e, 'MIGRATION') && e.data.status === 'completed', { since, timeoutMs: 60_000, what: 'completed' });
  await dest.execute('nbd-server-stop');
  await dest.execute('cont');
  expect((await dest.execute('query-status')).status).toBe('running');
  expect((await src.execute('query-status')).status).toBe('postmigrate');

  // The objects go once nothing uses them; the source's NBD node first.
  await src.execute('job-dismiss', { id: 'ferry-mirror-data' });
  await src.execute('blockdev-del', { 'node-name': 'ferry-nbd-data' });
  await removeDataTlsObjects(src, { timeoutMs: 10_000 });
  await src.execute('migrate-set-parameters', { 'tls-creds': '', 'tls-hostname': '' });

  await vm.quit({ timeoutMs: 10_000 });
  const acked = highestAcks(vm.serial.history()).get('data')!;
  await destination.incoming!.process.quit({ timeoutMs: 10_000 });
  const report = await verifyDisk(destSpec.disks[0]!.path, { format: 'qcow2', diskId: 'data', ackedSeq: acked });
  expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
});

test('an agent in dataTls required mode sets TLS up itself and refuses every plain data stream', async () => {
  const top = await makeTempDir('ferry-agent-dtls-');
  const root = join(top, 'root');
  await mkdir(root);
  const [host] = await throwawayPki(join(top, 'pki'), { address: '127.0.0.1', names: ['hostS'] });
  const files = { cert: join(top, 'host.pem'), key: join(top, 'host.key'), ca: join(top, 'ca.pem') };
  await writeFile(files.cert, host!.cert);
  await writeFile(files.key, host!.key);
  await writeFile(files.ca, host!.ca);
  const token = 'token-of-alice-0123456789';
  const agent = await startAgent({ name: 'hostS', listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [token]: 'alice' }, dataTls: files, portRange: [33000, 33999] });
  const pids: number[] = [];
  const c = await AgentClient.connect(agent.url, token);
  try {
    expect(await c.call('host.info')).toMatchObject({ dataTls: { mode: 'required', identity: 'CN=hostS', names: ['127.0.0.1'] } });
    const image = await loadGuestImage();
    await mkdir(join(root, 'v'));
    await makeDisk(join(root, 'v', 'd0.qcow2'), { id: 'd0', format: 'qcow2', size: 16 << 20 });
    const spec = { name: 'v', memoryMiB: 64, disks: [{ id: 'd0', path: join(root, 'v', 'd0.qcow2'), format: 'qcow2' }], boot: { kernel: image.kernel, initrd: image.initrd }, runDir: join(root, 'v', 'run') };
    await c.call('vm.create', { spec });
    const { vmId, pid } = (await c.call('vm.start', { name: 'v' })) as { vmId: string; pid: number };
    pids.push(pid);
    const qmp = await c.openQmp(vmId);
    const nbd = (tls: boolean): Record<string, unknown> => ({ driver: 'nbd', 'node-name': 'ferry-nbd-d0', server: { type: 'inet', host: '127.0.0.1', port: '1' }, export: 'ferry-1-d0', ...(tls ? { 'tls-creds': 'ferry-tls-client', 'tls-hostname': '127.0.0.1' } : {}) });
    await expect(qmp.executeRaw('migrate', { uri: 'tcp:127.0.0.1:33001' })).rejects.toThrow(/QMP_REFUSED.*requires TLS/);
    await expect(qmp.executeRaw('blockdev-add', nbd(true))).rejects.toThrow(/QMP_REFUSED/);

    await c.call('vm.beginDataTls', { vmId, peerIdentity: 'CN=hostD', peerHostname: '127.0.0.1' });
    expect(await qmp.execute('query-migrate-parameters')).toMatchObject({ 'tls-creds': 'ferry-tls-client', 'tls-hostname': '127.0.0.1' });
    await expect(qmp.executeRaw('blockdev-add', nbd(false))).rejects.toThrow(/QMP_REFUSED.*requires TLS/);
    // Past the policy, QEMU itself answers (nobody listens on port 1): the TLS object exists.
    await expect(qmp.executeRaw('blockdev-add', nbd(true))).rejects.toThrow(/[Cc]onnect|refused/);
    await c.call('vm.endDataTls', { vmId });
    expect(await qmp.execute('query-migrate-parameters')).toMatchObject({ 'tls-creds': '', 'tls-hostname': '' });
    expect(existsSync(join(root, 'v', 'run', 'tls'))).toBe(false);
    await qmp.close();

    const disk = join(root, 'w', 'd0.qcow2');
    await c.call('dest.createDisk', { path: disk, format: 'qcow2', virtualSize: 16 << 20 });
    const wspec = { ...spec, name: 'w', disks: [{ id: 'd0', path: disk, format: 'qcow2' }], runDir: join(root, 'w', 'run') };
    await expect(c.call('dest.start', { spec: wspec })).rejects.toMatchObject({ code: 'DATA_TLS_REQUIRED' });
    const started = (await c.call('dest.start', { spec: wspec, dataTls: { peerIdentity: 'CN=hostA', peerHostname: '127.0.0.1' } })) as { vmId: string; pid: number };
    pids.push(started.pid);
    const dq = await c.openQmp(started.vmId);
    expect(await dq.execute('query-migrate-parameters')).toMatchObject({ 'tls-creds': 'ferry-tls-server', 'tls-authz': 'ferry-tls-authz' });
    await expect(dq.executeRaw('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: '33002' } } })).rejects.toThrow(/QMP_REFUSED/);
    await dq.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: '33002' } }, 'tls-creds': 'ferry-tls-server', 'tls-authz': 'ferry-tls-authz' });
    await dq.execute('nbd-server-stop');
    await dq.close();
    await c.call('dest.abandon', { vmId: started.vmId });
    expect(existsSync(join(root, 'w', 'run'))).toBe(false);
  } finally {
    c.close();
    await agent.close();
    killPids(pids);
  }
});

test('the engine over TLS: a writing guest moves with every write; required without certificates is refused in preflight', async () => {
  const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 8 }], workload: { write: { rate: 50 }, tickMs: 50 } });
  await vm.serial.waitForLine((l) => /^ack data \d{2,}$/.test(l.text), { timeoutMs: 30_000, what: 'acks' });
  const qmpSocket = join(spec.runDir, 'qmp.sock');

  const refused = await migrate({ spec, source: new LocalSource({ qmpSocket }), destination: new LocalDestination({ dir: hostB }), options: { dataTls: 'required' } }).catch((e: unknown) => e);
  expect(refused).toMatchObject({ code: 'PREFLIGHT_REFUSED', userError: true, message: expect.stringMatching(/asks for TLS on the data path, but the source has no data-path certificate/) });
  expect(await readdir(hostB)).toEqual([]);

  const [a, b] = await throwawayPki(await makeTempDir('ferry-pki-'), { address: '127.0.0.1', names: ['hostA', 'hostB'] });
  const destination = new LocalDestination({ dir: hostB, dataTls: b! });
  const result = await migrate({ spec, source: new LocalSource({ qmpSocket, dataTls: a! }), destination, options: { dataTls: 'required' } });
  expect(result.plan.dataTls).toEqual({ encrypted: true, source: { identity: 'CN=hostA', hostname: '127.0.0.1' }, destination: { identity: 'CN=hostB', hostname: '127.0.0.1' } });
  await vm.exited;
  const dest = destination.incoming!.process;
  // Nothing of TLS is left: parameters cleared, credentials gone on both sides.
  expect(await dest.qmp.execute('query-migrate-parameters')).toMatchObject({ 'tls-creds': '', 'tls-authz': '' });
  expect((await readdir(dest.spec.runDir)).filter((f) => f.startsWith('tls'))).toEqual([]);
  expect((await readdir(spec.runDir)).filter((f) => f.startsWith('ferry-tls'))).toEqual([]);
  const acked = highestAcks(vm.serial.history()).get('data')!;
  await dest.quit({ timeoutMs: 10_000 });
  const report = await verifyDisk(dest.spec.disks[0]!.path, { format: 'qcow2', diskId: 'data', ackedSeq: acked });
  expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
});

test("the scheduler's job record says the data path was TLS and which names each side admitted", async () => {
  const top = await makeTempDir('ferry-sched-dtls-');
  const [ma, mb] = await throwawayPki(join(top, 'pki'), { address: '127.0.0.1', names: ['hostA', 'hostB'] });
  const token = 'scheduler-agent-token-0123';
  const running: { close(): Promise<void>; url: string }[] = [];
  const pids: number[] = [];
  const roots: string[] = [];
  for (const [i, m] of [ma!, mb!].entries()) {
    const root = join(top, `root${i}`);
    await mkdir(root);
    roots.push(root);
    const files = { cert: join(top, `h${i}.pem`), key: join(top, `h${i}.key`), ca: join(top, 'ca.pem') };
    await writeFile(files.cert, m.cert);
    await writeFile(files.key, m.key);
    await writeFile(files.ca, m.ca);
    running.push(await startAgent({ name: 'AB'[i]!, listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [token]: 'scheduler' }, dataTls: files, portRange: [34000 + 500 * i, 34499 + 500 * i] }));
  }
  const a = await AgentClient.connect(running[0]!.url, token);
  const { spec } = await agentGuestSpec(roots[0]!, 'tv1', { memoryMiB: 128, diskMiB: 32, fillMiB: 4, rate: 20, tickMs: 100 });
  await a.call('vm.create', { spec });
  pids.push(((await a.call('vm.start', { name: 'tv1' })) as { pid: number }).pid);
  a.close();
  const apiToken = 'scheduler-api-token-01234';
  const svc = await startSchedulerService({ listenPort: 0, database: join(top, 'state.db'), hosts: [{ name: 'A', url: running[0]!.url }, { name: 'B', url: running[1]!.url }], agentToken: token, tokens: { [apiToken]: 'ops' }, dataTls: 'required' });
  const c = await SchedulerClient.connect(svc.url, apiToken);
  try {
    const { job } = (await c.call('migrate', { vm: 'tv1', to: 'B' })) as { job: { id: string } };
    let state = '';
    for (let i = 0; i < 600 && !['succeeded', 'failed', 'needs-source'].includes(state); i++) {
      state = ((await c.call('queue', { all: true })) as { id: string; state: string }[]).find((j) => j.id === job.id)?.state ?? '';
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(state).toBe('succeeded');
    const journal = (await c.call('journal', { id: job.id })) as { detail: string | null }[];
    expect(journal.map((e) => e.detail ?? '').filter((d) => /^tv1 runs on B; data over TLS, admitted CN=hostA on B and CN=hostB on A; downtime \d+ ms$/.test(d))).toHaveLength(1);
    const b = await AgentClient.connect(running[1]!.url, token);
    const listed = (await b.call('vm.list')) as { pid: number }[];
    pids.push(...listed.map((v) => v.pid));
    b.close();
  } finally {
    c.close();
    await svc.close();
    for (const r of running) await r.close();
    killPids(pids);
  }
}, 120_000);

test('the engine over TLS with RAM on multifd channels: every write arrives, the destination ran 3 TLS channels', async () => {
  const { vm, spec, hostB } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 64 << 20, fillMiB: 8 }], workload: { write: { rate: 50 }, tickMs: 50 } });
  await vm.serial.waitForLine((l) => /^ack data \d{2,}$/.test(l.text), { timeoutMs: 30_000, what: 'acks' });
  const [a, b] = await throwawayPki(await makeTempDir('ferry-pki-'), { address: '127.0.0.1', names: ['hostA', 'hostB'] });
  const destination = new LocalDestination({ dir: hostB, dataTls: b! });
  const result = await migrate({ spec, source: new LocalSource({ qmpSocket: join(spec.runDir, 'qmp.sock'), dataTls: a! }), destination, options: { dataTls: 'required', multifdChannels: 3 } });
  expect(result.plan.dataTls.encrypted).toBe(true);
  await vm.exited;
  const dest = destination.incoming!.process;
  const caps = await dest.qmp.execute('query-migrate-capabilities');
  expect(caps.find((c) => c.capability === 'multifd')?.state).toBe(true);
  expect(await dest.qmp.execute('query-migrate-parameters')).toMatchObject({ 'multifd-channels': 3 });
  const acked = highestAcks(vm.serial.history()).get('data')!;
  await dest.quit({ timeoutMs: 10_000 });
  const report = await verifyDisk(dest.spec.disks[0]!.path, { format: 'qcow2', diskId: 'data', ackedSeq: acked });
  expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
});
