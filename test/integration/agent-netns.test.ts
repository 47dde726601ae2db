/**
 * Two ferry-agent processes, each in its own network namespace, joined by a shaped veth link.
 * Agent A runs a writing guest; A is killed with SIGKILL and started again (it must re-attach);
 * then `migrate-vm --from ws://A --to ws://B` moves the guest across the link, and no
 * acknowledged write is lost. Namespaces and every process in them are removed afterwards, also
 * when the test fails.
 */
import { IMAGE_DIR } from '../../src/guest/image.js';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import { processStartTime } from '../../src/agent/registry.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { agentGuestSpec, makeTempDir } from '../helpers/guest.js';
import { netnsAvailable } from '../helpers/netns.js';
import { call, inNs, startAgentIn, useNetnsAgents } from '../helpers/netns-agents.js';
import { occurrences, startCapture } from '../helpers/capture.js';
import { MAGIC } from '../../src/guest/record.js';

const TOKEN = 'netns-test-token-0123456789';
const PORT = 7420;
const canRun = await netnsAvailable();

const roots: string[] = [];

const netns = useNetnsAgents({ rateMbit: 800 }, canRun);
const agents = netns.agents;

test.skipIf(!canRun)(
  'across two network namespaces: agent A killed and restarted re-attaches, then migrate-vm --from A --to B loses no write',
  async () => {
    const [nsA, nsB] = netns.pair().names;
    const [ipA, ipB] = netns.pair().addresses;
    const urlA = `ws://${ipA}:${PORT}`;
    const urlB = `ws://${ipB}:${PORT}`;
    const configs: string[] = [];
    const configDir = await makeTempDir('ferry-netns-config-');
    for (const [i, ip] of [ipA, ipB].entries()) {
      const root = await makeTempDir(`ferry-netns-${i}-`);
      roots.push(root);
      const config = join(configDir, `agent-${i}.json`);
      await writeFile(config, JSON.stringify({ name: `host${'AB'[i]}`, listenHost: ip, listenPort: PORT, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [TOKEN]: 'ops' }, migrationHost: ip, portRange: [21000, 21100] }));
      configs.push(config);
    }
    let agentA = await startAgentIn(nsA, configs[0]!, agents);
    await startAgentIn(nsB, configs[1]!, agents);

    const dir = join(roots[0]!, 'web1');
    const { spec } = await agentGuestSpec(roots[0]!, 'web1', { fillMiB: 16 });
    await call(nsA, urlA, TOKEN, 'vm.create', { spec });
    const { pid } = (await call(nsA, urlA, TOKEN, 'vm.start', { name: 'web1' })) as { pid: number };

    // The source's serial log goes with its run dir when the source retires: keep reading it.
    let ackedOnA = -1;
    const readAcks = async (path: string): Promise<number> =>
      highestAcks((await readFile(path, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
    const poll = setInterval(() => void readAcks(join(dir, 'run', 'serial.log')).then((n) => (ackedOnA = Math.max(ackedOnA, n))), 100);
    try {
      for (let i = 0; i < 300 && ackedOnA < 20; i++) await new Promise((r) => setTimeout(r, 100));
      expect(ackedOnA).toBeGreaterThanOrEqual(20);

      // kill -9 the agent: its VM must not notice, and a new agent must take it back.
      agentA.kill('SIGKILL');
      await new Promise((r) => agentA.once('exit', r));
      expect(processStartTime(pid)).toBeDefined();
      agentA = await startAgentIn(nsA, configs[0]!, agents);
      expect(await call(nsA, urlA, TOKEN, 'vm.list')).toEqual([{ vmId: expect.any(String), name: 'web1', role: 'vm', state: 'running', pid, running: true, memoryMiB: expect.any(Number), diskBytes: expect.any(Number) }]);
      const before = ackedOnA;
      for (let i = 0; i < 100 && ackedOnA < before + 10; i++) await new Promise((r) => setTimeout(r, 100));
      expect(ackedOnA).toBeGreaterThanOrEqual(before + 10); // the guest kept writing throughout

      // The control for the data-TLS test (agent-netns-tls.test.ts): without TLS the guest's records
      // cross this link as plain text, and the capture finds them.
      const capture = await startCapture(nsA, netns.pair().veths[0], join(configDir, 'plain.pcap'), 'tcp portrange 21000-21100');
      const cli = await inNs(nsA, ['node', 'bin/migrate-vm.mjs', '--from', urlA, '--to', urlB, 'web1', '--json'], { token: TOKEN });
      expect(occurrences(await capture.stop(), MAGIC)).toBeGreaterThan(100);
      expect(cli.code, cli.stderr).toBe(0);
      const summary = JSON.parse(cli.stdout.trim().split('\n').pop()!) as Record<string, unknown>;
      expect(summary).toMatchObject({ event: 'summary', ok: true, destination: 'hostB (agent)' });
      expect(summary.diskBytes as number).toBeGreaterThan(16 << 20); // the 16 MiB fill crossed the link
    } finally {
      clearInterval(poll);
    }
    expect(processStartTime(pid)).toBeUndefined(); // the source QEMU is gone (or a zombie, not yet reaped by init)
    expect(await call(nsA, urlA, TOKEN, 'vm.list')).toEqual([]);
    // B is reached over the link, from A's side, as a control plane would.
    const listed = (await call(nsA, urlB, TOKEN, 'vm.list')) as { pid: number; name: string; role: string; state: string }[];
    expect(listed).toMatchObject([{ name: 'web1', role: 'vm', state: 'running' }]);
    const runB = (await readdir(join(roots[1]!, 'web1'))).find((f) => f.startsWith('run-'))!;
    const serialB = join(roots[1]!, 'web1', runB, 'serial.log');
    for (let i = 0; i < 100 && (await readAcks(serialB)) <= ackedOnA; i++) await new Promise((r) => setTimeout(r, 100));
    const ackedOnB = await readAcks(serialB);
    expect(ackedOnB).toBeGreaterThan(ackedOnA); // the guest writes on, on B
    await call(nsA, urlB, TOKEN, 'vm.stop', { name: 'web1' });
    const report = await verifyDisk(join(roots[1]!, 'web1', 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: ackedOnB });
    expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  },
  180_000,
);
