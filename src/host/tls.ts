/**
 * Mutual TLS between ferry's tools and its agents: the agent presents a certificate and demands
 * one signed by the CA it trusts; callers do the same the other way round. The bearer token
 * still names the principal: TLS says which machine talks, the token what it may touch.
 */
import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { errorText, FerryError } from '../errors.js';

/** PEM files: this side's certificate and key, and the CA that signs the other side's. */
export const TlsFilesSchema = z.object({ cert: z.string().min(1), key: z.string().min(1), ca: z.string().min(1) }).strict();
export type TlsFiles = z.infer<typeof TlsFilesSchema>;

export interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
}

export class TlsConfigError extends FerryError {
  override name = 'TlsConfigError';
}

export async function loadTls(files: TlsFiles): Promise<TlsMaterial> {
  const read = async (what: keyof TlsFiles): Promise<Buffer> => {
    try {
      const b = await readFile(files[what]);
      if (!b.includes('-----BEGIN')) throw new Error('not a PEM file');
      return b;
    } catch (err) {
      throw new TlsConfigError('TLS_FILE', `TLS ${what} ${files[what]}: ${(err as NodeJS.ErrnoException).code ?? errorText(err)}`, { userError: true });
    }
  };
  return { cert: await read('cert'), key: await read('key'), ca: await read('ca') };
}
