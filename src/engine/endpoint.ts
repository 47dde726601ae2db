import type { QmpClient } from '../qmp/index.js';
import type { VmSpec } from '../qemu/spec.js';
import type { QemuBuild } from '../qemu/versions.js';

/**
 * What the engine needs of the host the guest leaves. Everything else goes over the VM's QMP.
 * `LocalSource` does it on this machine; an agent-backed endpoint does it through a host agent.
 */
export interface SourceEndpoint {
  /** A name for logs and plans. */
  readonly name: string;
  /** A QMP session to the running source VM, owned by the caller of connect (who closes it). */
  connect(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QmpClient>;
  /**
   * Bytes the source QEMU has sent to an NBD server at host:port, read from the kernel's socket
   * counters; undefined where this host cannot tell (the engine then reports the jobs' counters).
   */
  nbdBytesSent(peer: { host: string; port: number }): Promise<number | undefined>;
  /** lazy mode: the address the destination reaches this host's NBD server at. */
  readonly exportHost: string;
  /** lazy mode: candidate TCP ports on exportHost for the source's NBD server. */
  candidateExportPorts(): Iterable<number>;
  /** lazy mode: bytes this host's NBD server on `localPort` has sent (hydration on the wire). */
  nbdBytesServed(localPort: number): Promise<number | undefined>;
  /** After a successful migration: make the source QEMU exit (it is paused in postmigrate). */
  retireSource(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void>;
}

/** A destination QEMU started with `-incoming defer` and `-S`. */
export interface IncomingVm {
  readonly pid: number;
  readonly qmp: QmpClient;
  /** Settles when the process has exited, for whatever reason. */
  readonly exited: Promise<unknown>;
  running(): boolean;
  /** SIGKILL by PID, then wait for the exit: used on rollback only. */
  kill(): Promise<void>;
  /** The migration succeeded: the engine lets go, the VM lives on under its host's care. */
  release(): Promise<void>;
}

/** What the engine needs of the host the guest goes to. */
export interface DestinationEndpoint {
  readonly name: string;
  /** Address the source's QEMU connects to, for NBD and the migration stream. */
  readonly migrationHost: string;
  /** The same VM, its disks placed where this host keeps them. */
  targetSpec(spec: VmSpec, migrationId: string): VmSpec;
  /** Bytes free where `targetSpec` puts the disks. */
  freeBytes(spec: VmSpec): Promise<number>;
  /** Problems that make this host unable to take the VM (folder not writable, file exists...). */
  checkTarget(spec: VmSpec): Promise<string[]>;
  /**
   * Creates an empty sparse image; refuses to overwrite. With `backingNbd` (lazy mode): a qcow2
   * overlay whose backing is the source's read-only NBD export of the same disk.
   */
  createDisk(disk: { path: string; format: 'qcow2' | 'raw'; virtualSize: number; backingNbd?: BackingNbd }): Promise<void>;
  removeDisk(path: string): Promise<void>;
  startIncoming(spec: VmSpec, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<IncomingVm>;
  /** Candidate TCP ports on migrationHost, in the order to try them. */
  candidatePorts(): Iterable<number>;
  /** Removes what startIncoming left behind besides disks (run dir, sockets). */
  removeRunDir(spec: VmSpec): Promise<void>;
  /**
   * The QEMU startIncoming would start: version and machine types, for preflight to check the
   * pair (src/qemu/versions.ts). Optional: without it the destination still gets the source's
   * exact machine type, and a QEMU lacking it fails to start (rolled back).
   */
  probeQemu?(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QemuBuild>;
}

/** The source's NBD export a lazy destination reads unhydrated blocks from. */
export interface BackingNbd {
  host: string;
  port: number;
  export: string;
  reconnectDelayS: number;
  /** The export is TLS: the backing uses ferry's client TLS object and checks this name. */
  tlsHostname?: string | undefined;
}

/** The qcow2 backing-file string for a BackingNbd; built here only, never taken from a caller. */
export function backingNbdFilename(b: BackingNbd): string {
  const tls = b.tlsHostname === undefined ? {} : { 'tls-creds': 'ferry-tls-client', 'tls-hostname': b.tlsHostname };
  return `json:${JSON.stringify({ driver: 'nbd', server: { type: 'inet', host: b.host, port: String(b.port) }, export: b.export, 'reconnect-delay': b.reconnectDelayS, ...tls })}`;
}
