/**
 * ferry-agent --config /etc/ferry/agent.json
 * The config is JSON (see AgentConfigSchema); FERRY_AGENT_TOKEN, if set, adds a token for the
 * principal 'operator' so no secret needs to sit in the file.
 */
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { errorText } from '../errors.js';
import { createLogger } from '../log.js';
import { startAgent } from './server.js';

export async function main(argv: string[]): Promise<number> {
  let config: Record<string, unknown>;
  try {
    const { values } = parseArgs({ args: argv, options: { config: { type: 'string' } }, strict: true });
    if (!values.config) throw new Error('--config FILE is required');
    config = JSON.parse(await readFile(values.config, 'utf8')) as Record<string, unknown>;
  } catch (err) {
    process.stderr.write(`ferry-agent: ${errorText(err)}\n`);
    return 2;
  }
  const token = process.env.FERRY_AGENT_TOKEN;
  if (token) config.tokens = { ...(config.tokens as Record<string, string> | undefined), [token]: 'operator' };
  const log = createLogger({ tool: 'ferry-agent' });
  try {
    const agent = await startAgent(config, log);
    await new Promise<void>((resolve) => {
      const stop = (sig: string): void => {
        log.info({ sig }, 'shutting down (VMs keep running)');
        void agent.close().then(resolve);
      };
      process.once('SIGTERM', () => stop('SIGTERM'));
      process.once('SIGINT', () => stop('SIGINT'));
    });
    return 0;
  } catch (err) {
    process.stderr.write(`ferry-agent: ${errorText(err)}\n`);
    return 2;
  }
}
