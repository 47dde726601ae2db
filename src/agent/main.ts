/**
 * ferry-agent [--config FILE] [flags]: see config.ts for the sources of configuration and
 * docs/agent.md for the API. SIGTERM/SIGINT stop serving; the VMs keep running, and the next
 * start re-attaches to them.
 */
import { errorText } from '../errors.js';
import { serveUntilSignal } from '../serve.js';
import { createLogger } from '../log.js';
import { AGENT_USAGE, loadAgentConfig, type AgentConfig } from './config.js';
import { startAgent } from './server.js';
import { memorySchemaCache, useSchemaCache } from '../qmp/schema-cache.js';

export async function main(argv: string[]): Promise<number> {
  // Before the flags are parsed: the usage is what someone asks for who does not know them yet.
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(`${AGENT_USAGE}\n`);
    return 0;
  }
  let config: AgentConfig;
  try {
    config = await loadAgentConfig(argv, process.env);
  } catch (err) {
    process.stderr.write(`ferry-agent: ${errorText(err)}\n`);
    return 2;
  }
  const log = createLogger({ tool: 'ferry-agent' });
  // Long-lived: a build's schema, if a session here probes one, is asked of QEMU once per process.
  useSchemaCache(memorySchemaCache());
  return serveUntilSignal('ferry-agent', log, () => startAgent(config, log), 'shutting down (VMs keep running)');
}
