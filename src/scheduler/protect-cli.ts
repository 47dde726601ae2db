/**
 * The standby-replica commands of the ferry CLI (issue 12):
 *   ferry protect VM --standby HOST [--interval 30s]   ferry protect status
 *   ferry unprotect VM                                  ferry recover VM --from-replica [--source-fenced]
 */
import { FerryError } from '../errors.js';
import type { SchedulerReply } from './client.js';
import type { ProtectionStatusRow } from './protection-protocol.js';

export const PROTECT_USAGE = `  protect VM --standby HOST [--interval 30s]
                        replicate VM's disks to HOST continuously (a sync per interval)
  protect status        per protected VM: last consistent sync, its age (the RPO now), bytes, duration, state
  unprotect VM          stop replicating VM and remove its replica
  recover VM --from-replica [--source-fenced]
                        boot VM on its standby from the last consistent sync (refused while its
                        source runs it; --source-fenced: the source host is unreachable AND off)
`;

type Call = <M extends 'protect' | 'unprotect' | 'protect-status' | 'recover'>(method: M, params?: Record<string, unknown>) => Promise<SchedulerReply<M>>;

/** "30s", "500ms", "2m" or plain milliseconds. */
export function parseInterval(text: string): number {
  const m = /^(\d+)(ms|s|m)?$/.exec(text.trim());
  if (!m) throw new FerryError('USAGE', `--interval: '${text}' is not a duration (e.g. 30s, 500ms, 2m)`, { userError: true });
  const n = Number(m[1]);
  const ms = m[2] === 'm' ? n * 60_000 : m[2] === 's' ? n * 1000 : m[2] === 'ms' ? n : n;
  if (ms < 1000) throw new FerryError('USAGE', `--interval: at least 1s, got '${text}'`, { userError: true });
  return ms;
}

export async function protectCommand(
  command: 'protect' | 'unprotect' | 'recover',
  rest: string[],
  values: { standby?: string | undefined; interval?: string | undefined; 'from-replica'?: boolean | undefined; 'source-fenced'?: boolean | undefined },
  call: Call,
  print: (obj: unknown, human: () => string) => void,
): Promise<void> {
  const one = (what: string): string => {
    if (rest.length !== 1) throw new FerryError('USAGE', `ferry ${command}: expected ${what}`, { userError: true });
    return rest[0]!;
  };
  if (command === 'protect' && rest[0] === 'status' && rest.length === 1) {
    const rows = await call('protect-status');
    print(rows, () => statusTable(rows));
    return;
  }
  if (command === 'protect') {
    const vm = one('one VM name (or status)');
    if (!values.standby) throw new FerryError('USAGE', 'ferry protect: --standby HOST is required', { userError: true });
    const row = await call('protect', { vm, standby: values.standby, ...(values.interval ? { intervalMs: parseInterval(values.interval) } : {}) });
    print(row, () => `protecting ${row.vm}: ${row.source} -> ${row.standby}, a sync every ${row.intervalMs / 1000} s`);
    return;
  }
  if (command === 'unprotect') {
    const r = await call('unprotect', { vm: one('one VM name') });
    print(r, () => `${r.vm}: no longer protected, its replica removed`);
    return;
  }
  const vm = one('one VM name');
  if (!values['from-replica']) throw new FerryError('USAGE', 'ferry recover: --from-replica is required (the only recovery there is)', { userError: true });
  const r = await call('recover', { vm, sourceFenced: values['source-fenced'] ?? false });
  print(r, () => `${r.vm} runs on ${r.standby} from sync ${r.seq ?? '?'} (${r.pointAt ? new Date(r.pointAt).toISOString() : '?'}); data-loss window (RPO at failure): ${r.rpoMs === null ? '?' : `${(r.rpoMs / 1000).toFixed(1)} s`}`);
}

function statusTable(rows: ProtectionStatusRow[]): string {
  if (rows.length === 0) return 'no VM is protected';
  const head = ['VM', 'SOURCE', 'STANDBY', 'STATE', 'DATA', 'LAST CONSISTENT', 'RPO NOW', 'BYTES', 'DURATION', 'SYNCS', 'FAILED'];
  const body = rows.map((r) => [
    r.vm,
    r.source,
    r.standby,
    r.state,
    r.dataPath === 'tls' ? 'tls' : r.dataPath ? 'plain' : '-',
    r.consistentAt === null ? '-' : new Date(r.consistentAt).toISOString(),
    r.rpoMs === null ? '-' : `${(r.rpoMs / 1000).toFixed(1)} s`,
    r.lastBytes === null ? '-' : `${(r.lastBytes / 2 ** 20).toFixed(1)} MiB`,
    r.lastDurationMs === null ? '-' : `${r.lastDurationMs} ms`,
    String(r.syncs),
    String(r.failedSyncs) + (r.lastError ? ` (${r.lastError})` : ''),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((r) => r[i]!.length)));
  return [head, ...body].map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}
