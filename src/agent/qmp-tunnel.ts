import { connect, type Socket } from 'node:net';
import type { WebSocket } from 'ws';
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
]);

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
        const command = typeof m.execute === 'string' ? m.execute : typeof m['exec-oob'] === 'string' ? m['exec-oob'] : undefined;
        if (command === undefined || !allow.has(command)) {
          log.warn({ command }, 'QMP command refused by the allowlist');
          const reply: Record<string, unknown> = {
            error: { class: 'GenericError', desc: `the agent does not allow '${command ?? '(none)'}' on this VM` },
          };
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
