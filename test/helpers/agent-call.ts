/**
 * One agent call from a separate process, for tests whose agents live in network namespaces the
 * test process cannot reach: `ip netns exec NS tsx test/helpers/agent-call.ts URL METHOD [JSON]`.
 * The token comes from FERRY_TOKEN; the result is printed as JSON on stdout.
 */
import { AgentClient } from '../../src/agent/client.js';
import { METHODS, type Method } from '../../src/agent/protocol.js';

const [url, method, params] = process.argv.slice(2);
if (!url || !method || !(METHODS as string[]).includes(method)) {
  process.stderr.write('usage: agent-call URL METHOD [JSON]\n');
  process.exit(2);
}
const client = await AgentClient.connect(url, process.env.FERRY_TOKEN ?? '');
try {
  const result = await client.call(method as Method, params ? (JSON.parse(params) as Record<string, unknown>) : {});
  process.stdout.write(`${JSON.stringify(result)}\n`);
} catch (err) {
  process.stderr.write(`${err instanceof Error ? `${(err as { code?: string }).code ?? ''} ${err.message}` : String(err)}\n`);
  process.exitCode = 1;
} finally {
  client.close();
}
