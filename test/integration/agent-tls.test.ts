/** ferry-agent with mutual TLS: only callers with a certificate from the agent's CA get in, and the engine migrates through it. */
import { IMAGE_DIR } from '../../src/guest/image.js';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { WebSocket } from 'ws';
import { AgentClient, AgentDestination } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { loadTls, type TlsMaterial } from '../../src/host/tls.js';
import { LocalSource } from '../../src/engine/local-endpoint.js';
import { migrate } from '../../src/engine/migrate.js';
import { bootWorkloadGuest, cleanupAll, makeTempDir } from '../helpers/guest.js';
import { makePki, type Pki } from '../helpers/pki.js';

const TOKEN = 'tls-test-token-0123456789';
let pki: Pki;
let agent: RunningAgent;
let root: string;
let clientTls: TlsMaterial;
const pids: number[] = [];

beforeAll(async () => {
  pki = await makePki(await makeTempDir('ferry-pki-'));
  root = await makeTempDir('ferry-agent-tls-');
  agent = await startAgent({ name: 'secure', listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [TOKEN]: 'ops' }, tls: { cert: pki.agent.cert, key: pki.agent.key, ca: pki.ca } });
  clientTls = await loadTls({ cert: pki.client.cert, key: pki.client.key, ca: pki.ca });
}, 30_000);

afterAll(async () => {
  await agent.close();
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  await cleanupAll();
});

/** Resolves with how a raw TLS WebSocket attempt ended. */
function attempt(opts: { cert?: Buffer; key?: Buffer; ca?: Buffer }, token = TOKEN): Promise<string> {
  return new Promise((resolve) => {
    const ws = new WebSocket(`${agent.url}/v1`, { headers: { authorization: `Bearer ${token}` }, handshakeTimeout: 5_000, ...opts });
    ws.once('open', () => {
      resolve('open');
      ws.close();
    });
    ws.once('unexpected-response', (_q, res) => resolve(`HTTP ${res.statusCode}`));
    ws.once('error', (err) => resolve(`error: ${err.message}`));
  });
}

test('only a certificate from the agent CA, with a valid token, gets in', async () => {
  expect(agent.url).toMatch(/^wss:\/\/127\.0\.0\.1:\d+$/);
  const c = await AgentClient.connect(agent.url, TOKEN, 5_000, clientTls);
  expect(await c.call('vm.list')).toEqual([]);
  c.close();
  const ca = clientTls.ca;
  expect(await attempt({ ca })).toMatch(/^error: /); // no client certificate: no handshake
  const rogue = await loadTls(pki.rogue);
  expect(await attempt({ cert: rogue.cert, key: rogue.key, ca })).toMatch(/^error: /); // another CA's client
  expect(await attempt({ cert: clientTls.cert, key: clientTls.key, ca }, 'wrong-token-0123456789')).toBe('HTTP 401');
  expect(await attempt({ cert: clientTls.cert, key: clientTls.key })).toMatch(/^error: .*(self.signed|unable to verify|certificate)/i); // the agent's CA not trusted
  await expect(AgentClient.connect(agent.url, TOKEN)).rejects.toMatchObject({ code: 'AGENT_TLS' });
});

test('a guest migrates into a TLS agent: QMP tunnel and control over mutual TLS, data over QEMU TLS (required by default)', async () => {
  const { vm, spec } = await bootWorkloadGuest({ disks: [{ id: 'root', format: 'qcow2', size: 32 << 20, fillMiB: 4 }], workload: { write: { rate: 20 }, tickMs: 50 } });
  const dest = await AgentDestination.connect(agent.url, TOKEN, { tls: clientTls });
  const qmpSocket = join(spec.runDir, 'qmp.sock');
  // The agent has TLS, so its data path requires it: a source without a certificate is refused.
  await expect(migrate({ spec, source: new LocalSource({ qmpSocket }), destination: dest })).rejects.toMatchObject({ code: 'PREFLIGHT_REFUSED', message: expect.stringMatching(/destination host requires TLS on the data path/) });
  const result = await migrate({ spec, source: new LocalSource({ qmpSocket, dataTls: clientTls }), destination: dest });
  expect(result.plan.destination).toBe('secure (agent)');
  expect(result.plan.dataTls).toMatchObject({ encrypted: true, source: { identity: 'CN=client' }, destination: { identity: 'CN=agent', hostname: '127.0.0.1' } });
  await vm.exited;
  const c = await AgentClient.connect(agent.url, TOKEN, 5_000, clientTls);
  const [moved] = (await c.call('vm.list')) as { pid: number; name: string; state: string }[];
  expect(moved).toMatchObject({ name: spec.name, state: 'running' });
  pids.push(moved!.pid);
  await c.call('vm.stop', { name: spec.name });
  c.close();
  dest.close();
}, 60_000);
