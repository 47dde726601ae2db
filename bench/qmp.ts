/**
 * npm run bench:qmp — round trips per second of `query-status` on a real QEMU (-machine none):
 * QmpClient one at a time and pipelined (32 in flight), beside a raw-socket baseline (a plain
 * net.Socket writing the same JSON lines and counting reply lines) in the same run. Rounds
 * alternate so drift on a noisy machine hits every contender alike; the median of the rounds is
 * reported. Goal: pipelined QmpClient >= 80% of raw pipelined.
 *
 * Prints one JSON document on stdout, then a table on stderr.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QmpClient } from '../src/qmp/index.js';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 2);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const DEPTH = 32;

/**
 * Two QMP monitors: QEMU serves one client per QMP socket (a second one is accepted by the kernel
 * but gets no greeting until the first leaves), so the client and the raw baseline each get one.
 */
async function startQemu(dir: string): Promise<{ proc: ChildProcess; path: string; rawPath: string }> {
  const path = join(dir, 'qmp.sock');
  const rawPath = join(dir, 'qmp-raw.sock');
  const proc = spawn(
    'qemu-system-x86_64',
    ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${path},server=on,wait=off`, '-qmp', `unix:${rawPath},server=on,wait=off`],
    { stdio: 'ignore' },
  );
  const deadline = Date.now() + 10_000;
  while (!existsSync(path) || !existsSync(rawPath)) {
    if (proc.exitCode !== null || Date.now() > deadline) throw new Error('QEMU did not create its QMP socket');
    await new Promise((r) => setTimeout(r, 20));
  }
  return { proc, path, rawPath };
}

/** Runs `depth` workers issuing calls back to back for `seconds`; returns calls per second. */
async function clientRate(qmp: QmpClient, depth: number, seconds: number): Promise<number> {
  const end = performance.now() + seconds * 1000;
  let n = 0;
  const worker = async (): Promise<void> => {
    while (performance.now() < end) {
      await qmp.execute('query-status');
      n++;
    }
  };
  const started = performance.now();
  await Promise.all(Array.from({ length: depth }, worker));
  return n / ((performance.now() - started) / 1000);
}

/** The baseline: raw lines on a socket, replies counted by newline, `depth` in flight. */
async function rawRate(path: string, depth: number, seconds: number): Promise<number> {
  const sock: Socket = await new Promise((resolve, reject) => {
    const s = connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
  try {
    let lines = 0;
    let waiter: (() => void) | undefined;
    sock.on('data', (chunk: Buffer) => {
      let i = -1;
      while ((i = chunk.indexOf(10, i + 1)) >= 0) lines++;
      waiter?.();
    });
    const until = async (count: number): Promise<void> => {
      while (lines < count) await new Promise<void>((r) => (waiter = r));
    };
    await until(1); // greeting
    sock.write('{"execute":"qmp_capabilities","id":0}\n');
    await until(2);
    const base = lines;
    let sent = 0;
    let id = 0;
    const send = (): void => {
      sock.write(`{"execute":"query-status","id":${++id}}\n`);
      sent++;
    };
    const end = performance.now() + seconds * 1000;
    const started = performance.now();
    for (let i = 0; i < depth; i++) send();
    while (performance.now() < end) {
      const done = lines - base;
      // Keep `depth` in flight: top up as replies come back.
      while (sent - done < depth) send();
      await new Promise<void>((r) => (waiter = r));
    }
    await until(base + sent);
    return sent / ((performance.now() - started) / 1000);
  } finally {
    sock.destroy();
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-bench-qmp-'));
  const { proc, path, rawPath } = await startQemu(dir);
  try {
    const qmp = await QmpClient.connect({ path }, { timeoutMs: 5_000 });
    await clientRate(qmp, DEPTH, 0.3); // warm up the JIT
    await rawRate(rawPath, DEPTH, 0.3);
    const r = { clientSerial: [] as number[], clientPipelined: [] as number[], rawSerial: [] as number[], rawPipelined: [] as number[] };
    for (let round = 0; round < ROUNDS; round++) {
      r.rawPipelined.push(await rawRate(rawPath, DEPTH, SECONDS));
      r.clientPipelined.push(await clientRate(qmp, DEPTH, SECONDS));
      r.rawSerial.push(await rawRate(rawPath, 1, SECONDS));
      r.clientSerial.push(await clientRate(qmp, 1, SECONDS));
    }
    await qmp.close();
    const m = {
      clientSerial: median(r.clientSerial),
      clientPipelined: median(r.clientPipelined),
      rawSerial: median(r.rawSerial),
      rawPipelined: median(r.rawPipelined),
    };
    const result = {
      bench: 'qmp',
      qemu: qmp.greeting.version.qemu,
      secondsPerRun: SECONDS,
      rounds: ROUNDS,
      depth: DEPTH,
      roundTripsPerSecond: m,
      samples: r,
      ratioPipelinedToRaw: m.clientPipelined / m.rawPipelined,
      ratioSerialToRaw: m.clientSerial / m.rawSerial,
    };
    process.stdout.write(JSON.stringify(result) + '\n');
    const row = (name: string, client: number, raw: number): string =>
      `${name.padEnd(26)}${client.toFixed(0).padStart(12)}${raw.toFixed(0).padStart(12)}${((client / raw) * 100).toFixed(1).padStart(9)}%`;
    process.stderr.write(
      [
        `QMP query-status round trips/s (median of ${ROUNDS} rounds of ${SECONDS}s, QEMU ${qmp.greeting.version.qemu.major}.${qmp.greeting.version.qemu.minor})`,
        `${''.padEnd(26)}${'QmpClient'.padStart(12)}${'raw socket'.padStart(12)}${'ratio'.padStart(10)}`,
        row('one at a time', m.clientSerial, m.rawSerial),
        row(`pipelined (${DEPTH} in flight)`, m.clientPipelined, m.rawPipelined),
        '',
      ].join('\n'),
    );
  } finally {
    if (proc.pid !== undefined && proc.exitCode === null) {
      const exited = new Promise((r) => proc.once('exit', r));
      process.kill(proc.pid, 'SIGKILL');
      await exited;
    }
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
