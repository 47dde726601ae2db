/**
 * Issue 17, between agents: migrate-vm dies (kill -9) with the source paused at pre-switchover.
 * The source agent sees the orchestrator's QMP tunnel go and, since the source's migration never
 * completed (the destination lacks the device state and can never run), cancels it: the guest runs
 * on the source again. The destination agent abandons its incoming VM (QEMU killed, disk, run dir
 * and record removed).
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import type { AgentEvent } from '../../src/agent/protocol.js';
import { startAgent } from '../../src/agent/server.js';
import { ferryLeftovers } from '../../src/engine/settle-local.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { highestAcks } from '../../src/guest/serial.js';
import { agentGuestSpec, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';
import { killPid, startMigrateVm } from '../helpers/migrate-vm-process.js';

const TOKEN = 'token-of-alice-0123456789';
const pids: number[] = [];
afterEach(async () => {
  killPids(pids);
  await cleanupAll();
});

test('kill -9 of migrate-vm at pre-switchover between agents: the source agent resumes the source, the destination agent abandons its incoming VM', async () => {
  const rootA = await makeTempDir('ferry-agent-a-');
  const rootB = await makeTempDir('ferry-agent-b-');
  const agentA = await startAgent({ name: 'hostA', listenPort: 0, storageRoot: rootA, bootRoots: [IMAGE_DIR], tokens: { [TOKEN]: 'alice' } });
  const agentB = await startAgent({ name: 'hostB', listenPort: 0, storageRoot: rootB, bootRoots: [IMAGE_DIR], tokens: { [TOKEN]: 'alice' } });
  const clients: AgentClient[] = [];
  try {
    const { spec, serialLog } = await agentGuestSpec(rootA, 'web1');
    const a = await AgentClient.connect(agentA.url, TOKEN);
    clients.push(a);
    await a.call('vm.create', { spec });
    const { pid, vmId } = (await a.call('vm.start', { name: 'web1' })) as { pid: number; vmId: string };
    pids.push(pid);
    const acks = async (): Promise<number> => highestAcks((await readFile(serialLog, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;
    for (let i = 0; i < 300 && (await acks()) < 20; i++) await new Promise((r) => setTimeout(r, 100));

    const migration: string[] = [];
    const waiters: { status: string; resolve: () => void }[] = [];
    await a.onEvent((e: AgentEvent) => {
      if (e.type !== 'vm.qmp' || e.event !== 'MIGRATION') return;
      const status = String(e.data.status);
      migration.push(status);
      for (const w of waiters.filter((x) => x.status === status)) w.resolve();
    });
    const reached = (status: string, timeoutMs = 60_000): Promise<void> =>
      migration.includes(status)
        ? Promise.resolve()
        : new Promise((resolve, reject) => {
            const t = setTimeout(() => reject(new Error(`no MIGRATION ${status} in ${timeoutMs} ms (saw ${migration.join(', ')})`)), timeoutMs);
            waiters.push({ status, resolve: () => (clearTimeout(t), resolve()) });
          });

    const run = startMigrateVm(['--from', agentA.url, '--to', agentB.url, 'web1', '--bandwidth', '8M', '--copy-mode', 'write-blocking'], { ...process.env, FERRY_TOKEN: TOKEN });
    pids.push(run.pid);
    await reached('active');
    killPid(run.pid, 'SIGSTOP');
    await reached('pre-switchover');
    const b = await AgentClient.connect(agentB.url, TOKEN);
    clients.push(b);
    const incoming = ((await b.call('vm.list')) as { name: string; role: string; pid: number | null; state: string }[]).find((v) => v.role === 'incoming');
    expect(incoming?.state).toBe('running');
    if (incoming?.pid) pids.push(incoming.pid);
    killPid(run.pid);
    await run.exited;

    // Without the agents the guest would stay paused at pre-switchover for as long as nobody comes.
    await reached('cancelled', 20_000);
    const before = await acks();
    for (let i = 0; i < 200 && (await acks()) <= before + 5; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await acks()).toBeGreaterThan(before + 5);
    const q = await a.openQmp(vmId);
    expect((await q.execute('query-status')).status).toBe('running');
    expect(await ferryLeftovers(q)).toEqual([]);
    await q.close();
    // The destination was abandoned whole: its QEMU is gone (it can never be told `cont`), and
    // so are its record, its disk and its run dir (what dest.abandon removes).
    for (let i = 0; i < 100; i++) {
      if (!((await b.call('vm.list')) as { role: string }[]).some((x) => x.role === 'incoming')) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect((await b.call('vm.list')) as unknown[]).toEqual([]);
    expect((await readdir(rootB)).filter((f) => !f.startsWith('.'))).toEqual([]);
  } finally {
    for (const c of clients) c.close();
    await agentA.close();
    await agentB.close();
  }
}, 180_000);
