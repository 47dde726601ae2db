/**
 * The agent's configuration: a JSON file, then environment variables, then flags, each later
 * source overriding the earlier one; the merged result is parsed once with zod, so a bad value
 * is named wherever it came from.
 */
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { z } from 'zod';
import { errorText, FerryError } from '../errors.js';
import { parseCidr } from './qmp-policy.js';
import { TlsFilesSchema } from '../host/tls.js';
import { MetricsListenSchema } from '../host/metrics-http.js';

export const AgentConfigSchema = z
  .object({
    name: z.string().min(1).default('agent'),
    listenHost: z.string().default('127.0.0.1'),
    listenPort: z.number().int().min(0).max(65535).default(7420),
    storageRoot: z.string().refine((p) => p.startsWith('/'), 'must be an absolute path'),
    /** Where the agent keeps its own records; never reachable as a disk path. */
    stateDir: z.string().refine((p) => p.startsWith('/'), 'must be an absolute path').optional(),
    /** token -> principal. Checked as a whole so that no error message ever shows a token. */
    tokens: z
      .record(z.string(), z.string().min(1))
      .refine((t) => Object.keys(t).every((k) => k.length >= 16), 'tokens must be at least 16 characters'),
    /** The address this host's QEMUs listen on for NBD and migration streams: an IP address. */
    migrationHost: z.string().refine((h) => isIP(h) !== 0, 'must be an IP address').default('127.0.0.1'),
    portRange: z
      .tuple([z.number().int().min(1024).max(65535), z.number().int().min(1024).max(65535)])
      .refine(([lo, hi]) => lo <= hi, 'the first port must not be above the second')
      .default([20000, 29999]),
    qemuBinary: z.string().optional(),
    /**
     * Read-only folders a VM's kernel and initrd may come from (besides the storage root). A
     * caller's spec can name no other file on this host.
     */
    bootRoots: z.array(z.string().refine((p) => p.startsWith('/'), 'must be an absolute path')).default([]),
    /**
     * IP addresses or CIDRs this host's QEMUs may connect out to (NBD, migration stream): the
     * fleet's migration network. Unset: any address but loopback (loopback too when
     * migrationHost is loopback, as on one machine).
     */
    migrationPeers: z
      .array(z.string().refine((p) => {
        try {
          parseCidr(p);
          return true;
        } catch {
          return false;
        }
      }, 'must be an IP address or a CIDR such as 10.0.0.0/24'))
      .optional(),
    /** Principals that may see and settle every principal's VMs (vm.list {all: true}, by vmId). */
    adminPrincipals: z.array(z.string().min(1)).default([]),
    /** Mutual TLS: the agent's certificate and key, and the CA that signs its callers'. */
    tls: TlsFilesSchema.optional(),
    /**
     * /metrics without a token (and without TLS) on an address of its own, for Prometheus on a
     * management network; unset: /metrics is on the API's port only, with an API token.
     */
    metricsListen: MetricsListenSchema.optional(),
    /**
     * TLS on the guest's data path (NBD exports, migration streams), QEMU's own. Files default to
     * `tls`'s (the same PKI; the certificate then needs extendedKeyUsage serverAuth and
     * clientAuth); mode defaults to `required` whenever there are files (its own or tls's), else `off`.
     */
    dataTls: z
      .object({
        mode: z.enum(['required', 'preferred', 'off']).optional(),
        cert: z.string().min(1).optional(),
        key: z.string().min(1).optional(),
        ca: z.string().min(1).optional(),
      })
      .strict()
      .refine((d) => [d.cert, d.key, d.ca].every((f) => f === undefined) || [d.cert, d.key, d.ca].every((f) => f !== undefined), 'give cert, key and ca together, or none (then tls\'s are used)')
      .optional(),
    limits: z
      .object({
        /** Sustained requests per second per session, and the burst above it. */
        requestsPerSecond: z.number().positive().default(50),
        burst: z.number().int().positive().default(100),
        sessionsPerPrincipal: z.number().int().positive().default(32),
      })
      .strict()
      .default({ requestsPerSecond: 50, burst: 100, sessionsPerPrincipal: 32 }),
  })
  .strict();
export type AgentConfigInput = z.input<typeof AgentConfigSchema>;
export type AgentConfig = z.infer<typeof AgentConfigSchema> & { stateDir: string };

export class AgentConfigError extends FerryError {
  override name = 'AgentConfigError';
}

export function parseAgentConfig(input: unknown): AgentConfig {
  const parsed = AgentConfigSchema.safeParse(input);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new AgentConfigError('AGENT_CONFIG', `invalid agent config: ${issue.path.join('.') || '(config)'}: ${issue.message}`, { userError: true });
  }
  return { ...parsed.data, stateDir: parsed.data.stateDir ?? join(parsed.data.storageRoot, '.ferry-agent') };
}

export const AGENT_USAGE = `usage: ferry-agent [--config FILE] [--name NAME] [--listen HOST:PORT] [--storage-root DIR]
                  [--migration-host ADDR] [--qemu BINARY]
environment: FERRY_AGENT_TOKEN (adds a token for principal 'operator'), FERRY_AGENT_NAME,
             FERRY_AGENT_LISTEN, FERRY_AGENT_STORAGE_ROOT, FERRY_AGENT_MIGRATION_HOST`;

/** File, then environment, then flags. */
export async function loadAgentConfig(argv: string[], env: NodeJS.ProcessEnv): Promise<AgentConfig> {
  let values;
  try {
    values = parseArgs({
      args: argv,
      options: {
        config: { type: 'string' },
        name: { type: 'string' },
        listen: { type: 'string' },
        'storage-root': { type: 'string' },
        'migration-host': { type: 'string' },
        qemu: { type: 'string' },
      },
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (err) {
    throw new AgentConfigError('AGENT_USAGE', `${errorText(err)}\n${AGENT_USAGE}`, { userError: true });
  }
  let config: Record<string, unknown> = {};
  if (values.config) {
    let text: string;
    try {
      text = await readFile(values.config, 'utf8');
    } catch (err) {
      throw new AgentConfigError('AGENT_CONFIG', `cannot read config ${values.config}: ${(err as NodeJS.ErrnoException).code ?? errorText(err)}`, { userError: true });
    }
    try {
      const raw: unknown = JSON.parse(text);
      if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new Error('not a JSON object');
      config = raw as Record<string, unknown>;
    } catch (err) {
      throw new AgentConfigError('AGENT_CONFIG', `config ${values.config} is not valid: ${errorText(err)}`, { userError: true });
    }
  }
  const set = (key: string, value: string | undefined): void => {
    if (value !== undefined) config[key] = value;
  };
  const listen = (value: string | undefined, from: string): void => {
    if (value === undefined) return;
    const m = /^(.+):(\d+)$/.exec(value);
    if (!m) throw new AgentConfigError('AGENT_CONFIG', `${from}: expected HOST:PORT, got '${value}'`, { userError: true });
    config.listenHost = m[1];
    config.listenPort = Number(m[2]);
  };
  set('name', env.FERRY_AGENT_NAME);
  listen(env.FERRY_AGENT_LISTEN, 'FERRY_AGENT_LISTEN');
  set('storageRoot', env.FERRY_AGENT_STORAGE_ROOT);
  set('migrationHost', env.FERRY_AGENT_MIGRATION_HOST);
  set('name', values.name);
  listen(values.listen, '--listen');
  set('storageRoot', values['storage-root']);
  set('migrationHost', values['migration-host']);
  set('qemuBinary', values.qemu);
  if (env.FERRY_AGENT_TOKEN) config.tokens = { ...(config.tokens as Record<string, string> | undefined), [env.FERRY_AGENT_TOKEN]: 'operator' };
  config.tokens ??= {};
  return parseAgentConfig(config);
}
