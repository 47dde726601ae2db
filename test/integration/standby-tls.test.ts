/**
 * TLS on the replication data path (issue 12): agents whose dataTls is required (certificates
 * hostA, hostB of one CA) replicate through the scheduler over QEMU's own TLS; the standby's
 * qemu-storage-daemon serves NBD with tls-creds (verify-peer) and a tls-authz that admits only
 * the source's certificate name, so a plain client and a client holding another host's valid
 * certificate are both refused. A standby without data TLS (C) is refused before anything is made.
 */
import { execFile } from 'node:child_process';
import { mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { throwawayPki, type HostTlsMaterial } from '../../src/host/data-tls.js';
import { SchedulerClient } from '../../src/scheduler/client.js';
import { startSchedulerService, type RunningScheduler } from '../../src/scheduler/service.js';
import { agentLeftoverPids } from '../helpers/agent-leftovers.js';
import { agentGuestSpec, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';

const run = promisify(execFile);
const AGENT_TOKEN = 'agent-token-standby-tls-0123';
const API_TOKEN = 'operator-token-standby-tls-01';
const agents: Record<string, RunningAgent> = {};
const roots: Record<string, string> = {};
const pids: number[] = [];
let pki: HostTlsMaterial[] = [];
let top = '';
let svc: RunningScheduler | undefined;
let api: SchedulerClient | undefined;
let runDirA = '';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  top = await makeTempDir('ferry-standby-tls-');
  pki = await throwawayPki(join(top, 'pki'), { address: '127.0.0.1', names: ['hostA', 'hostB', 'hostC'] });
  for (const [i, h] of ['A', 'B', 'C'].entries()) {
    roots[h] = join(top, `root-${h}`);
    await mkdir(roots[h]!);
    const m = pki[i]!;
    const files = { cert: join(top, `${h}.pem`), key: join(top, `${h}.key`), ca: join(top, 'ca.pem') };
    await writeFile(files.cert, m.cert);
    await writeFile(files.key, m.key, { mode: 0o600 });
    await writeFile(files.ca, m.ca);
    // C has no data-path certificate: its dataTls is off.
    agents[h] = await startAgent({ name: h, listenPort: 0, storageRoot: roots[h]!, bootRoots: [IMAGE_DIR], tokens: { [AGENT_TOKEN]: 'scheduler' }, portRange: [36000 + 500 * i, 36499 + 500 * i], ...(h === 'C' ? {} : { dataTls: files }) });
  }
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  const { spec } = await agentGuestSpec(roots.A!, 'tv1', { memoryMiB: 128, diskMiB: 32, rate: 30, tickMs: 100 });
  runDirA = join(roots.A!, 'tv1', 'run');
  await a.call('vm.create', { spec });
  pids.push(((await a.call('vm.start', { name: 'tv1' })) as { pid: number }).pid);
  a.close();
  svc = await startSchedulerService({ listenPort: 0, database: join(top, 'state.db'), hosts: ['A', 'B', 'C'].map((h) => ({ name: h, url: agents[h]!.url })), agentToken: AGENT_TOKEN, tokens: { [API_TOKEN]: 'operator' } });
  api = await SchedulerClient.connect(svc.url, API_TOKEN);
}, 90_000);

afterAll(async () => {
  api?.close();
  await svc?.close();
  for (const a of Object.values(agents)) await a.close();
  pids.push(...(await agentLeftoverPids(Object.values(roots))));
  killPids(pids);
  await cleanupAll();
}, 60_000);

/** qemu-img as an NBD client of the daemon's server: plain, or over TLS with host `as`'s certificate. */
async function nbdClient(port: number, exportName: string, as?: number): Promise<{ code: number; stderr: string }> {
  const args = ['info'];
  let opts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=${exportName}`;
  if (as !== undefined) {
    const d = join(top, `client-${as}`);
    await mkdir(d, { recursive: true, mode: 0o700 });
    await writeFile(join(d, 'ca-cert.pem'), pki[as]!.ca);
    await writeFile(join(d, 'client-cert.pem'), pki[as]!.cert);
    await writeFile(join(d, 'client-key.pem'), pki[as]!.key, { mode: 0o600 });
    args.push('--object', `tls-creds-x509,id=t,dir=${d},endpoint=client`);
    opts += ',tls-creds=t,tls-hostname=127.0.0.1';
  }
  args.push('--image-opts', opts);
  return run('qemu-img', args, { timeout: 20_000 }).then(
    () => ({ code: 0, stderr: '' }),
    (err: { code?: number; stderr?: string }) => ({ code: err.code ?? -1, stderr: String(err.stderr ?? '') }),
  );
}

test('a sync over TLS between required agents; the daemon refuses a plain client and another host; a standby without TLS is refused before anything', async () => {
  // C cannot do data TLS and A requires it: refused, nothing made on C.
  await expect(api!.call('protect', { vm: 'tv1', standby: 'C', intervalMs: 1000 })).rejects.toMatchObject({ code: 'DATA_TLS_UNAVAILABLE' });
  expect(await readdir(join(roots.C!, 'replicas')).catch(() => [] as string[])).toEqual([]);
  expect((await api!.call('protect-status', {})).length).toBe(0);

  await api!.call('protect', { vm: 'tv1', standby: 'B', intervalMs: 1000 });
  let s;
  for (let i = 0; i < 450; i++) {
    s = (await api!.call('protect-status', {})).find((r) => r.vm === 'tv1');
    if (s && s.syncs >= 3) break;
    await sleep(200);
  }
  // Both agents require TLS: a plain sync would have been refused by either.
  expect(s?.syncs, JSON.stringify(s)).toBeGreaterThanOrEqual(3);
  expect(s?.dataPath).toBe('tls');

  const replicaDir = join(roots.B!, 'replicas', (await readdir(join(roots.B!, 'replicas')))[0]!);
  const manifest = JSON.parse(await readFile(join(replicaDir, 'manifest.json'), 'utf8')) as { daemon: { port: number }; consistent: { seq: number } };
  expect(((await stat(join(replicaDir, 'tls'))).mode & 0o777).toString(8)).toBe('700');
  const port = manifest.daemon.port;
  const exportName = `replica-tv1-data-${manifest.consistent.seq + 1}`;
  const plain = await nbdClient(port, exportName);
  expect(plain.code).not.toBe(0);
  expect(plain.stderr).toMatch(/TLS negotiation required/);
  // Host C's certificate is valid (same CA) but not the source's name: the authz refuses it.
  const hostC = await nbdClient(port, 'no-such-export', 2);
  expect(hostC.code).not.toBe(0);
  // The source's own certificate gets past TLS and the authz, as far as the export lookup (none by that name).
  const hostA = await nbdClient(port, 'no-such-export', 0);
  expect(hostA.code).not.toBe(0);
  expect(hostA.stderr, hostA.stderr).toMatch(/export 'no-such-export' not present|Requested export not available/);
  expect(hostC.stderr).toMatch(/Cannot read from TLS channel/);
  expect(hostA.stderr).not.toMatch(/Cannot read from TLS channel/);

  // Replication went on through those refusals.
  const before = s!.syncs;
  for (let i = 0; i < 300; i++) {
    s = (await api!.call('protect-status', {})).find((r) => r.vm === 'tv1');
    if (s && s.syncs > before) break;
    await sleep(200);
  }
  expect(s!.syncs).toBeGreaterThan(before);

  await api!.call('unprotect', { vm: 'tv1' });
  // The source's sync credentials exist only during a sync; the standby's went with its replica.
  expect((await readdir(runDirA)).filter((f) => f.includes('tls'))).toEqual([]);
  expect(await readdir(join(roots.B!, 'replicas'))).toEqual([]);
}, 240_000);
