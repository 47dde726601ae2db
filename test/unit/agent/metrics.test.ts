/**
 * The agent's QMP counters through the real tunnel (a real WebSocket, a scripted "QEMU" on a unix
 * socket that sends its replies one byte per write): QEMU's error replies counted by class however
 * they are split, a policy refusal counted by code, the bytes delivered unchanged.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { WebSocket, WebSocketServer } from 'ws';
import { AgentMetrics, staleCallLabel } from '../../../src/agent/metrics.js';
import { peerMatcher } from '../../../src/agent/qmp-policy.js';
import { tunnelQmp } from '../../../src/agent/qmp-tunnel.js';
import { silentLogger } from '../../../src/log.js';

let dir: string;
let fake: Server;
let wss: WebSocketServer;
const metrics = new AgentMetrics(() => [{ role: 'vm', state: 'running' }, { role: 'vm', state: 'stopped' }, { role: 'incoming', state: 'running' }]);
const GREETING = `${JSON.stringify({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: [] } })}\n`;
const ERROR = (id: number): string => `${JSON.stringify({ error: { class: 'DeviceNotFound', desc: 'Device \'x\' not found' }, id })}\n`;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-agent-metrics-'));
  fake = createServer((s: Socket) => {
    const slowly = (text: string): void => {
      for (const b of Buffer.from(text)) s.write(Buffer.from([b]));
    };
    slowly(GREETING);
    let buf = '';
    s.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
        const id = (JSON.parse(buf.slice(0, i)) as { id: number }).id;
        buf = buf.slice(i + 1);
        // An event mentioning "error" in its data is no error reply.
        slowly(`${JSON.stringify({ event: 'BLOCK_JOB_ERROR', data: { device: 'x', error: 'y' } })}\n`);
        slowly(id % 2 === 0 ? ERROR(id) : `${JSON.stringify({ return: {}, id })}\n`);
      }
    });
  });
  await new Promise<void>((r) => fake.listen(join(dir, 'qmp.sock'), r));
  wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise((r) => wss.once('listening', r));
  const policy = { role: 'source' as const, diskIds: ['data'], migrationHost: '127.0.0.1', portRange: [20000, 20099] as const, peerAllowed: peerMatcher({ migrationHost: '127.0.0.1' }) };
  wss.on('connection', (ws) => tunnelQmp(ws, join(dir, 'qmp.sock'), policy, silentLogger, { qemuLine: (l) => metrics.qemuLine(l), qmpRefused: (c) => metrics.qmpRefused(c) }));
});

afterAll(async () => {
  await new Promise((r) => wss.close(r));
  await new Promise((r) => fake.close(r));
  await rm(dir, { recursive: true, force: true });
});

const value = (text: string, series: string): number | undefined => {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
};

test('error replies counted by class whatever their split, refusals by code, bytes unchanged', async () => {
  const ws = new WebSocket(`ws://127.0.0.1:${(wss.address() as { port: number }).port}`);
  let got = '';
  ws.on('message', (d: Buffer) => (got += d.toString('utf8')));
  await new Promise((r) => ws.once('open', r));
  for (let id = 0; id < 4; id++) ws.send(`${JSON.stringify({ execute: 'query-status', id })}\n`);
  ws.send(`${JSON.stringify({ execute: 'human-monitor-command', arguments: { 'command-line': 'info' }, id: 99 })}\n`);
  const deadline = Date.now() + 5_000;
  while (got.split('\n').filter((l) => l.includes('"id"')).length < 5 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  ws.close();
  expect(got.startsWith(GREETING)).toBe(true);
  expect(got).toContain(ERROR(0));
  expect(got).toContain(ERROR(2));
  const text = (await metrics.render()).body;
  expect(value(text, 'ferry_agent_qmp_errors_total{class="DeviceNotFound"}')).toBe(2);
  expect(value(text, 'ferry_agent_qmp_refused_total{code="QMP_REFUSED"}')).toBe(1);
  expect(value(text, 'ferry_agent_vms{role="vm",state="running"}')).toBe(1);
  expect(value(text, 'ferry_agent_vms{role="vm",state="stopped"}')).toBe(1);
  expect(value(text, 'ferry_agent_vms{role="incoming",state="running"}')).toBe(1);
  expect(text).not.toMatch(/^ferry_agent_stale_calls_refused_total\{/m);
  metrics.recordStaleCallRefused('dest.start');
  expect(value((await metrics.render()).body, 'ferry_agent_stale_calls_refused_total{method="dest.start"}')).toBe(1);
});

test('a stale call is labelled by its RPC method or QMP command, never by free text', () => {
  expect(staleCallLabel('dest.start')).toBe('dest.start');
  expect(staleCallLabel('QMP migrate-cancel')).toBe('qmp:migrate-cancel');
  expect(staleCallLabel('a QMP tunnel')).toBe('qmp-tunnel');
  expect(staleCallLabel('QMP {"execute": "x"} and more')).toBe('qmp:other');
});
