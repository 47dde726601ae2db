/**
 * ferry: the operator's CLI for ferry-scheduler.
 *   ferry hosts | vms | queue [--all] | migrate VM [--to HOST] | drain HOST | cancel ID
 *   ferry show ID | watch
 * --scheduler URL (default $FERRY_SCHEDULER or ws://127.0.0.1:7430); token from
 * FERRY_SCHEDULER_TOKEN or --token-file; --json prints the raw answer.
 */
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { errorText, FerryError } from '../errors.js';
// Type only: the client (ws, zod) loads when a command needs it, so `ferry --help` starts at once.
import type { SchedulerClient, SchedulerReply } from './client.js';
import type { SchedulerMethod } from './protocol.js';
import type { MigrationJob } from './types.js';
import { PROTECT_USAGE, protectCommand } from './protect-cli.js';

export const FERRY_USAGE = `usage: ferry [--scheduler URL] [--token-file FILE] [--json] COMMAND
  hosts                 hosts, free memory and disk, migrations in and out
  vms                   running VMs and where they are
  queue [--all]         active migrations (--all: recent finished ones too)
  migrate VM [--to H] [--mode precopy|lazy]
                        move VM to host H, or wherever it fits best
  drain HOST [--mode precopy|lazy]
                        move every VM off HOST
  cancel ID             cancel a queued or running migration
  show ID               a migration and its journal
  watch                 live changes, phases and progress of every migration (Ctrl-C to stop)
${PROTECT_USAGE}`;

interface Io {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
}

export async function main(argv: string[], io: Io = { stdout: process.stdout, stderr: process.stderr }, env: NodeJS.ProcessEnv = process.env): Promise<number> {
  let values;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: { scheduler: { type: 'string' }, 'token-file': { type: 'string' }, json: { type: 'boolean' }, to: { type: 'string' }, mode: { type: 'string' }, all: { type: 'boolean' }, help: { type: 'boolean', short: 'h' },
        standby: { type: 'string' }, interval: { type: 'string' }, 'from-replica': { type: 'boolean' }, 'source-fenced': { type: 'boolean' } },
    }));
  } catch (err) {
    io.stderr.write(`ferry: ${errorText(err).split('\n')[0]}\n${FERRY_USAGE}`);
    return 2;
  }
  if (values.help) {
    io.stdout.write(FERRY_USAGE);
    return 0;
  }
  const [command, ...rest] = positionals;
  const need = (n: number, what: string): string[] => {
    if (rest.length !== n) throw new FerryError('USAGE', `ferry ${command}: expected ${what}`, { userError: true });
    return rest;
  };
  let client: SchedulerClient | undefined;
  try {
    const call = async <M extends SchedulerMethod>(method: M, params: Record<string, unknown> = {}): Promise<SchedulerReply<M>> => {
      client ??= await (await import('./client.js')).SchedulerClient.connect(values.scheduler ?? env.FERRY_SCHEDULER ?? 'ws://127.0.0.1:7430', await token(values['token-file'], env));
      return client.call(method, params);
    };
    const print = (obj: unknown, human: () => string): void => void io.stdout.write(values.json ? `${JSON.stringify(obj)}\n` : `${human()}\n`);
    switch (command) {
      case 'hosts': {
        need(0, 'no arguments');
        const hosts = await call('hosts');
        print(hosts, () => table(['HOST', 'UP', 'FREE MEM', 'FREE DISK', 'VMS', 'OUT', 'IN'], hosts.map((h) => [h.name, h.reachable ? 'yes' : 'NO', h.freeMemoryMiB === null ? '-' : `${h.freeMemoryMiB} MiB`, h.freeDiskBytes === null ? '-' : gib(h.freeDiskBytes), String(h.vms), String(h.outgoing), String(h.incoming)])));
        break;
      }
      case 'vms': {
        need(0, 'no arguments');
        const vms = await call('vms');
        print(vms, () => table(['VM', 'HOST', 'MEMORY', 'DISK'], vms.map((v) => [v.name, v.host, `${v.memoryMiB} MiB`, gib(v.diskBytes)])));
        break;
      }
      case 'queue': {
        need(0, 'no arguments');
        const jobs = await call('queue', { all: values.all ?? false });
        print(jobs, () => jobTable(jobs));
        break;
      }
      case 'migrate': {
        const [vm] = need(1, 'one VM name');
        const r = await call('migrate', { vm, ...(values.to ? { to: values.to } : {}), ...(values.mode ? { mode: values.mode } : {}) });
        print(r, () => `${r.existing ? 'already moving' : 'queued'}: ${r.job.id} ${r.job.vm} ${r.job.from} -> ${r.job.to} (${r.job.state})`);
        break;
      }
      case 'drain': {
        const [host] = need(1, 'one host name');
        const r = await call('drain', { host, ...(values.mode ? { mode: values.mode } : {}) });
        print(r, () => (r.length === 0 ? `${host} has no running VMs` : jobTable(r.map((x) => x.job))));
        break;
      }
      case 'cancel': {
        const [id] = need(1, 'one migration id');
        const job = await call('cancel', { id });
        print(job, () => `${job.id}: ${job.state === 'cancelled' ? 'cancelled' : 'cancelling (the engine rolls back; the guest stays on the source)'}`);
        break;
      }
      case 'show': {
        const [id] = need(1, 'one migration id');
        const job = await call('get', { id });
        const journal = await call('journal', { id });
        print({ job, journal }, () => `${jobTable([job])}\n${journal.map((e) => `  ${new Date(e.at).toISOString()}  ${e.state}${e.phase ? ` [${e.phase}]` : ''}${e.detail ? `  ${e.detail}` : ''}`).join('\n')}`);
        break;
      }
      case 'watch': {
        need(0, 'no arguments');
        await call('hosts'); // connects, and proves the token before the stream starts
        await client!.watch((e) => {
          if (values.json) return void io.stdout.write(`${JSON.stringify(e)}\n`);
          if (e.type === 'job') {
            const j = e.job;
            io.stdout.write(`${new Date().toISOString()}  ${j.id} ${j.vm} ${j.from} -> ${j.to}: ${j.state}${j.error ? ` (${j.error})` : ''}\n`);
          } else if (e.type === 'phase') io.stdout.write(`${new Date().toISOString()}  ${e.id} ${e.vm}: ${e.phase}\n`);
          else if (e.type === 'finished') {
            const downtime = e.downtimeMs !== undefined ? `, downtime ${e.downtimeMs} ms` : '';
            io.stdout.write(`${new Date().toISOString()}  ${e.id} ${e.vm}: ${e.state} after ${(e.durationMs / 1000).toFixed(1)} s${downtime}\n`);
          } else {
            const pct = e.totalBytes > 0 ? Math.floor((100 * e.doneBytes) / e.totalBytes) : 0;
            const eta = e.etaMs !== null ? `, ETA ${Math.ceil(e.etaMs / 1000)} s` : '';
            io.stdout.write(`${new Date().toISOString()}  ${e.id} ${e.vm}: ${e.phase} ${pct}% of ${mib(e.totalBytes)}, ${mib(e.bytesPerSec)}/s${eta}\n`);
          }
        });
        const stop = new AbortController();
        await new Promise<void>((resolve) => {
          process.once('SIGINT', resolve);
          stop.signal.addEventListener('abort', () => process.off('SIGINT', resolve), { once: true });
          void client!.closed.then(resolve);
        }).finally(() => stop.abort());
        break;
      }
      case 'protect':
      case 'unprotect':
      case 'recover':
        await protectCommand(command, rest, values, call, print);
        break;
      default:
        throw new FerryError('USAGE', command ? `unknown command '${command}'` : 'a command is required', { userError: true });
    }
    return 0;
  } catch (err) {
    const user = err instanceof FerryError && err.userError;
    io.stderr.write(`ferry: ${errorText(err)}\n${err instanceof FerryError && err.code === 'USAGE' ? FERRY_USAGE : ''}`);
    return user ? 2 : 1;
  } finally {
    client?.close();
  }
}

async function token(file: string | undefined, env: NodeJS.ProcessEnv): Promise<string> {
  if (file) {
    const t = (await readFile(file, 'utf8').catch((err: NodeJS.ErrnoException) => {
      throw new FerryError('USAGE', `--token-file: cannot read ${file} (${err.code ?? errorText(err)})`, { userError: true });
    })).trim();
    if (t) return t;
  }
  const t = env.FERRY_SCHEDULER_TOKEN?.trim();
  if (!t) throw new FerryError('USAGE', 'the scheduler needs a token: set FERRY_SCHEDULER_TOKEN or pass --token-file FILE', { userError: true });
  return t;
}

function mib(bytes: number): string {
  return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
}

function gib(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}

function table(head: string[], rows: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  return [head, ...rows].map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

function jobTable(jobs: MigrationJob[]): string {
  return table(
    ['ID', 'VM', 'FROM', 'TO', 'STATE', 'PHASE', 'TRIES', 'ERROR'],
    jobs.map((j) => [j.id, j.vm, j.from, j.to, j.state, j.phase ?? '-', String(j.attempts), j.error ?? '']),
  );
}
