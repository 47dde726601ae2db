/**
 * The agent's Prometheus metrics (prom-client, text format on /metrics; server.ts serves them):
 *
 *   ferry_agent_vms{role,state}                    the agent's VM records: role vm or incoming, state
 *   ferry_agent_qmp_errors_total{class}            QMP error replies QEMU sent through the agent's tunnels
 *                                                  (every QMP command of a migration passes one), by QEMU's class
 *   ferry_agent_qmp_refused_total{code}            QMP commands the agent's policy refused (never reached QEMU)
 *   ferry_agent_requests_refused_total{method,code} API requests refused (bad input, not found, not allowed)
 *   ferry_agent_vm_deaths_total                    VMs that exited without being asked to
 *   ferry_agent_stale_calls_refused_total{method}  mutating calls refused for a stale fencing epoch:
 *                                                  an RPC method, qmp:<command>, or qmp-tunnel
 *
 * The last has no series until a scheduler replica's stale call is refused.
 * Aggregates only: no VM name, no principal, so any API token may read them.
 */
import { Counter, Gauge, Registry } from 'prom-client';
import { z } from 'zod';
import { renderWithProcess } from '../host/process-metrics.js';

export interface VmRecordView {
  role: string;
  state: string;
}

/** What the tunnel tells the metrics: an error reply from QEMU, a command the policy refused. */
export interface QmpObserver {
  qmpError(errorClass: string): void;
  qmpRefused(code: string): void;
}

const qmpErrorReply = z.object({ error: z.object({ class: z.string().max(64) }) });

export class AgentMetrics implements QmpObserver {
  readonly registry = new Registry();
  readonly #qmpErrors: Counter<'class'>;
  readonly #qmpRefused: Counter<'code'>;
  readonly #refused: Counter<'method' | 'code'>;
  readonly #deaths: Counter;
  readonly #stale: Counter<'method'>;

  constructor(records: () => readonly VmRecordView[]) {
    const registers = [this.registry];
    new Gauge({
      name: 'ferry_agent_vms',
      help: "The agent's VMs by role (vm: a guest of this host; incoming: a migration's destination) and state",
      labelNames: ['role', 'state'],
      registers,
      collect() {
        this.reset();
        for (const role of ['vm', 'incoming']) this.set({ role, state: 'running' }, 0);
        for (const r of records()) this.inc({ role: r.role, state: r.state });
      },
    });
    this.#qmpErrors = new Counter({ name: 'ferry_agent_qmp_errors_total', help: "QMP error replies QEMU sent through the agent's tunnels, by QEMU's error class", labelNames: ['class'], registers });
    this.#qmpRefused = new Counter({ name: 'ferry_agent_qmp_refused_total', help: "QMP commands the agent's policy refused; they never reached QEMU", labelNames: ['code'], registers });
    this.#refused = new Counter({ name: 'ferry_agent_requests_refused_total', help: 'API requests the agent refused, by method and error code', labelNames: ['method', 'code'], registers });
    this.#deaths = new Counter({ name: 'ferry_agent_vm_deaths_total', help: 'VMs that exited without being asked to', registers });
    this.#stale = new Counter({ name: 'ferry_agent_stale_calls_refused_total', help: 'Mutating calls refused because they carried a fencing epoch older than the highest seen for the VM', labelNames: ['method'], registers });
  }

  qmpError(errorClass: string): void {
    this.#qmpErrors.inc({ class: errorClass });
  }

  qmpRefused(code: string): void {
    this.#qmpRefused.inc({ code });
  }

  /** One line QEMU sent: counted if it is an error reply. */
  qemuLine(line: string): void {
    if (!line.includes('"error"')) return;
    let raw: unknown;
    try {
      raw = JSON.parse(line);
    } catch {
      return;
    }
    const reply = qmpErrorReply.safeParse(raw);
    if (reply.success) this.qmpError(reply.data.error.class);
  }

  requestRefused(method: string, code: string): void {
    this.#refused.inc({ method, code });
  }

  vmDied(): void {
    this.#deaths.inc();
  }

  /** For fencing: a mutating call whose epoch is older than the VM's highest seen. */
  recordStaleCallRefused(method: string): void {
    this.#stale.inc({ method });
  }

  async render(): Promise<{ contentType: string; body: string }> {
    return renderWithProcess(this.registry, 'ferry_agent_');
  }
}

/**
 * The metric label of a refused stale call, from what fencing names: an RPC method as it is,
 * `qmp:<command>` for a command in the tunnel (QMP names only, so a caller cannot grow the
 * label set with arbitrary strings), `qmp-tunnel` for the tunnel's upgrade.
 */
export function staleCallLabel(what: string): string {
  if (what === 'a QMP tunnel') return 'qmp-tunnel';
  const qmp = /^QMP (.*)$/.exec(what);
  if (qmp) return /^[a-z][a-z0-9-]{0,63}$/.test(qmp[1]!) ? `qmp:${qmp[1]}` : 'qmp:other';
  return what;
}
