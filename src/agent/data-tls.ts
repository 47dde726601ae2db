/**
 * The agent's side of TLS on the data path (docs/migration.md): its mode, its certificate, and
 * which of its QEMUs hold ferry's TLS objects right now. The agent sets a QEMU's TLS up itself,
 * through its own monitor (a source) or on the command line (a destination), so in `required` its
 * QMP policy can refuse every plain stream whatever a caller asks.
 */
import { join } from 'node:path';
import { beginDataTls, certIdentity, certNames, endDataTls, writeCredentialDirs, type HostTlsMaterial } from '../host/data-tls.js';
import { loadTls, type TlsFiles } from '../host/tls.js';
import type { LaunchTlsObjects } from '../qemu/argv.js';
import type { QmpClient } from '../qmp/index.js';
import type { VmSpec } from '../qemu/spec.js';
import type { AgentConfig } from './config.js';
import { AgentError } from './errors.js';

export type DataTlsMode = 'required' | 'preferred' | 'off';

export class AgentDataTls {
  readonly mode: DataTlsMode;
  readonly #material: HostTlsMaterial | undefined;
  readonly #active = new Set<string>();

  private constructor(mode: DataTlsMode, material: HostTlsMaterial | undefined) {
    this.mode = mode;
    this.#material = material;
  }

  /** Its own files, or the API's; required whenever there are files, unless the config says otherwise. */
  static async load(config: Pick<AgentConfig, 'dataTls' | 'tls'>): Promise<AgentDataTls> {
    const d = config.dataTls;
    const own: TlsFiles | undefined = d?.cert && d.key && d.ca ? { cert: d.cert, key: d.key, ca: d.ca } : undefined;
    const files = own ?? config.tls;
    const mode = d?.mode ?? (files ? 'required' : 'off');
    if (mode !== 'off' && !files) throw new AgentError('AGENT_CONFIG', `dataTls.mode is ${mode} but there is no certificate: give dataTls.cert/key/ca or tls`, { userError: true });
    return new AgentDataTls(mode, mode !== 'off' && files ? await loadTls(files) : undefined);
  }

  /** What host.info says of it. */
  info(): { mode: DataTlsMode; identity: string | null; names: string[] } {
    const m = this.#material;
    return { mode: this.mode, identity: m ? certIdentity(m.cert) : null, names: m ? certNames(m.cert) : [] };
  }

  isActive(vmId: string): boolean {
    return this.#active.has(vmId);
  }

  /** A destination's launch objects for `peerIdentity`; its credentials written into the run dir. */
  async launchObjects(spec: VmSpec, peerIdentity: string): Promise<LaunchTlsObjects> {
    return { ...(await writeCredentialDirs(join(spec.runDir, 'tls'), this.#need())), peerIdentity };
  }

  markActive(vmId: string): void {
    this.#active.add(vmId);
  }

  /** A running source: objects and the stream's parameters, through the agent's own monitor. */
  async beginSource(vmId: string, spec: VmSpec, monitor: QmpClient, peer: { peerIdentity: string; peerHostname: string }): Promise<void> {
    const material = this.#need();
    // Marked first: a lost reply still leaves endDataTls something to undo.
    this.#active.add(vmId);
    await beginDataTls(monitor, { dir: join(spec.runDir, 'tls'), material, role: 'source', ...peer, timeoutMs: 10_000 });
  }

  async end(vmId: string, spec: VmSpec, monitor: QmpClient | undefined): Promise<void> {
    await endDataTls(monitor, { dir: join(spec.runDir, 'tls'), timeoutMs: 10_000 });
    this.#active.delete(vmId);
  }

  /** This host's certificate, key and CA, for the QEMUs that replicate a standby (src/agent/replicas.ts). */
  material(): HostTlsMaterial {
    return this.#need();
  }

  #need(): HostTlsMaterial {
    if (!this.#material) throw new AgentError('DATA_TLS_OFF', 'this agent has no data-path TLS (dataTls mode off)', { userError: true });
    return this.#material;
  }
}
