/**
 * ferry-scheduler --config FILE [--listen HOST:PORT] [--database PATH|postgres://URL]
 * Tokens from the environment so no secret sits in a flag: FERRY_TOKEN is what the scheduler
 * presents to the agents, FERRY_SCHEDULER_TOKEN adds an API token for principal 'operator'.
 * SIGTERM/SIGINT: stop taking work, give running migrations 30 s, roll back the rest (queued
 * again for the next start).
 */
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { errorText } from '../errors.js';
import { serveUntilSignal } from '../serve.js';
import { createLogger } from '../log.js';
import { startSchedulerService } from './service.js';
import { memorySchemaCache, useSchemaCache } from '../qmp/schema-cache.js';

export const SCHEDULER_USAGE = `usage: ferry-scheduler --config FILE [--listen HOST:PORT] [--database PATH|postgres://URL]
environment: FERRY_TOKEN (what the scheduler presents to the agents), FERRY_SCHEDULER_TOKEN
             (adds an API token for principal 'operator')
`;

export async function main(argv: string[]): Promise<number> {
  let config: Record<string, unknown>;
  try {
    const { values } = parseArgs({ args: argv, options: { config: { type: 'string' }, listen: { type: 'string' }, database: { type: 'string' }, help: { type: 'boolean', short: 'h' } }, strict: true });
    if (values.help) {
      process.stdout.write(SCHEDULER_USAGE);
      return 0;
    }
    if (!values.config) throw new Error('--config FILE is required');
    const raw: unknown = JSON.parse(await readFile(values.config, 'utf8'));
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new Error(`${values.config} is not a JSON object`);
    config = raw as Record<string, unknown>;
    if (values.listen) {
      const m = /^(.+):(\d+)$/.exec(values.listen);
      if (!m) throw new Error(`--listen: expected HOST:PORT, got '${values.listen}'`);
      config.listenHost = m[1];
      config.listenPort = Number(m[2]);
    }
    if (values.database) config.database = values.database;
    if (process.env.FERRY_TOKEN) config.agentToken = process.env.FERRY_TOKEN;
    if (process.env.FERRY_SCHEDULER_TOKEN) config.tokens = { ...(config.tokens as Record<string, string> | undefined), [process.env.FERRY_SCHEDULER_TOKEN]: 'operator' };
  } catch (err) {
    process.stderr.write(`ferry-scheduler: ${errorText(err)}\n`);
    return 2;
  }
  const log = createLogger({ tool: 'ferry-scheduler' });
  // Long-lived: each build's schema is probed once per process, then every migration reads it here.
  useSchemaCache(memorySchemaCache());
  return serveUntilSignal(
    'ferry-scheduler',
    log,
    async () => {
      const svc = await startSchedulerService(config, log);
      return { url: svc.url, close: () => svc.close({ graceMs: 30_000 }) };
    },
    'stopping: running migrations get 30 s, the rest roll back and stay queued',
  );
}
