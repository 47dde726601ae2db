/**
 * The gnutls priority of ferry's TLS objects takes: a real QEMU's NBD server, its objects made
 * on the command line (a destination) and again by object-add (a running source), each with a
 * priority that puts one cipher first and lets the server's order decide; a Node TLS client,
 * which offers AES-256-GCM first, reads the cipher the server chose over NBD STARTTLS.
 */
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { LocalDestination } from '../../src/engine/local-endpoint.js';
import { addDataTlsObjects, certIdentity, SERVER_TLS, throwawayPki, writeCredentialDirs } from '../../src/host/data-tls.js';
import { loadGuestImage } from '../../src/guest/image.js';
import { parseVmSpec } from '../../src/qemu/spec.js';
import { cleanupAll, makeDisk, makeTempDir } from '../helpers/guest.js';
import { nbdStartTlsCipher } from '../helpers/nbd-starttls.js';

afterEach(cleanupAll);

const AES128_FIRST = 'NORMAL:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:%SERVER_PRECEDENCE';
const CHACHA_FIRST = 'NORMAL:-CIPHER-ALL:+CHACHA20-POLY1305:+AES-256-GCM:%SERVER_PRECEDENCE';

test('the priority string of the TLS objects decides the cipher, on the command line and by object-add', async () => {
  const dir = await makeTempDir('ferry-tls-prio-');
  const [server, client] = await throwawayPki(join(dir, 'pki'), { address: '127.0.0.1', names: ['hostB', 'hostA'] });
  const image = await loadGuestImage();
  await makeDisk(join(dir, 'd0.qcow2'), { id: 'd0', format: 'qcow2', size: 16 << 20 });
  const spec = parseVmSpec({ name: 'prio', memoryMiB: 64, accel: 'tcg', disks: [{ id: 'd0', path: join(dir, 'd0.qcow2'), format: 'qcow2' }], boot: { kernel: image.kernel, initrd: image.initrd }, runDir: join(dir, 'run') });
  const destination = new LocalDestination({ dir, dataTls: server!, dataTlsPriority: AES128_FIRST });
  const q = (await destination.startIncoming(spec, { timeoutMs: 30_000, dataTls: { peerIdentity: certIdentity(client!.cert), peerHostname: '127.0.0.1' } })).qmp;
  const port = 26000 + (process.pid % 1000);
  const cipher = async (): Promise<{ protocol: string | null; cipher: string }> => {
    await q.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(port) } }, ...SERVER_TLS });
    try {
      return await nbdStartTlsCipher({ host: '127.0.0.1', port, ca: client!.ca, cert: client!.cert, key: client!.key });
    } finally {
      await q.execute('nbd-server-stop');
    }
  };
  // The command line's objects (argv.ts).
  expect(await cipher()).toEqual({ protocol: 'TLSv1.3', cipher: 'TLS_AES_128_GCM_SHA256' });

  // object-add's (a running source gets them so), replacing the first ones.
  const dirs = await writeCredentialDirs(join(dir, 'tls2'), server!);
  await addDataTlsObjects(q, { ...dirs, peerIdentity: certIdentity(client!.cert), priority: CHACHA_FIRST, timeoutMs: 10_000 });
  expect(await cipher()).toEqual({ protocol: 'TLSv1.3', cipher: 'TLS_CHACHA20_POLY1305_SHA256' });

  // Without a priority, QEMU's default (NORMAL) lets the client's order decide: Node's first.
  await addDataTlsObjects(q, { ...dirs, peerIdentity: certIdentity(client!.cert), timeoutMs: 10_000 });
  expect(await cipher()).toEqual({ protocol: 'TLSv1.3', cipher: 'TLS_AES_256_GCM_SHA384' });
}, 60_000);
