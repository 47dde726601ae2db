/**
 * Records QMP transcripts from the installed QEMU into fixtures/qmp/*.jsonl, one JSON object per
 * line: `{"dir":"recv"|"send","msg":{...}}`. The unit tests' fake server replays them, so the fake
 * speaks exactly what the real QEMU spoke. Deliberately uses a raw socket, not QmpClient: the
 * fixtures must not inherit the client's bugs.
 *
 *   npx tsx scripts/record-qmp-fixtures.ts
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile, mkdir } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

type Line = { dir: 'send' | 'recv'; msg: unknown };

const outDir = fileURLToPath(new URL('../fixtures/qmp/', import.meta.url));

class RawSession {
  readonly lines: Line[] = [];
  #buf = '';
  #waiters: Array<() => void> = [];
  #received: unknown[] = [];
  constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (s: string) => {
      this.#buf += s;
      let nl: number;
      while ((nl = this.#buf.indexOf('\n')) >= 0) {
        const text = this.#buf.slice(0, nl).trim();
        this.#buf = this.#buf.slice(nl + 1);
        if (!text) continue;
        const msg: unknown = JSON.parse(text);
        this.lines.push({ dir: 'recv', msg });
        this.#received.push(msg);
      }
      for (const w of this.#waiters.splice(0)) w();
    });
  }
  send(msg: Record<string, unknown>): void {
    this.lines.push({ dir: 'send', msg });
    this.sock.write(JSON.stringify(msg) + '\n');
  }
  /** Waits until a received message satisfies `pred`; 10 s deadline. */
  async until(pred: (m: Record<string, unknown>) => boolean, what: string): Promise<Record<string, unknown>> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      const hit = this.#received.find((m) => typeof m === 'object' && m !== null && pred(m as Record<string, unknown>));
      if (hit) return hit as Record<string, unknown>;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 200);
        this.#waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }
  async call(id: string, execute: string, args?: Record<string, unknown>): Promise<Record<string, unknown>> {
    this.send(args ? { execute, arguments: args, id } : { execute, id });
    return this.until((m) => m.id === id, `reply to ${execute}`);
  }
}

async function withQemu<T>(fn: (s: RawSession) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-qmp-rec-'));
  const sockPath = join(dir, 'qmp.sock');
  let qemu: ChildProcess | undefined;
  let sock: Socket | undefined;
  try {
    qemu = spawn(
      'qemu-system-x86_64',
      ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${sockPath},server=on,wait=off`],
      { stdio: ['ignore', 'ignore', 'inherit'] },
    );
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        sock = await new Promise<Socket>((resolve, reject) => {
          const s = connect(sockPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        break;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    const session = new RawSession(sock);
    await session.until((m) => 'QMP' in m, 'greeting');
    return await fn(session);
  } finally {
    sock?.destroy();
    if (qemu?.pid !== undefined && qemu.exitCode === null) {
      process.kill(qemu.pid, 'SIGKILL');
      await new Promise((r) => qemu!.once('exit', r));
    }
    await rm(dir, { recursive: true, force: true });
  }
}

function jsonl(lines: Line[]): string {
  return lines.map((l) => JSON.stringify(l)).join('\n') + '\n';
}

/** Keeps only the schema entries a test needs (and everything they reference, one level). */
function trimSchema(schema: Array<Record<string, unknown>>): Array<Record<string, unknown>> {
  const keepNames = new Set<string>();
  const byName = new Map(schema.map((e) => [e.name as string, e]));
  const wantCommands = [
    'query-status', 'blockdev-mirror', 'migrate-set-parameters', 'migrate', 'query-migrate',
    'block-export-add', 'nbd-server-start', 'migrate-set-capabilities', 'query-migrate-capabilities',
  ];
  const wantEvents = ['STOP', 'RESUME', 'MIGRATION', 'BLOCK_JOB_READY', 'JOB_STATUS_CHANGE'];
  const add = (name: string | undefined, depth: number): void => {
    if (!name || keepNames.has(name)) return;
    const e = byName.get(name);
    if (!e) return;
    keepNames.add(name);
    if (depth <= 0) return;
    for (const key of ['arg-type', 'ret-type', 'element-type']) add(e[key] as string | undefined, depth - 1);
    for (const m of (e.members as Array<{ type?: string }> | undefined) ?? []) add(m.type, depth - 1);
    for (const v of (e.variants as Array<{ type?: string }> | undefined) ?? []) add(v.type, depth - 1);
  };
  for (const e of schema) {
    if ((e['meta-type'] === 'command' && wantCommands.includes(e.name as string)) || (e['meta-type'] === 'event' && wantEvents.includes(e.name as string))) {
      add(e.name as string, 4);
    }
  }
  // Builtins and the enums the tests probe, whatever their depth.
  for (const e of schema) if (e['meta-type'] === 'builtin') keepNames.add(e.name as string);
  return schema.filter((e) => keepNames.has(e.name as string));
}

async function main(): Promise<void> {
  await mkdir(outDir, { recursive: true });

  // 1. A session: negotiation, plain queries, errors, events from stop/cont.
  const basic = await withQemu(async (s) => {
    await s.call('neg', 'qmp_capabilities');
    await s.call('1', 'query-status');
    await s.call('2', 'query-version');
    await s.call('3', 'no-such-command');
    await s.call('4', 'query-block-jobs');
    await s.call('5', 'blockdev-del', { 'node-name': 'nope' });
    await s.call('6', 'migrate-set-parameters', { 'downtime-limit': 'soon' });
    await s.call('7', 'stop');
    await s.until((m) => m.event === 'STOP', 'STOP event');
    await s.call('8', 'query-status');
    await s.call('9', 'cont');
    await s.until((m) => m.event === 'RESUME', 'RESUME event');
    await s.call('10', 'query-migrate');
    await s.call('11', 'query-migrate-capabilities');
    await s.call('12', 'query-migrate-parameters');
    await s.call('13', 'query-jobs');
    await s.call('14', 'query-named-block-nodes', { flat: true });
    await s.call('15', 'query-block');
    await s.call('16', 'query-block-exports');
    return s.lines;
  });
  await writeFile(join(outDir, 'session.jsonl'), jsonl(basic));

  // 2. Commands before negotiation, and a bad negotiation.
  const preneg = await withQemu(async (s) => {
    await s.call('a', 'query-status');
    await s.call('b', 'qmp_capabilities', { enable: ['bogus'] });
    await s.call('c', 'qmp_capabilities', { enable: ['oob'] });
    await s.call('d', 'query-status');
    return s.lines;
  });
  await writeFile(join(outDir, 'negotiation.jsonl'), jsonl(preneg));

  // 3. The schema, full (if small enough) and trimmed.
  const schemaLines = await withQemu(async (s) => {
    await s.call('neg', 'qmp_capabilities');
    await s.call('schema', 'query-qmp-schema');
    await s.call('caps', 'query-migrate-capabilities');
    return s.lines;
  });
  const full = jsonl(schemaLines);
  if (full.length < 1_000_000) await writeFile(join(outDir, 'schema-full.jsonl'), full);
  const trimmed = schemaLines.map((l) => {
    const msg = l.msg as Record<string, unknown>;
    if (l.dir === 'recv' && msg.id === 'schema') return { dir: l.dir, msg: { ...msg, return: trimSchema(msg.return as Array<Record<string, unknown>>) } };
    return l;
  });
  await writeFile(join(outDir, 'schema-trimmed.jsonl'), jsonl(trimmed));
  console.log(`wrote fixtures to ${outDir} (full schema transcript ${full.length} bytes)`);
}

await main();
