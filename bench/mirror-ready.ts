/**
 * Time for a disk mirror to reach READY, driven on raw QMP (no ferry engine), per mechanism.
 * The research behind src/engine/convergence (issue 11): a guest writing N records/s (4 KiB,
 * O_DIRECT + fdatasync) on a qcow2 disk holding 64 MiB is mirrored over NBD into a destination
 * QEMU in `-incoming defer` whose disk is the spec's `cache: none` (O_DIRECT).
 *
 *   baseline        the destination's disk O_DIRECT, copy-mode background
 *   buffered        the destination's disk opened without O_DIRECT; after READY, blockdev-reopen
 *                   with cache.direct=on (timed, and whether QEMU allows it then)
 *   nodelay         the destination's NBD server listens on a socket with TCP_NODELAY (accepted
 *                   sockets inherit it on Linux), made by a python3 helper and passed to QEMU by
 *                   `getfd` (SCM_RIGHTS) on the VM's free QMP socket: QEMU 7.2 takes no numeric
 *                   fd in a QMP `addr: {type: 'fd'}` ("File descriptor named '3' has not been
 *                   found"), and Node cannot send descriptors over a unix socket
 *   relay           the destination's NBD server listens on a unix socket; a TCP relay made here
 *                   (Node, setNoDelay on each accepted socket) carries the NBD connection to it
 *   write-blocking  copy-mode write-blocking from the start
 *   change          QEMU >= 8.2: background, then block-job-change to write-blocking after
 *                   --change-after ms or once READY does not come, then wait for actively-synced
 *
 * One source guest per mechanism, one fresh destination per run. The guest's ferry.probe lines
 * (`lat w`: an acked write + fdatasync; `lat r`: a 4 KiB read) are collected over --window ms
 * (5000) from the mirror's start, the mirror running all along, and over as long just before.
 *
 *   npx tsx bench/mirror-ready.ts --mech baseline,buffered --runs 5 [--rate 100] [--timeout 30000]
 *     [--qemu /path/to/qemu-system-x86_64 --data-dir /path/to/share/qemu]
 *
 * Prints one JSON document on stdout, a table on stderr.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { loadGuestImage } from '../src/guest/image.js';
import { parseSerialLine, workloadAppend } from '../src/guest/serial.js';
import { eventIs, type QmpClient } from '../src/qmp/index.js';
import { launchVm, type VmProcess } from '../src/qemu/launcher.js';
import { reapAll } from '../src/qemu/reaper.js';
import { diskNodeName, parseVmSpec, retargetSpec, type VmSpec } from '../src/qemu/spec.js';
import { diskBlockdevs } from '../src/qemu/argv.js';
import { freePort } from '../src/host/ports.js';

const run = promisify(execFile);
type Mech = 'baseline' | 'buffered' | 'nodelay' | 'relay' | 'write-blocking' | 'change';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}
const mechs = arg('mech', 'baseline,buffered,nodelay,write-blocking').split(',') as Mech[];
const runs = Number(arg('runs', '5'));
const rate = Number(arg('rate', '100'));
const timeoutMs = Number(arg('timeout', '30000'));
const changeAfterMs = Number(arg('change-after', '1000'));
const probeMs = Number(arg('probe', '50'));
const windowMs = Number(arg('window', '5000'));
const qemuBinary = arg('qemu', 'qemu-system-x86_64');
const dataDir = arg('data-dir', '');
const extraArgs = dataDir ? ['-L', dataDir] : [];

interface Latency {
  writes: number;
  writeP50Us: number;
  writeP99Us: number;
  writeMaxUs: number;
  reads: number;
  readP50Us: number;
  readP99Us: number;
}
interface RunRow {
  mech: Mech;
  run: number;
  readyMs: number | null;
  syncedMs?: number | null;
  reopen?: { ok: boolean; ms: number; error?: string };
  during: Latency;
  before: Latency;
  error?: string;
}

function pct(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

function latency(vm: VmProcess, from: number, to: number): Latency {
  const w: number[] = [];
  const r: number[] = [];
  for (const l of vm.serial.history()) {
    if (l.at < from || l.at > to) continue;
    const m = parseSerialLine(l.text);
    if (m.kind === 'latency') (m.op === 'w' ? w : r).push(m.us);
  }
  return { writes: w.length, writeP50Us: pct(w, 50), writeP99Us: pct(w, 99), writeMaxUs: w.length ? Math.max(...w) : NaN, reads: r.length, readP50Us: pct(r, 50), readP99Us: pct(r, 99) };
}

const NODELAY_HELPER = `
import json, socket, sys
lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
lsock.bind(('127.0.0.1', 0)); lsock.listen(16)
q = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); q.connect(sys.argv[1]); f = q.makefile('rb')
def cmd(obj, fds=None):
    data = json.dumps(obj).encode()
    if fds: socket.send_fds(q, [data], fds)
    else: q.sendall(data)
    while True:
        r = json.loads(f.readline())
        if 'return' in r or 'error' in r: return r
f.readline(); cmd({'execute': 'qmp_capabilities'})
r1 = cmd({'execute': 'getfd', 'arguments': {'fdname': 'nbdlisten'}}, [lsock.fileno()])
r2 = cmd({'execute': 'nbd-server-start', 'arguments': {'addr': {'type': 'fd', 'data': {'str': 'nbdlisten'}}}})
print(json.dumps({'port': lsock.getsockname()[1], 'getfd': r1, 'start': r2}))
`;

/** A python3 helper: a TCP_NODELAY listening socket handed to QEMU's nbd-server-start via getfd. */
async function nbdServerStartNoDelay(qmpSocket: string): Promise<number> {
  const { stdout } = await run('python3', ['-c', NODELAY_HELPER, qmpSocket]);
  const r = JSON.parse(stdout) as { port: number; getfd: unknown; start: { error?: unknown } };
  if (r.start.error) throw new Error(`nbd-server-start on an fd: ${JSON.stringify(r)}`);
  return r.port;
}

/** TCP on 127.0.0.1 to a unix socket, TCP_NODELAY on every accepted connection. */
async function startRelay(unixPath: string): Promise<{ port: number; close(): void }> {
  const conns = new Set<Socket>();
  const server = createServer((tcp) => {
    tcp.setNoDelay(true);
    const unix = connect(unixPath);
    conns.add(tcp).add(unix);
    tcp.pipe(unix).pipe(tcp);
    const end = (): void => { tcp.destroy(); unix.destroy(); };
    tcp.on('error', end).on('close', end);
    unix.on('error', end).on('close', end);
  });
  await new Promise<void>((res, rej) => server.once('error', rej).listen({ host: '127.0.0.1', port: 0 }, res));
  const a = server.address();
  if (!a || typeof a === 'string') throw new Error('no address');
  return { port: a.port, close: () => { server.close(); for (const c of conns) c.destroy(); } };
}


async function oneRun(mech: Mech, i: number, source: VmProcess, spec: VmSpec, root: string): Promise<RunRow> {
  const dir = join(root, `dest-${mech}-${i}`);
  await mkdir(dir);
  const destSpec = { ...retargetSpec(spec, { dir, runDir: join(dir, 'run') }), extraArgs };
  for (const d of destSpec.disks) await run('qemu-img', ['create', '-q', '-f', d.format, d.path, String(256 << 20)]);
  const dest = await launchVm(destSpec, { incoming: true, qemuBinary, bufferedDisks: mech === 'buffered' });
  const sq = source.qmp;
  const dq = dest.qmp;
  const call = { timeoutMs: 30_000 };
  const job = 'mirror-root';
  const node = 'nbd-root';
  let row: RunRow;
  let relay: { port: number; close(): void } | undefined;
  try {
    let port: number;
    if (mech === 'nodelay') {
      port = await nbdServerStartNoDelay(join(destSpec.runDir, 'qmp.sock'));
    } else if (mech === 'relay') {
      const path = join(destSpec.runDir, 'nbd.sock');
      await dq.executeRaw('nbd-server-start', { addr: { type: 'unix', data: { path } } }, call);
      relay = await startRelay(path);
      port = relay.port;
    } else {
      port = await freePort();
      await dq.executeRaw('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(port) } } }, call);
    }
    await dq.executeRaw('block-export-add', { type: 'nbd', id: 'root', 'node-name': diskNodeName('root'), name: 'root', writable: true }, call);
    await sq.executeRaw('blockdev-add', { driver: 'nbd', 'node-name': node, server: { type: 'inet', host: '127.0.0.1', port: String(port) }, export: 'root' }, call);
    const since = sq.eventCursor();
    const t0 = performance.now();
    await sq.executeRaw(
      'blockdev-mirror',
      { 'job-id': job, device: diskNodeName('root'), target: node, sync: 'top', 'copy-mode': mech === 'write-blocking' ? 'write-blocking' : 'background', 'auto-dismiss': false },
      call,
    );
    let readyMs: number | null = null;
    let syncedMs: number | null | undefined;
    const waitReady = (ms: number): Promise<boolean> =>
      sq.waitForEvent((e) => e.event === 'BLOCK_JOB_READY', { since, timeoutMs: ms, what: 'BLOCK_JOB_READY' }).then(
        () => true,
        () => false,
      );
    if (mech === 'change') {
      const ready = await waitReady(changeAfterMs);
      if (ready) readyMs = performance.now() - t0;
      await sq.executeRaw('block-job-change', { id: job, type: 'mirror', 'copy-mode': 'write-blocking' }, call);
      const deadline = t0 + timeoutMs;
      for (;;) {
        const jobs = (await sq.executeRaw('query-block-jobs', undefined, call)) as { device: string; ready?: boolean; 'actively-synced'?: boolean }[];
        const j = jobs.find((x) => x.device === job);
        if (readyMs === null && j?.ready) readyMs = performance.now() - t0;
        if (j?.['actively-synced']) {
          syncedMs = performance.now() - t0;
          break;
        }
        if (performance.now() > deadline) {
          syncedMs = null;
          break;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      if (readyMs === null && (await waitReady(Math.max(1, t0 + timeoutMs - performance.now())))) readyMs = performance.now() - t0;
    } else if (await waitReady(timeoutMs)) {
      readyMs = performance.now() - t0;
    }
    // The guest's latency over a fixed window from the mirror's start (the mirror keeps running
    // after READY, and write-blocking keeps costing), beside the same length just before it.
    const t1 = t0 + windowMs;
    if (performance.now() < t1) await new Promise((r) => setTimeout(r, t1 - performance.now()));
    row = { mech, run: i, readyMs, ...(syncedMs !== undefined ? { syncedMs } : {}), during: latency(source, t0, t1), before: latency(source, t0 - windowMs, t0) };
    if (mech === 'buffered' && readyMs !== null) {
      // While exported, in -incoming, the mirror READY: QEMU allows the reopen now?
      const d = destSpec.disks[0]!;
      const nodes = diskBlockdevs(d);
      const nodesBack = { ...nodes, file: { ...nodes.file, aio: 'threads' } };
      const r0 = performance.now();
      try {
        await dq.executeRaw('blockdev-reopen', { options: [nodesBack.file, nodesBack.format] }, call);
        row.reopen = { ok: true, ms: performance.now() - r0 };
      } catch (err) {
        row.reopen = { ok: false, ms: performance.now() - r0, error: err instanceof Error ? err.message : String(err) };
      }
    }
    const sinceCancel = sq.eventCursor();
    await sq.executeRaw('block-job-cancel', { device: job, force: readyMs === null }, call);
    await sq.waitForEvent((e) => eventIs(e, 'JOB_STATUS_CHANGE') && e.data.id === job && e.data.status === 'concluded', { since: sinceCancel, timeoutMs: 60_000, what: 'cancel' });
    await sq.executeRaw('job-dismiss', { id: job }, call);
    await sq.executeRaw('blockdev-del', { 'node-name': node }, call);
  } catch (err) {
    row = { mech, run: i, readyMs: null, during: latency(source, 0, 0), before: latency(source, 0, 0), error: err instanceof Error ? err.message : String(err) };
  } finally {
    relay?.close();
    await dest.kill();
    await rm(dir, { recursive: true, force: true });
  }
  return row;
}

async function bootSource(root: string, mech: Mech): Promise<{ vm: VmProcess; spec: VmSpec }> {
  const image = await loadGuestImage();
  const dir = join(root, `src-${mech}`);
  await mkdir(dir);
  const disk = join(dir, 'root.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(256 << 20)]);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 128M 64M', disk]);
  const spec = parseVmSpec({
    name: `src-${mech}`,
    memoryMiB: 256,
    accel: 'tcg',
    disks: [{ id: 'root', path: disk, format: 'qcow2' }],
    boot: { kernel: image.kernel, initrd: image.initrd, append: `console=ttyS0 quiet ${workloadAppend({ ...(rate >= 0 ? { write: { rate } } : {}), tickMs: 20, disks: 1, ...(probeMs > 0 ? { probeMs } : {}) })}` },
    runDir: join(dir, 'run'),
    extraArgs,
  });
  const vm = await launchVm(spec, { timeoutMs: 30_000, qemuBinary });
  await vm.serial.waitForLine((l) => l.text === 'ferry-ready', { timeoutMs: 60_000, what: 'ferry-ready' });
  if (rate >= 0) await vm.serial.waitForLine((l) => { const p = parseSerialLine(l.text); return p.kind === 'ack' && p.seq >= 50; }, { timeoutMs: 30_000, what: 'acks' });
  return { vm, spec };
}

function median(xs: number[]): number {
  return pct(xs, 50);
}

async function main(): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), 'ferry-mirror-ready-'));
  const rows: RunRow[] = [];
  const { stdout: version } = await run(qemuBinary, [...extraArgs, '--version']);
  try {
    for (const mech of mechs) {
      const { vm, spec } = await bootSource(root, mech);
      try {
        for (let i = 0; i < runs; i++) {
          const row = await oneRun(mech, i, vm, spec, root);
          rows.push(row);
          process.stderr.write(`${JSON.stringify(row)}\n`);
        }
      } finally {
        await vm.kill();
      }
    }
  } finally {
    await reapAll();
    await rm(root, { recursive: true, force: true });
  }
  const summary = mechs.map((mech) => {
    const rs = rows.filter((r) => r.mech === mech);
    const ready = rs.map((r) => r.readyMs).filter((x): x is number => x !== null);
    const synced = rs.map((r) => r.syncedMs).filter((x): x is number => typeof x === 'number');
    const w = rs.map((r) => r.during.writeP50Us).filter((x) => !Number.isNaN(x));
    const w99 = rs.map((r) => r.during.writeP99Us).filter((x) => !Number.isNaN(x));
    const b99 = rs.map((r) => r.before.writeP99Us).filter((x) => !Number.isNaN(x));
    return {
      mech,
      runs: rs.length,
      readyIn: ready.length,
      readyMedianMs: Math.round(median(ready)),
      readyMinMs: Math.round(Math.min(...ready)),
      readyMaxMs: Math.round(Math.max(...ready)),
      ...(synced.length ? { syncedMedianMs: Math.round(median(synced)) } : {}),
      writeP50UsDuring: Math.round(median(w)),
      writeP99UsDuring: Math.round(median(w99)),
      writeP99UsBefore: Math.round(median(b99)),
      reopen: rs.flatMap((r) => (r.reopen ? [r.reopen.ok ? `${Math.round(r.reopen.ms)}ms` : `refused: ${r.reopen.error}`] : [])),
    };
  });
  process.stdout.write(`${JSON.stringify({ qemu: version.split('\n')[0], rate, timeoutMs, rows, summary }, null, 2)}\n`);
  for (const s of summary) {
    process.stderr.write(
      `${s.mech.padEnd(15)} READY ${s.readyIn}/${s.runs}  median ${s.readyMedianMs} ms [${s.readyMinMs}..${s.readyMaxMs}]${s.syncedMedianMs !== undefined ? ` synced ${s.syncedMedianMs} ms` : ''}  write p50 ${s.writeP50UsDuring} us p99 ${s.writeP99UsDuring} us (before p99 ${s.writeP99UsBefore} us)${s.reopen.length ? `  reopen ${s.reopen.join(', ')}` : ''}\n`,
    );
  }
}

main().catch(async (err: unknown) => {
  process.stderr.write(`${err instanceof Error ? err.stack : String(err)}\n`);
  await reapAll();
  process.exit(1);
});
