/**
 * Issue 12, test 2's link half: a sync cut off by the link between two hosts. Two agents in two
 * network namespaces, the scheduler on the standby's side (ns B) reaching the source over the
 * link. The guest writes faster than a 1 Mbit/s link carries, so a sync is always in flight; the
 * link goes down in the middle of one and stays down; the source host is then "gone" (its QEMU
 * killed) and `ferry recover --from-replica --source-fenced`, run on B, boots the guest from the
 * previous consistent point: every record acknowledged before it is there, intact.
 */
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { expect, test } from 'vitest';
import { replicaStatusSchema } from '../../src/agent/replica-protocol.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { highestAcks } from '../../src/guest/serial.js';
import { verifyDisk } from '../../src/guest/verify.js';
import { protectionStatusSchema, recoveryRecordSchema } from '../../src/scheduler/protection-protocol.js';
import { agentGuestSpec, makeTempDir } from '../helpers/guest.js';
import { netnsAvailable } from '../helpers/netns.js';
import { call, inNs, startAgentIn, startBinIn, useNetnsAgents } from '../helpers/netns-agents.js';

const run = promisify(execFile);
const AGENT_TOKEN = 'standby-netns-agent-token-0123456';
const API_TOKEN = 'standby-netns-operator-token-0123';
const PORT = 7420;
const canRun = await netnsAvailable();
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const netns = useNetnsAgents({ rateMbit: 800 }, canRun);

test.skipIf(!canRun)(
  'a sync cut by the link between the hosts, for good: the standby keeps the previous point, and recover boots it with every write acknowledged before it',
  async () => {
    const [nsA, nsB] = netns.pair().names;
    const [ipA, ipB] = netns.pair().addresses;
    const [vethA] = netns.pair().veths;
    const urlA = `ws://${ipA}:${PORT}`;
    const urlB = `ws://${ipB}:${PORT}`;
    const configDir = await makeTempDir('ferry-standby-netns-');
    const roots: string[] = [];
    for (const [i, ip] of [ipA, ipB].entries()) {
      const root = await makeTempDir(`ferry-standby-netns-${'AB'[i]}-`);
      roots.push(root);
      const config = join(configDir, `agent-${i}.json`);
      await writeFile(config, JSON.stringify({ name: `host${'AB'[i]}`, listenHost: ip, listenPort: PORT, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [AGENT_TOKEN]: 'scheduler' }, migrationHost: ip, portRange: [22000, 22100] }));
      await startAgentIn(i === 0 ? nsA : nsB, config, netns.agents);
    }
    const schedulerConfig = join(configDir, 'scheduler.json');
    await writeFile(
      schedulerConfig,
      JSON.stringify({
        listenHost: '127.0.0.1',
        listenPort: 7430,
        database: join(configDir, 'state.db'),
        hosts: [
          { name: 'hostA', url: urlA },
          { name: 'hostB', url: urlB },
        ],
        agentToken: AGENT_TOKEN,
        tokens: { [API_TOKEN]: 'ops' },
      }),
    );
    await startBinIn(nsB, 'bin/ferry-scheduler.mjs', schedulerConfig, netns.agents);
    const ferry = async (...argv: string[]): Promise<unknown> => {
      const r = await inNs(nsB, ['node', 'bin/ferry.mjs', '--scheduler', 'ws://127.0.0.1:7430', '--json', ...argv], { env: { FERRY_SCHEDULER_TOKEN: API_TOKEN }, timeoutMs: 180_000 });
      if (r.code !== 0) throw new Error(`ferry ${argv.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
      return JSON.parse(r.stdout) as unknown;
    };
    const replicaStatus = async () => replicaStatusSchema.parse(await call(nsB, urlB, AGENT_TOKEN, 'replica.status', { vm: 'web1' }));

    // A guest writing 100 records/s (about 400 KiB/s of records): more than 1 Mbit/s carries.
    const { spec, serialLog } = await agentGuestSpec(roots[0]!, 'web1', { memoryMiB: 128, diskMiB: 32, fillMiB: 4, rate: 100, tickMs: 100 });
    await call(nsA, urlA, AGENT_TOKEN, 'vm.create', { spec });
    const { pid } = (await call(nsA, urlA, AGENT_TOKEN, 'vm.start', { name: 'web1' })) as { pid: number };
    /** (wall clock, highest ack) samples: a sample taken before an instant saw only acks from before it. */
    const acks: { at: number; seq: number }[] = [];
    const poll = setInterval(() => {
      const at = Date.now();
      void readFile(serialLog, 'utf8').then(
        (t) => acks.push({ at, seq: highestAcks(t.split('\n').map((text) => ({ text }))).get('data') ?? -1 }),
        () => undefined,
      );
    }, 100);
    try {
      for (let i = 0; i < 300 && (acks.at(-1)?.seq ?? -1) < 5; i++) await sleep(100);
      await ferry('protect', 'web1', '--standby', 'hostB', '--interval', '1s');
      let status = protectionStatusSchema.array().parse(await ferry('protect', 'status'))[0];
      for (let i = 0; i < 120 && (status?.syncs ?? 0) < 2; i++) {
        await sleep(500);
        status = protectionStatusSchema.array().parse(await ferry('protect', 'status'))[0];
      }
      expect(status?.syncs, JSON.stringify(status)).toBeGreaterThanOrEqual(2);

      // The link slowed to 1 Mbit/s from A: syncs now run back to back; cut it during one.
      await run('ip', ['netns', 'exec', nsA, 'tc', 'qdisc', 'replace', 'dev', vethA, 'root', 'tbf', 'rate', '1mbit', 'burst', '32kb', 'latency', '400ms']);
      let before = await replicaStatus();
      for (let i = 0; i < 60 && !(before.syncing && before.consistent); i++) {
        await sleep(200);
        before = await replicaStatus();
      }
      expect(before.syncing).toBe(true);
      await run('ip', ['-n', nsA, 'link', 'set', vethA, 'down']);
      const atCut = await replicaStatus();
      expect(atCut.consistent, 'a point to fall back on').not.toBeNull();
      // A sync may still have committed between the two reads; from the cut on, none can.
      const point = atCut.consistent!;
      await sleep(5_000);
      const later = await replicaStatus();
      expect(later.consistent).toEqual(point);
      expect(later.state).toBe('active');

      // Host A is gone: its QEMU is killed (the link stays down), the operator fences it.
      process.kill(pid, 'SIGKILL');
      const upTo = Math.max(...acks.map((x) => x.seq));
      const rec = recoveryRecordSchema.parse(await ferry('recover', 'web1', '--from-replica', '--source-fenced'));
      expect(rec).toMatchObject({ state: 'succeeded', seq: point.seq, pointAt: point.pointAt });
      expect(rec.rpoMs!).toBeGreaterThanOrEqual(0);

      const onB = (await call(nsB, urlB, AGENT_TOKEN, 'vm.get', { name: 'web1' })) as { state: string; spec: { disks: { path: string }[] } };
      expect(onB.state).toBe('running');
      await call(nsB, urlB, AGENT_TOKEN, 'vm.stop', { name: 'web1', timeoutMs: 10_000 });
      const mustHave = Math.max(-1, ...acks.filter((x) => x.at < point.pointAt - 100).map((x) => x.seq));
      expect(mustHave).toBeGreaterThan(5);
      const flat = join(configDir, 'data.raw');
      await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', onB.spec.disks[0]!.path, flat]);
      const report = await verifyDisk(flat, { format: 'raw', diskId: 'data', ackedSeq: mustHave });
      expect(report.ok, JSON.stringify(report)).toBe(true);
      // The point is older than the cut: what the guest acknowledged after it is not all there.
      expect(mustHave).toBeLessThan(upTo);
      console.log(`standby link cut: fell back to sync ${point.seq}; ${mustHave + 1} records kept of ${upTo + 1} acknowledged; RPO ${rec.rpoMs} ms`);
    } finally {
      clearInterval(poll);
    }
  },
  300_000,
);
