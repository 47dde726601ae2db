/**
 * Data-path TLS between two hosts: two ferry-agent processes in two network namespaces with
 * data TLS required (their own certificates from one fleet CA), a writing guest moved with
 * `migrate-vm --from A --to B` across a shaped veth link, a capture of that link, and a third
 * host (a third namespace, routed to B) that tries the destination's NBD export while the mirror
 * runs. The plain-text control (the same capture finding the records) is in agent-netns.test.ts.
 */
import { spawn } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { expect, test } from 'vitest';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { MAGIC } from '../../src/guest/record.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { throwawayPki } from '../../src/host/data-tls.js';
import { occurrences, startCapture } from '../helpers/capture.js';
import { agentGuestSpec, makeTempDir } from '../helpers/guest.js';
import { netnsAvailable } from '../helpers/netns.js';
import { call, inNs, startAgentIn, useNetnsAgents } from '../helpers/netns-agents.js';

const TOKEN = 'netns-tls-token-0123456789';
const PORT = 7421;
const RANGE = [21200, 21300] as const;
const canRun = await netnsAvailable();


const netns = useNetnsAgents({ rateMbit: 800, third: true }, canRun);
const agents = netns.agents;

/** The destination QEMU's NBD server: the one port in B's range that listens during the mirror. */
async function listeningPorts(ns: string): Promise<number[]> {
  const r = await inNs(ns, ['ss', '-Htln'], { timeoutMs: 10_000 });
  return [...r.stdout.matchAll(/:(\d+)\s/g)].map((m) => Number(m[1])).filter((p) => p >= RANGE[0] && p <= RANGE[1]);
}

test.skipIf(!canRun)(
  'between two hosts with data TLS required: no record crosses the link in plain text, and a third host cannot reach the export',
  async () => {
    const [nsA, nsB] = netns.pair().names;
    const [ipA, ipB] = netns.pair().addresses;
    const nsC = netns.pair().third!.name;
    const dir = await makeTempDir('ferry-netns-tls-');
    const [hostA, hostB, hostC] = await throwawayPki(join(dir, 'fleet'), { address: [ipA, ipB], names: ['hostA', 'hostB', 'hostC'] });
    const [other] = await throwawayPki(join(dir, 'other'), { address: [ipB], names: ['hostA'] });
    const roots: string[] = [];
    const configs: string[] = [];
    for (const [i, ip] of [ipA, ipB].entries()) {
      const m = [hostA, hostB][i]!;
      const root = await makeTempDir(`ferry-netns-tls-${i}-`);
      roots.push(root);
      const files = { cert: join(dir, `h${i}.pem`), key: join(dir, `h${i}.key`), ca: join(dir, 'ca.pem') };
      await writeFile(files.cert, m.cert);
      await writeFile(files.key, m.key);
      await writeFile(files.ca, m.ca);
      const config = join(dir, `agent-${i}.json`);
      await writeFile(config, JSON.stringify({ name: `host${'AB'[i]}`, listenHost: ip, listenPort: PORT, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [TOKEN]: 'ops' }, migrationHost: ip, portRange: RANGE, dataTls: files }));
      configs.push(config);
    }
    await startAgentIn(nsA, configs[0]!, agents);
    await startAgentIn(nsB, configs[1]!, agents);
    const urlA = `ws://${ipA}:${PORT}`;
    const urlB = `ws://${ipB}:${PORT}`;
    expect(await call(nsA, urlB, TOKEN, 'host.info')).toMatchObject({ dataTls: { mode: 'required', identity: 'CN=hostB' } });

    const { spec } = await agentGuestSpec(roots[0]!, 'web1', { fillMiB: 16 });
    await call(nsA, urlA, TOKEN, 'vm.create', { spec });
    await call(nsA, urlA, TOKEN, 'vm.start', { name: 'web1' });
    let ackedOnA = -1;
    const readAcks = async (path: string): Promise<number> =>
      highestAcks((await readFile(path, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
    const poll = setInterval(() => void readAcks(join(roots[0]!, 'web1', 'run', 'serial.log')).then((n) => (ackedOnA = Math.max(ackedOnA, n))), 100);

    const rogue = async (name: string, files?: Record<string, Buffer>): Promise<string> => {
      let creds = '';
      if (files) {
        const d = join(dir, `rogue-${name}`);
        await mkdir(d);
        for (const [f, b] of Object.entries(files)) await writeFile(join(d, f), b);
        creds = `--object tls-creds-x509,id=t,dir=${d},endpoint=client`;
      }
      const port = (await listeningPorts(nsB))[0];
      const opts = `driver=nbd,host=${ipB},port=${port},export=x${files ? ',tls-creds=t' : ''}`;
      const r = await inNs(nsC, ['sh', '-c', `qemu-img info ${creds} --image-opts '${opts}'`], { timeoutMs: 20_000 });
      return `${r.code} ${r.stderr.trim()}`;
    };
    try {
      for (let i = 0; i < 300 && ackedOnA < 20; i++) await new Promise((r) => setTimeout(r, 100));
      const capture = await startCapture(nsA, netns.pair().veths[0], join(dir, 'tls.pcap'), `tcp portrange ${RANGE[0]}-${RANGE[1]}`);
      // A slow mirror (16 MiB at 4 MiB/s), so the third host has time to try the export.
      const cli = spawn('ip', ['netns', 'exec', nsA, 'node', 'bin/migrate-vm.mjs', '--from', urlA, '--to', urlB, 'web1', '--json', '--bandwidth', '4M'], {
        cwd: join(import.meta.dirname, '../..'),
        env: { ...process.env, FERRY_TOKEN: TOKEN, FERRY_LOG_LEVEL: 'warn' },
      });
      let stdout = '';
      let stderr = '';
      cli.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      cli.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<number | null>((r) => cli.once('close', r));
      for (let i = 0; i < 200 && !/"phase":"mirror"/.test(stdout); i++) await new Promise((r) => setTimeout(r, 100));
      expect(stdout).toMatch(/"phase":"mirror"/);
      expect(await listeningPorts(nsB)).toHaveLength(1);
      const verdicts = {
        plain: await rogue('plain'),
        noCert: await rogue('nocert', { 'ca-cert.pem': hostA!.ca }),
        otherCa: await rogue('otherca', { 'ca-cert.pem': Buffer.concat([hostA!.ca, other!.ca]), 'client-cert.pem': other!.cert, 'client-key.pem': other!.key }),
        thirdHost: await rogue('hostc', { 'ca-cert.pem': hostC!.ca, 'client-cert.pem': hostC!.cert, 'client-key.pem': hostC!.key }),
      };
      for (const [who, v] of Object.entries(verdicts)) expect(v, who).toMatch(/^1 /);
      expect(verdicts.plain).toMatch(/TLS negotiation required/);

      const code = await exited;
      expect(code, stderr).toBe(0);
      const summary = JSON.parse(stdout.trim().split('\n').at(-1)!) as Record<string, unknown>;
      expect(summary).toMatchObject({ event: 'summary', ok: true, dataTls: { encrypted: true, source: { identity: 'CN=hostA', hostname: ipA }, destination: { identity: 'CN=hostB', hostname: ipB } } });
      const captured = await capture.stop();
      // Not vacuous: the disk's 16 MiB crossed this link; not one record of it in plain text.
      expect(captured.length).toBeGreaterThan(16 << 20);
      expect(occurrences(captured, MAGIC)).toBe(0);
    } finally {
      clearInterval(poll);
    }
    // The destination's QEMU logged each refusal; the guest writes on, on B, every write there.
    const runB = (await readdir(join(roots[1]!, 'web1'))).find((f) => f.startsWith('run-'))!;
    const log = await readFile(join(roots[1]!, 'web1', runB, 'qemu.log'), 'utf8');
    expect(log).toMatch(/authz check for CN=hostC is denied/);
    expect(log).toMatch(/No certificate was found/);
    expect((await readdir(join(roots[1]!, 'web1', runB))).filter((f) => f === 'tls')).toEqual([]);
    const serialB = join(roots[1]!, 'web1', runB, 'serial.log');
    for (let i = 0; i < 100 && (await readAcks(serialB)) <= ackedOnA; i++) await new Promise((r) => setTimeout(r, 100));
    const ackedOnB = await readAcks(serialB);
    expect(ackedOnB).toBeGreaterThan(ackedOnA);
    await call(nsA, urlB, TOKEN, 'vm.stop', { name: 'web1' });
    const report = await verifyDisk(join(roots[1]!, 'web1', 'data.qcow2'), { format: 'qcow2', diskId: 'data', ackedSeq: ackedOnB });
    expect(report).toMatchObject({ ok: true, missingCount: 0, corruptCount: 0 });
  },
  180_000,
);
