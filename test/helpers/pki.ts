/**
 * A throwaway PKI for mutual-TLS tests, as files: a CA, an agent certificate and a client
 * certificate for 127.0.0.1 (both usages: the agent's also serves its QEMUs' data-path TLS, where
 * each side is server of one stream and client of another), and a rogue client from another CA.
 * Made by the same code as migrate-vm's throwaway CA (src/host/data-tls.ts).
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { throwawayPki, type HostTlsMaterial } from '../../src/host/data-tls.js';

export interface Pki {
  ca: string;
  agent: { cert: string; key: string };
  client: { cert: string; key: string };
  rogue: { cert: string; key: string; ca: string };
}

async function files(dir: string, name: string, m: HostTlsMaterial): Promise<{ cert: string; key: string }> {
  const cert = join(dir, `${name}.pem`);
  const key = join(dir, `${name}.key`);
  await writeFile(cert, m.cert);
  await writeFile(key, m.key, { mode: 0o600 });
  return { cert, key };
}

export async function makePki(dir: string): Promise<Pki> {
  const [agent, client] = await throwawayPki(join(dir, 'fleet'), { address: '127.0.0.1', names: ['agent', 'client'] });
  const [rogue] = await throwawayPki(join(dir, 'other'), { address: '127.0.0.1', names: ['rogue'] });
  const ca = join(dir, 'ferry-test-ca.pem');
  await writeFile(ca, agent!.ca);
  return { ca, agent: await files(dir, 'agent', agent!), client: await files(dir, 'client', client!), rogue: { ...(await files(dir, 'rogue', rogue!)), ca } };
}
