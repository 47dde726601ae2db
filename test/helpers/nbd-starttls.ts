/**
 * A minimal NBD client that goes as far as QEMU's TLS: the fixed-newstyle greeting, the client
 * flags, NBD_OPT_STARTTLS, then a TLS handshake with Node's own TLS stack, and says which
 * protocol and cipher the server settled on. Node offers its defaults in its own order
 * (AES-256-GCM first): a server whose priority puts another cipher first and decides
 * (%SERVER_PRECEDENCE) shows it here.
 */
import { connect as connectTcp, type Socket } from 'node:net';
import { connect as connectTls } from 'node:tls';

const IHAVEOPT = 0x49484156454f5054n;
const NBD_OPT_STARTTLS = 5;
const NBD_REP_ACK = 1;

/** Reads exactly `n` bytes, or fails after `timeoutMs`. */
function readExactly(sock: Socket, n: number, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    let got = Buffer.alloc(0);
    const done = (err?: Error, buf?: Buffer): void => {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('error', onError);
      sock.off('close', onClose);
      if (err) reject(err);
      else {
        const rest = got.subarray(n);
        if (rest.length > 0) sock.unshift(rest);
        resolve(buf!);
      }
    };
    const onData = (chunk: Buffer): void => {
      got = Buffer.concat([got, chunk]);
      if (got.length >= n) {
        sock.pause();
        done(undefined, got.subarray(0, n));
      }
    };
    const onError = (err: Error): void => done(err);
    const onClose = (): void => done(new Error(`connection closed after ${got.length} of ${n} bytes`));
    const timer = setTimeout(() => done(new Error(`timed out waiting for ${n} bytes (got ${got.length})`)), timeoutMs);
    sock.on('data', onData);
    sock.on('error', onError);
    sock.on('close', onClose);
    sock.resume();
  });
}

export async function nbdStartTlsCipher(opts: { host: string; port: number; ca: Buffer; cert: Buffer; key: Buffer; timeoutMs?: number }): Promise<{ protocol: string | null; cipher: string }> {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const sock = connectTcp({ host: opts.host, port: opts.port });
  try {
    const greeting = await readExactly(sock, 18, timeoutMs);
    if (greeting.subarray(0, 8).toString('latin1') !== 'NBDMAGIC' || greeting.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not an NBD fixed-newstyle server');
    const req = Buffer.alloc(4 + 16);
    req.writeUInt32BE(3, 0); // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    req.writeBigUInt64BE(IHAVEOPT, 4);
    req.writeUInt32BE(NBD_OPT_STARTTLS, 12);
    req.writeUInt32BE(0, 16);
    sock.write(req);
    const reply = await readExactly(sock, 20, timeoutMs);
    if (reply.readUInt32BE(12) !== NBD_REP_ACK) throw new Error(`STARTTLS refused: reply type 0x${reply.readUInt32BE(12).toString(16)}`);
    const tls = connectTls({ socket: sock, host: opts.host, ca: opts.ca, cert: opts.cert, key: opts.key });
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('TLS handshake timed out')), timeoutMs);
        tls.once('secureConnect', () => {
          clearTimeout(timer);
          resolve();
        });
        tls.once('error', (err) => {
          clearTimeout(timer);
          reject(err);
        });
      });
      return { protocol: tls.getProtocol(), cipher: tls.getCipher().standardName };
    } finally {
      tls.destroy();
    }
  } finally {
    sock.destroy();
  }
}
