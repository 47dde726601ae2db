import { connect, type Socket } from 'node:net';
import type { WebSocket } from 'ws';
import { z } from 'zod';
import type { Logger } from '../log.js';
import { LineDecoder } from '../qmp/framing.js';

/**
 * What a remote caller may ask of a destination QEMU through the agent: exactly what the
 * migration engine sends to one. Anything else (human-monitor-command, device_add, quit...) is
 * answered by the agent with a QMP error and never reaches QEMU.
 */
/** Both sides: the session itself, and what the engine reads before it acts. */
const COMMON = [
  'qmp_capabilities',
  'query-qmp-schema',
  'query-migrate-capabilities',
  'query-migrate-parameters',
  'query-migrate',
  'query-status',
  'query-named-block-nodes',
];

export const DESTINATION_QMP_ALLOWLIST: ReadonlySet<string> = new Set([
  ...COMMON,
  'query-block-exports',
  'query-version',
  'nbd-server-start',
  'nbd-server-stop',
  'block-export-add',
  'block-export-del',
  'migrate-set-capabilities',
  'migrate-set-parameters',
  'migrate-incoming',
  'cont',
  // lazy mode: the background hydration of the overlays
  'block-stream',
  'block-job-set-speed',
  'block-job-cancel',
  'query-block-jobs',
  'query-jobs',
  'job-finalize',
  'job-dismiss',
]);

/** What a remote caller may ask of a source QEMU: the engine's side of a migration, and quit. */
export const SOURCE_QMP_ALLOWLIST: ReadonlySet<string> = new Set([
  ...COMMON,
  'query-block-jobs',
  'query-jobs',
  'query-memory-size-summary',
  'query-version',
  // preflight: the machine type the source runs, to start the destination with exactly it
  'query-machines',
  'qom-get',
  'blockdev-add',
  'blockdev-del',
  'blockdev-mirror',
  'block-job-cancel',
  'job-dismiss',
  'migrate-set-capabilities',
  'migrate-set-parameters',
  'migrate',
  'migrate_cancel',
  'migrate-continue',
  'cont',
  'quit',
  // lazy mode: the source serves its disks read-only until the destination has them all
  'nbd-server-start',
  'nbd-server-stop',
  'block-export-add',
  'block-export-del',
  'query-block-exports',
  // lazy mode on QEMU >= 10.0: the source's nodes active again after the switchover, for the export
  'blockdev-set-active',
]);

/**
 * Commands allowed only with exactly these arguments: qom-get reads any QOM property (a secret
 * object's data among them), and ferry needs only the machine's type.
 */
const EXACT_ARGUMENTS: Readonly<Record<string, Readonly<Record<string, string>>>> = {
  'qom-get': { path: '/machine', property: 'type' },
};

/** Why the tunnel refuses a parsed QMP message, or undefined when it may pass to QEMU. */
export function tunnelRefusal(allow: ReadonlySet<string>, m: Record<string, unknown>): string | undefined {
  const command = typeof m.execute === 'string' ? m.execute : typeof m['exec-oob'] === 'string' ? m['exec-oob'] : undefined;
  if (command === undefined || !allow.has(command)) return `the agent does not allow '${command ?? '(none)'}' on this VM`;
  const exact = EXACT_ARGUMENTS[command];
  if (exact) {
    const args = z.record(z.string(), z.unknown()).safeParse(m.arguments ?? {});
    const same = args.success && Object.keys(args.data).length === Object.keys(exact).length && Object.entries(exact).every(([k, v]) => args.data[k] === v);
    if (!same) return `the agent allows '${command}' on this VM only with the arguments ${JSON.stringify(exact)}`;
  }
  return undefined;
}

/**
 * Joins a WebSocket to a VM's free QMP monitor: QEMU's lines go out as they are; the caller's
 * lines are parsed, and a command outside the allowlist is refused in QMP's own error format.
 */
export function tunnelQmp(ws: WebSocket, qmpSocketPath: string, log: Logger, allow: ReadonlySet<string> = DESTINATION_QMP_ALLOWLIST): void {
  const qemu: Socket = connect(qmpSocketPath);
  const decoder = new LineDecoder({ maxLineBytes: 1024 * 1024 });
  const close = (): void => {
    qemu.destroy();
    if (ws.readyState === ws.OPEN || ws.readyState === ws.CONNECTING) ws.close();
  };
  qemu.on('data', (b: Buffer) => ws.send(b));
  qemu.on('error', (err) => {
    log.warn({ err: err.message }, 'QMP tunnel: QEMU side failed');
    close();
  });
  qemu.on('close', close);
  ws.on('close', close);
  ws.on('error', close);
  ws.on('message', (data: Buffer | ArrayBuffer | Buffer[]) => {
    const chunk = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
    try {
      decoder.push(chunk, (line) => {
        let msg: unknown;
        try {
          msg = JSON.parse(line);
        } catch {
          ws.send(`${JSON.stringify({ error: { class: 'GenericError', desc: 'the agent could not parse this QMP message as JSON' } })}\n`);
          return;
        }
        const m = (typeof msg === 'object' && msg !== null ? msg : {}) as Record<string, unknown>;
        const refused = tunnelRefusal(allow, m);
        if (refused !== undefined) {
          log.warn({ command: m.execute ?? m['exec-oob'] }, 'QMP command refused by the allowlist');
          const reply: Record<string, unknown> = { error: { class: 'GenericError', desc: refused } };
          if ('id' in m) reply.id = m.id;
          ws.send(`${JSON.stringify(reply)}\n`);
          return;
        }
        qemu.write(`${line}\n`);
      });
    } catch {
      close();
    }
  });
}
