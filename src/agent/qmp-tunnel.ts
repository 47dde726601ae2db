import { connect, type Socket } from 'node:net';
import type { WebSocket } from 'ws';
import type { Logger } from '../log.js';
import { LineDecoder } from '../qmp/framing.js';
import { QmpPolicy, type QmpPolicyContext } from './qmp-policy.js';

export type { QmpPolicyContext } from './qmp-policy.js';

/**
 * Joins a WebSocket to a VM's free QMP monitor. QEMU's lines go out as they are; each of the
 * caller's lines is judged by the VM's QmpPolicy (qmp-policy.ts): what passes reaches QEMU
 * re-serialised from the checked value, what does not is answered in QMP's own error format
 * (desc starts with the stable code, QMP_REFUSED or QMP_BAD_MESSAGE), logged with the principal,
 * and never reaches QEMU.
 */
export function tunnelQmp(ws: WebSocket, qmpSocketPath: string, policy: QmpPolicy | QmpPolicyContext, log: Logger, opts: { onForwarded?: (command: string | undefined) => void } = {}): void {
  const judge = policy instanceof QmpPolicy ? policy : new QmpPolicy(policy);
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
        if (line.trim() === '') return;
        const verdict = judge.judge(line);
        if (verdict.ok) {
          qemu.write(`${verdict.line}\n`);
          opts.onForwarded?.(verdict.command);
          return;
        }
        log.warn({ command: verdict.command, code: verdict.code, reason: verdict.reason }, 'QMP message refused by the policy');
        const reply = { error: { class: 'GenericError', desc: `${verdict.code}: ${verdict.reason}` }, ...(verdict.id !== undefined ? { id: verdict.id } : {}) };
        ws.send(`${JSON.stringify(reply)}\n`);
      });
    } catch {
      close();
    }
  });
}
