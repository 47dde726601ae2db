/**
 * /metrics over HTTP for a ferry daemon (agent, scheduler). Two ways to reach it:
 *   - on the daemon's own API port, with the API's bearer token (and its mutual TLS, if any):
 *     `Authorization: Bearer <token>`, which Prometheus sends from `authorization.credentials_file`;
 *   - on a separate listen address the operator chooses (config `metricsListen`), without a token:
 *     a management network or a firewall guards it. It serves /metrics and nothing else.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { z } from 'zod';
import { errorText, FerryError } from '../errors.js';
import type { Logger } from '../log.js';

export class MetricsError extends FerryError {
  override name = 'MetricsError';
}

export const MetricsListenSchema = z
  .object({
    host: z.string().min(1),
    port: z.number().int().min(0).max(65535),
  })
  .strict();
export type MetricsListen = z.infer<typeof MetricsListenSchema>;

export type RenderMetrics = () => Promise<{ contentType: string; body: string }>;

/** Answers GET /metrics (true), or leaves the request to the caller (false). */
export function handleMetricsRequest(req: IncomingMessage, res: ServerResponse, render: RenderMetrics, opts: { authorized: boolean; log: Logger }): boolean {
  const path = (req.url ?? '').split('?')[0];
  if (path !== '/metrics') return false;
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('GET /metrics\n');
    return true;
  }
  if (!opts.authorized) {
    res.writeHead(401, { 'www-authenticate': 'Bearer', 'content-type': 'text/plain' }).end('/metrics needs Authorization: Bearer <token>\n');
    return true;
  }
  render().then(
    ({ contentType, body }) => void res.writeHead(200, { 'content-type': contentType, 'cache-control': 'no-store' }).end(req.method === 'HEAD' ? undefined : body),
    (err: unknown) => {
      opts.log.error({ err: errorText(err) }, 'rendering /metrics failed');
      res.writeHead(500, { 'content-type': 'text/plain' }).end('metrics failed\n');
    },
  );
  return true;
}

/** A listener of its own for /metrics, no token: for an address only Prometheus reaches. */
export async function startMetricsListener(at: MetricsListen, render: RenderMetrics, log: Logger): Promise<{ url: string; close(): Promise<void> }> {
  const http: Server = createServer((req, res) => {
    if (!handleMetricsRequest(req, res, render, { authorized: true, log })) res.writeHead(404, { 'content-type': 'text/plain' }).end('only /metrics here\n');
  });
  await new Promise<void>((resolve, reject) => {
    http.once('error', (err) => reject(new MetricsError('METRICS_LISTEN', `cannot listen for /metrics on ${at.host}:${at.port}: ${err.message}`, { cause: err, userError: true })));
    http.listen(at.port, at.host, () => resolve());
  });
  const port = (http.address() as AddressInfo).port;
  log.info({ host: at.host, port }, '/metrics listening');
  return {
    url: `http://${at.host.includes(':') ? `[${at.host}]` : at.host}:${port}/metrics`,
    close: () => new Promise<void>((r) => http.close(() => r())),
  };
}
