import { clientTls } from '../host/data-tls.js';
import type { QmpClient } from '../qmp/index.js';
import type { VmSpec } from '../qemu/spec.js';
import type { QemuBuild } from '../qemu/versions.js';
import type { DataTlsMode } from './data-tls-plan.js';

/** A host's data-path TLS as it offers it: its mode, certificate identity and the names it is valid for. */
export interface HostDataTls {
  mode: DataTlsMode;
  identity: string | null;
  names: readonly string[];
}

/** The peer a side's TLS admits (authz) and checks the name of (tls-hostname). */
export interface DataTlsPeer {
  peerIdentity: string;
  peerHostname: string;
}

/**
 * Every method that waits on the outside world has a deadline and takes the migration's
 * AbortSignal, except the undo and cleanup steps, which must run to the end once started.
 *
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
  /**
   * Bytes of guest data a disk image holds through its whole chain (what a copy writes: a
   * compressed image counts decompressed); undefined where this host cannot tell, and the engine
   * falls back on QEMU's actual-size.
   */
  dataBytes(disk: { path: string; format: string }, opts: { signal?: AbortSignal }): Promise<number | undefined>;
  /** lazy mode: the address the destination reaches this host's NBD server at. */
  readonly exportHost: string;
  /** lazy mode: candidate TCP ports on exportHost for the source's NBD server. */
  candidateExportPorts(): Iterable<number>;
  /** lazy mode: bytes this host's NBD server on `localPort` has sent (hydration on the wire). */
  nbdBytesServed(localPort: number): Promise<number | undefined>;
  /**
   * After a failure, when the source's QMP session no longer answers: true only with proof that
   * the source QEMU has exited (its socket refuses, its host says it died). False when unsure.
   */
  sourceGone(): Promise<boolean>;
  /**
   * After the source's QMP session broke while its QEMU may live (its agent was restarted): a new
   * session, tried until the deadline. Optional: a local source's session breaks only with its QEMU.
   */
  reconnect?(opts: { timeoutMs: number }): Promise<QmpClient>;
  /** After a successful migration: make the source QEMU exit (it is paused in postmigrate). */
  retireSource(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void>;
  /** Data-path TLS this host offers; absent: none (plain text only). */
  dataTls?(opts: { signal?: AbortSignal }): Promise<HostDataTls>;
  /** Gives the source QEMU ferry's TLS objects for one peer and the stream's TLS parameters. */
  beginDataTls?(qmp: QmpClient, peer: DataTlsPeer, opts: { timeoutMs: number }): Promise<void>;
  /** Undoes beginDataTls; an undo step: idempotent, never cancelled. */
  endDataTls?(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void>;
}

/** A destination QEMU started with `-incoming defer` and `-S`. */
export interface IncomingVm {
  readonly pid: number;
  readonly qmp: QmpClient;
  /** Settles when the process has exited, for whatever reason. */
  readonly exited: Promise<unknown>;
  running(): boolean;
  /**
   * Not running() because its host can no longer be reached (the tunnel to its monitor broke: the
   * agent or the link went), not because its QEMU was seen to exit: it may be alive. Optional: a
   * local destination is never unreachable.
   */
  unreachable?(): boolean;
  /** SIGKILL by PID, then wait for the exit: used on rollback only. */
  kill(): Promise<void>;
  /** The migration succeeded: the engine lets go, the VM lives on under its host's care. */
  release(): Promise<void>;
  /**
   * After it exited on its own: how (exit code or signal) and the last lines it wrote (its log),
   * for the error that reports its death. Optional: a host that cannot tell says nothing.
   */
  exitReason?(): Promise<string | undefined>;
}

/** What the engine needs of the host the guest goes to. */
export interface DestinationEndpoint {
  readonly name: string;
  /** Address the source's QEMU connects to, for NBD and the migration stream. */
  readonly migrationHost: string;
  /** The same VM, its disks placed where this host keeps them. */
  targetSpec(spec: VmSpec, migrationId: string): VmSpec;
  /** Bytes free where `targetSpec` puts the disks. */
  freeBytes(spec: VmSpec, opts?: { signal?: AbortSignal }): Promise<number>;
  /** Problems that make this host unable to take the VM (folder not writable, file exists...). */
  checkTarget(spec: VmSpec, opts?: { signal?: AbortSignal }): Promise<string[]>;
  /**
   * Creates an empty sparse image; refuses to overwrite. With `backingNbd` (lazy mode): a qcow2
   * overlay whose backing is the source's read-only NBD export of the same disk.
   */
  createDisk(disk: { path: string; format: 'qcow2' | 'raw'; virtualSize: number; backingNbd?: BackingNbd }, opts?: { signal?: AbortSignal }): Promise<void>;
  /** An undo step: idempotent (a disk already gone is removed), and never cancelled. */
  removeDisk(path: string): Promise<void>;
  /** With `dataTls`: started with ferry's TLS objects for that peer, the incoming stream's TLS set. */
  startIncoming(spec: VmSpec, opts: { timeoutMs: number; signal?: AbortSignal; dataTls?: DataTlsPeer }): Promise<IncomingVm>;
  /** Data-path TLS this host offers; absent: none (plain text only). */
  dataTls?(opts: { signal?: AbortSignal }): Promise<HostDataTls>;
  /** After the migration: the destination's TLS parameters cleared, objects and credentials gone. */
  endDataTls?(spec: VmSpec, vm: IncomingVm, opts: { timeoutMs: number }): Promise<void>;
  /**
   * Undo of startIncoming when its reply never came: stops the destination QEMU it may have
   * started for `spec` (found by the VM's name), if there is one. Idempotent.
   */
  abandonIncoming(spec: VmSpec): Promise<void>;
  /** Candidate TCP ports on migrationHost, in the order to try them. */
  candidatePorts(): Iterable<number>;
  /**
   * lazy mode: bytes the destination QEMU (by pid) has received from the source's NBD server at
   * `peer`: hydration and the guest's own reads, and nobody else's. Undefined where this host
   * cannot tell (the engine then counts on the source's side, every reader of its export).
   */
  nbdBytesReceived(peer: { host: string; port: number }, pid: number): Promise<number | undefined>;
  /**
   * Removes what startIncoming left behind besides disks (run dir, sockets). `keepLog`: the
   * destination QEMU died on its own, and its log says why: moved out of the run dir first, kept
   * for the operator; resolves to where it went (undefined where this host keeps none).
   */
  removeRunDir(spec: VmSpec, opts?: { keepLog?: boolean }): Promise<string | undefined | void>;
  /**
   * The QEMU startIncoming would start: version and machine types, for preflight to check the
   * pair (src/qemu/versions.ts). Optional: without it the destination still gets the source's
   * exact machine type, and a QEMU lacking it fails to start (rolled back).
   */
  probeQemu?(opts: { timeoutMs: number; signal?: AbortSignal }): Promise<QemuBuild>;
  /**
   * Pre-copy to a QEMU < 8.0 (copy mode auto, issue 11): a relay on this host that listens on TCP
   * at migrationHost (one of candidatePorts) with TCP_NODELAY, and carries each connection to the
   * unix socket `nbdRelaySocketPath(spec.runDir)` where the destination QEMU's NBD server listens
   * (src/engine/convergence/nbd-relay.ts). Optional: without it the mirrors go straight to QEMU's
   * NBD server. close() is an undo step: idempotent, never cancelled.
   */
  startNbdRelay?(spec: VmSpec, opts: { signal?: AbortSignal }): Promise<NbdRelayHandle>;
}

/** A running NBD relay on the destination host (see DestinationEndpoint.startNbdRelay). */
export interface NbdRelayHandle {
  /** The TCP port on migrationHost the source's NBD client connects to. */
  port: number;
  /** The unix socket the relay forwards to: where nbd-server-start must listen. */
  unixPath: string;
  close(): Promise<void>;
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
  const tls = b.tlsHostname === undefined ? {} : clientTls(b.tlsHostname);
  return `json:${JSON.stringify({ driver: 'nbd', server: { type: 'inet', host: b.host, port: String(b.port) }, export: b.export, 'reconnect-delay': b.reconnectDelayS, ...tls })}`;
}
