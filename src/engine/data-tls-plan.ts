/**
 * Whether a migration's data streams (NBD and the migration stream) run over TLS, decided in
 * preflight from what each side offers and what the caller asks, before anything changes.
 *
 *   asked \ sides   both can        one cannot
 *   required        TLS             refused (DATA_TLS_UNAVAILABLE), naming the side and why
 *   preferred       TLS             plain, and the plan says why
 *   off             plain           plain
 * A side whose own mode is `required` makes the whole migration `required`, whatever was asked.
 * "Can" means: a certificate (identity), a QEMU with every TLS piece, and a certificate valid
 * for the address the peer connects to (its migration address; in lazy mode the source's
 * export address too).
 */
import { MigrationError } from './types.js';

export type DataTlsMode = 'required' | 'preferred' | 'off';

export interface SideDataTls {
  /** The host's own mode (an agent's dataTls; local: what migrate-vm was given). */
  mode: DataTlsMode;
  /** Its certificate's subject as QEMU's authz compares it; null without a certificate. */
  identity: string | null;
  /** Names its certificate is valid for (subjectAltName). */
  names: readonly string[];
  /** What its QEMU lacks for data TLS (missingDataTls); empty when it can. */
  qemuMissing: readonly string[];
  /** The address the peer connects to on this side. */
  address: string;
}

export type DataTlsPlan =
  | { encrypted: true; source: { identity: string; hostname: string }; destination: { identity: string; hostname: string } }
  | { encrypted: false; reason: string };

export function planDataTls(asked: DataTlsMode, source: SideDataTls, destination: SideDataTls): DataTlsPlan {
  const why = (side: 'source' | 'destination', s: SideDataTls): string | undefined => {
    if (s.identity === null) return `the ${side} has no data-path certificate (dataTls ${s.mode})`;
    if (s.qemuMissing.length > 0) return `the ${side}'s QEMU lacks ${s.qemuMissing.join(', ')}`;
    if (!s.names.includes(s.address)) return `the ${side}'s certificate is not valid for its migration address ${s.address} (it names ${s.names.join(', ') || 'nothing'})`;
    return undefined;
  };
  const required = asked === 'required' || source.mode === 'required' || destination.mode === 'required';
  const problems = [why('source', source), why('destination', destination)].filter((p): p is string => p !== undefined);
  if (problems.length === 0 && (required || asked === 'preferred')) {
    return {
      encrypted: true,
      source: { identity: source.identity!, hostname: source.address },
      destination: { identity: destination.identity!, hostname: destination.address },
    };
  }
  if (required) {
    const by = asked === 'required' ? 'the migration asks for' : `the ${source.mode === 'required' ? 'source' : 'destination'} host requires`;
    throw new MigrationError('DATA_TLS_UNAVAILABLE', `${by} TLS on the data path, but ${problems.join('; ')}`, { phase: 'preflight', userError: true });
  }
  return { encrypted: false, reason: asked === 'off' ? 'data TLS off for this migration' : problems.join('; ') };
}
