/** A throwaway PKI for mutual-TLS tests: a CA, an agent certificate for 127.0.0.1, a client, and a rogue client from another CA. */
import { execFile } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface Pki {
  ca: string;
  agent: { cert: string; key: string };
  client: { cert: string; key: string };
  rogue: { cert: string; key: string; ca: string };
}

async function ca(dir: string, name: string): Promise<{ pem: string; key: string }> {
  const pem = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', pem, '-days', '2', '-subj', `/CN=${name}`]);
  return { pem, key };
}

async function leaf(dir: string, name: string, signer: { pem: string; key: string }, ext: string): Promise<{ cert: string; key: string }> {
  const key = join(dir, `${name}.key`);
  const csr = join(dir, `${name}.csr`);
  const cert = join(dir, `${name}.pem`);
  const extFile = join(dir, `${name}.ext`);
  await writeFile(extFile, `${ext}\n`);
  await run('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
  await run('openssl', ['x509', '-req', '-in', csr, '-CA', signer.pem, '-CAkey', signer.key, '-CAcreateserial', '-out', cert, '-days', '2', '-extfile', extFile]);
  return { cert, key };
}

export async function makePki(dir: string): Promise<Pki> {
  const root = await ca(dir, 'ferry-test-ca');
  const other = await ca(dir, 'rogue-ca');
  return {
    ca: root.pem,
    // Both usages: the agent's certificate also serves its QEMUs' TLS on the data path, where each
    // side is server of one stream and client of another.
    agent: await leaf(dir, 'agent', root, 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth'),
    client: await leaf(dir, 'client', root, 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth'),
    rogue: { ...(await leaf(dir, 'rogue', other, 'extendedKeyUsage=clientAuth')), ca: root.pem },
  };
}
