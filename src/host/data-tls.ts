/**
 * TLS on the guest's data path, QEMU's own: each QEMU of a migration holds two `tls-creds-x509`
 * objects made from its host's certificate (the server side verifies its peer's certificate, the
 * client side checks the peer's name) and an `authz-simple` that admits exactly one peer: the
 * other host's certificate name. The NBD server takes `tls-creds` + `tls-authz`, the NBD client
 * nodes `tls-creds` + `tls-hostname`, the migration stream the parameters of the same names.
 *
 * The host's certificate must be usable both ways (extendedKeyUsage serverAuth and clientAuth):
 * in lazy mode each side is server of one stream and client of another. Its files are written
 * into a folder of the QEMU's run dir that only root can read (0700), and removed with it.
 */
import { X509Certificate } from 'node:crypto';
import { execFile } from 'node:child_process';
import { chmod, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { isIP } from 'node:net';
import { promisify } from 'node:util';
import { FerryError } from '../errors.js';
import { z } from 'zod';
import type { QmpCapabilities, QmpClient } from '../qmp/index.js';

const qomListSchema = z.array(z.object({ name: z.string() }));

const run = promisify(execFile);

/** The ids ferry gives its TLS objects in a QEMU; the agent's QMP policy knows them. */
export const DATA_TLS_IDS = { server: 'ferry-tls-server', client: 'ferry-tls-client', authz: 'ferry-tls-authz' } as const;

/** The TLS half of an NBD server's or an incoming stream's arguments: ferry's server side, one peer. */
export const SERVER_TLS = { 'tls-creds': DATA_TLS_IDS.server, 'tls-authz': DATA_TLS_IDS.authz } as const;

/** The TLS half of an NBD client's or an outgoing stream's arguments: checks the peer's name. */
export function clientTls(peerHostname: string): { 'tls-creds': string; 'tls-hostname': string } {
  return { 'tls-creds': DATA_TLS_IDS.client, 'tls-hostname': peerHostname };
}

export type DataTlsMode = 'required' | 'preferred' | 'off';

export class DataTlsError extends FerryError {
  override name = 'DataTlsError';
}

/** A host's data-path identity: its certificate, key, and the fleet CA, as PEM text. */
export interface HostTlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

/**
 * The certificate's subject as QEMU's authz sees it: gnutls prints the distinguished name in
 * RFC 4514 order (last RDN first), comma-joined. Refused when it holds characters that need
 * escaping there: ferry would have to guess gnutls' escaping.
 */
export function certIdentity(pem: Buffer | string): string {
  const subject = new X509Certificate(pem).subject;
  const rdns = subject.split('\n').filter(Boolean);
  for (const r of rdns) {
    if (!/^[A-Za-z][A-Za-z0-9.]*=[A-Za-z0-9 ._@:-]+$/.test(r)) {
      throw new DataTlsError('DATA_TLS_CERT', `the certificate subject '${r}' has characters ferry does not pass to QEMU's authz (letters, digits, space . _ @ : - only)`, { userError: true });
    }
  }
  return rdns.reverse().join(',');
}

/** The names a certificate is valid for (subjectAltName IP and DNS entries). */
export function certNames(pem: Buffer | string): string[] {
  const san = new X509Certificate(pem).subjectAltName ?? '';
  return san
    .split(/,\s*/)
    .map((e) => /^(?:IP Address|DNS):(.+)$/.exec(e)?.[1])
    .filter((n): n is string => n !== undefined);
}

/** What this QEMU lacks for data TLS; empty when it can do it. */
export function missingDataTls(caps: QmpCapabilities): string[] {
  const missing: string[] = [];
  if (!caps.hasCommand('object-add')) missing.push('the command object-add');
  if (!caps.hasArgument('nbd-server-start', 'tls-creds') || !caps.hasArgument('nbd-server-start', 'tls-authz')) missing.push('nbd-server-start tls-creds/tls-authz');
  if (!caps.hasArgument('blockdev-add', 'tls-hostname')) missing.push('NBD client tls-hostname (QEMU 7.0)');
  for (const p of ['tls-creds', 'tls-hostname', 'tls-authz']) if (!caps.hasMigrationParameter(p)) missing.push(`the migration parameter ${p}`);
  return missing;
}

/**
 * The RFC 7919 ffdhe2048 group (a published constant). A QEMU TLS server without dh-params.pem
 * generates 2048-bit DH parameters when the object is made, which costs seconds per migration;
 * TLS 1.3 negotiates ECDHE anyway, so a standard group costs nothing and changes nothing.
 */
const FFDHE2048_PEM = `-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
`;

/** Writes the QEMU-shaped credential folders (0700, files 0600) under `dir`. */
export async function writeCredentialDirs(dir: string, m: HostTlsMaterial): Promise<{ serverDir: string; clientDir: string }> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const serverDir = join(dir, 'server');
  const clientDir = join(dir, 'client');
  for (const [sub, prefix] of [[serverDir, 'server'], [clientDir, 'client']] as const) {
    await mkdir(sub, { recursive: true, mode: 0o700 });
    await writeFile(join(sub, 'ca-cert.pem'), m.ca, { mode: 0o600 });
    await writeFile(join(sub, `${prefix}-cert.pem`), m.cert, { mode: 0o600 });
    await writeFile(join(sub, `${prefix}-key.pem`), m.key, { mode: 0o600 });
  }
  await writeFile(join(serverDir, 'dh-params.pem'), FFDHE2048_PEM, { mode: 0o600 });
  return { serverDir, clientDir };
}

/**
 * Adds ferry's TLS objects to a running QEMU (object-add; the files are read then). Whatever a
 * previous attempt left is deleted first, so the call can be repeated.
 */
export async function addDataTlsObjects(
  qmp: QmpClient,
  opts: { serverDir: string; clientDir: string; peerIdentity: string; priority?: string | undefined; timeoutMs: number },
): Promise<void> {
  await removeDataTlsObjects(qmp, { timeoutMs: opts.timeoutMs });
  const call = { timeoutMs: opts.timeoutMs };
  const priority = opts.priority === undefined ? {} : { priority: opts.priority };
  await qmp.executeRaw('object-add', { 'qom-type': 'tls-creds-x509', id: DATA_TLS_IDS.server, dir: opts.serverDir, endpoint: 'server', 'verify-peer': true, ...priority }, call);
  await qmp.executeRaw('object-add', { 'qom-type': 'tls-creds-x509', id: DATA_TLS_IDS.client, dir: opts.clientDir, endpoint: 'client', 'verify-peer': true, ...priority }, call);
  await qmp.executeRaw('object-add', { 'qom-type': 'authz-simple', id: DATA_TLS_IDS.authz, identity: opts.peerIdentity }, call);
}

/** Deletes ferry's TLS objects; those absent are skipped. The first other failure is thrown. */
export async function removeDataTlsObjects(qmp: QmpClient, opts: { timeoutMs: number }): Promise<void> {
  const present = new Set(
    qomListSchema.parse(await qmp.executeRaw('qom-list', { path: '/objects' }, { timeoutMs: opts.timeoutMs })).map((p) => p.name),
  );
  for (const id of [DATA_TLS_IDS.authz, DATA_TLS_IDS.client, DATA_TLS_IDS.server]) {
    if (present.has(id)) await qmp.executeRaw('object-del', { id }, { timeoutMs: opts.timeoutMs });
  }
}

export async function removeCredentialDirs(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}

/**
 * A throwaway PKI for one local migration (migrate-vm between two folders with no
 * --data-tls-dir): a CA and one certificate per side, valid for the migration address, kept
 * in `dir` (0700) and gone with it. The CA's key is deleted once both are signed.
 */
export async function throwawayPki(dir: string, opts: { address: string | readonly string[]; names: readonly string[] }): Promise<HostTlsMaterial[]> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  const caKey = join(dir, 'ca.key');
  const caPem = join(dir, 'ca.pem');
  await run('openssl', ['req', '-x509', ...ec, '-keyout', caKey, '-out', caPem, '-days', '1', '-subj', '/CN=ferry-throwaway-ca']);
  const addresses = typeof opts.address === 'string' ? [opts.address] : [...new Set(opts.address)];
  const san = addresses.map((a) => (isIP(a) !== 0 ? `IP:${a}` : `DNS:${a}`)).join(',');
  const out: HostTlsMaterial[] = [];
  for (const name of opts.names) {
    const key = join(dir, `${name}.key`);
    const csr = join(dir, `${name}.csr`);
    const pem = join(dir, `${name}.pem`);
    const ext = join(dir, `${name}.ext`);
    await writeFile(ext, `subjectAltName=${san}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n`);
    await run('openssl', ['req', ...ec, '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
    await run('openssl', ['x509', '-req', '-in', csr, '-CA', caPem, '-CAkey', caKey, '-CAcreateserial', '-out', pem, '-days', '1', '-extfile', ext]);
    out.push({ ca: await readFile(caPem), cert: await readFile(pem), key: await readFile(key) });
  }
  await rm(caKey, { force: true });
  return out;
}

/**
 * Makes a QEMU ready for TLS on both data streams of one migration: credentials written, ferry's
 * objects added, and the migration stream's parameters set for its role (the source is the
 * stream's client and checks the peer's name; the destination its server and admits one peer).
 * Set here, not by whoever drives the migration, so an agent in `required` mode knows the
 * stream is encrypted whatever its caller asks.
 */
export async function beginDataTls(
  qmp: QmpClient,
  opts: { dir: string; material: HostTlsMaterial; role: 'source' | 'destination'; peerIdentity: string; peerHostname: string; priority?: string | undefined; timeoutMs: number },
): Promise<void> {
  const dirs = await writeCredentialDirs(opts.dir, opts.material);
  await addDataTlsObjects(qmp, { ...dirs, peerIdentity: opts.peerIdentity, priority: opts.priority, timeoutMs: opts.timeoutMs });
  await qmp.executeRaw('migrate-set-parameters', opts.role === 'source' ? clientTls(opts.peerHostname) : SERVER_TLS, { timeoutMs: opts.timeoutMs });
}

/**
 * Undoes beginDataTls: the parameters cleared, the objects deleted (once no NBD node or server
 * uses them), the credentials removed. Each step runs even if one before failed; the first
 * failure is thrown at the end.
 */
export async function endDataTls(qmp: QmpClient | undefined, opts: { dir: string; timeoutMs: number }): Promise<void> {
  let first: unknown;
  const step = async (f: () => Promise<unknown>): Promise<void> => {
    try {
      await f();
    } catch (err) {
      first ??= err;
    }
  };
  if (qmp) {
    await step(() => qmp.executeRaw('migrate-set-parameters', { 'tls-creds': '', 'tls-hostname': '', 'tls-authz': '' }, { timeoutMs: opts.timeoutMs }));
    await step(() => removeDataTlsObjects(qmp, { timeoutMs: opts.timeoutMs }));
  }
  await step(() => removeCredentialDirs(opts.dir));
  if (first !== undefined) throw first;
}
