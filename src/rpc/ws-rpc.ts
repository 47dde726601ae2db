/**
 * The request/response framing the agent and the scheduler share: JSON text frames
 * `{ v, id, method, params }`, each parsed and checked against the method's own schema, answered
 * `{ v, id, ok: true, result }` or `{ v, id, ok: false, error: { code, message } }`. Anything
 * unknown is refused by name; a user's mistake is answered, never logged as our failure. The
 * caller is pinged (heartbeat.ts): a caller that stops answering is dropped within 2 x heartbeatMs.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { WebSocket } from 'ws';
import { z } from 'zod';
import { errorText, FerryError } from '../errors.js';
import type { Logger } from '../log.js';
import { DEFAULT_HEARTBEAT_MS, keepAlive } from './heartbeat.js';

export class RpcError extends FerryError {
  override name = 'RpcError';
}

export function rpcRequestSchema(version: number) {
  return z
    .object({
      v: z.literal(version),
      id: z.union([z.string().max(64), z.number().int()]),
      method: z.string(),
      params: z.unknown().default({}),
    })
    .strict();
}

/** The subprotocol a browser's WebSocket asks for; the server selects it (never the token's). */
export const BROWSER_SUBPROTOCOL = 'ferry.v1';
/** A browser cannot set Authorization on a WebSocket: it offers its token as `ferry.bearer.<base64url>`. */
const TOKEN_SUBPROTOCOL = /^ferry\.bearer\.([A-Za-z0-9_-]{1,1024})$/;

/**
 * Bearer tokens at the HTTP upgrade; digests compared in constant time against every token.
 * `subprotocol`: also take the token from the Sec-WebSocket-Protocol offer (the web view).
 */
export function bearerAuthenticator(tokens: Record<string, string>, opts: { subprotocol?: boolean } = {}): (req: IncomingMessage) => string | undefined {
  const digests = Object.entries(tokens).map(([t, principal]) => ({ digest: sha256(t), principal }));
  return (req) => {
    const token = /^Bearer (.+)$/.exec(req.headers.authorization ?? '')?.[1] ?? (opts.subprotocol ? tokenFromSubprotocol(req) : undefined);
    if (token === undefined) return undefined;
    const given = sha256(token);
    let principal: string | undefined;
    for (const t of digests) if (timingSafeEqual(given, t.digest)) principal = t.principal;
    return principal;
  };
}

export function serveRpc<S extends Record<string, z.ZodType>>(
  ws: WebSocket,
  opts: {
    version: number;
    methods: S;
    handle: (method: keyof S & string, params: unknown) => Promise<unknown>;
    /** Called before each request is dispatched; false refuses it with RATE_LIMITED. */
    admit?: () => boolean;
    limitText?: string;
    log: Logger;
    /** Ping interval, ms (default 10 s). */
    heartbeatMs?: number;
  },
): void {
  const requestSchema = rpcRequestSchema(opts.version);
  ws.on('error', (err) => opts.log.warn({ err: err.message }, 'WebSocket session ended on an error'));
  keepAlive(ws, { intervalMs: opts.heartbeatMs ?? DEFAULT_HEARTBEAT_MS, onDrop: (silentMs) => opts.log.warn({ silentMs }, 'the caller answered no ping: dropped the session') });
  ws.on('message', (data: Buffer, isBinary: boolean) => {
    void (async () => {
      let id: string | number | null = null;
      try {
        if (isBinary) throw new RpcError('BAD_MESSAGE', 'binary frames are not part of the protocol', { userError: true });
        let raw: unknown;
        try {
          raw = JSON.parse(data.toString('utf8'));
        } catch {
          throw new RpcError('BAD_MESSAGE', 'the message is not JSON', { userError: true });
        }
        const req = requestSchema.safeParse(raw);
        if (!req.success) {
          const issue = req.error.issues[0]!;
          throw new RpcError('BAD_MESSAGE', `bad request: ${issue.path.join('.') || '(message)'}: ${issue.message}`, { userError: true });
        }
        id = req.data.id;
        if (opts.admit && !opts.admit()) throw new RpcError('RATE_LIMITED', opts.limitText ?? 'too many requests: slow down', { userError: true });
        const method = req.data.method;
        if (!Object.hasOwn(opts.methods, method)) throw new RpcError('UNKNOWN_METHOD', `unknown method '${method}'`, { userError: true });
        const params = opts.methods[method]!.safeParse(req.data.params);
        if (!params.success) {
          const issue = params.error.issues[0]!;
          throw new RpcError('BAD_PARAMS', `${method}: ${issue.path.join('.') || 'params'}: ${issue.message}`, { userError: true });
        }
        const result = await opts.handle(method, params.data);
        ws.send(JSON.stringify({ v: opts.version, id, ok: true, result }));
      } catch (err) {
        // Every error keeps its own code (a spec refusal is SPEC_INVALID, whichever field).
        const code = err instanceof FerryError ? err.code : 'INTERNAL';
        if (!(err instanceof FerryError && err.userError)) opts.log.error({ err: errorText(err) }, 'request failed');
        ws.send(JSON.stringify({ v: opts.version, id, ok: false, error: { code, message: errorText(err) } }));
      }
    })();
  });
}

function tokenFromSubprotocol(req: IncomingMessage): string | undefined {
  for (const offer of (req.headers['sec-websocket-protocol'] ?? '').split(',')) {
    const m = TOKEN_SUBPROTOCOL.exec(offer.trim());
    if (m) return Buffer.from(m[1]!, 'base64url').toString('utf8');
  }
  return undefined;
}

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}
