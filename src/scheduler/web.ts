/**
 * The web view's files: plain HTML, CSS and one JavaScript module from web/ at the repository's
 * root, served as they are (no build step). They hold no data and no secret: everything the page
 * shows or does goes over the API's WebSocket, authenticated with an API token (docs/scheduler.md,
 * "Web view"). Only the names below are served; nothing of the URL becomes a path.
 */
import { readFile } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { errorText } from '../errors.js';
import type { Logger } from '../log.js';

/** web/ beside src/ and dist/ (both one level below the repository's root). */
const WEB_DIR = new URL('../../web/', import.meta.url);

const FILES: Record<string, { file: string; type: string }> = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/index.html': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  '/style.css': { file: 'style.css', type: 'text/css; charset=utf-8' },
};

/** Answers GET of one of the page's files (true), or leaves the request to the caller (false). */
export function handleWebRequest(req: IncomingMessage, res: ServerResponse, log: Logger): boolean {
  const entry = FILES[(req.url ?? '').split('?')[0] ?? ''];
  if (!entry || (req.method !== 'GET' && req.method !== 'HEAD')) return false;
  readFile(new URL(entry.file, WEB_DIR)).then(
    (body) => {
      const host = req.headers.host ?? '';
      res.writeHead(200, {
        'content-type': entry.type,
        'cache-control': 'no-cache',
        // The page talks to its own origin only, runs no inline script, and is never framed.
        'content-security-policy': `default-src 'self'; connect-src 'self' ws://${host} wss://${host}; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'`,
        'x-content-type-options': 'nosniff',
        'referrer-policy': 'no-referrer',
      });
      res.end(req.method === 'HEAD' ? undefined : body);
    },
    (err: unknown) => {
      log.error({ err: errorText(err), file: entry.file }, 'the web view file cannot be read');
      res.writeHead(500, { 'content-type': 'text/plain' }).end('the web view is not installed\n');
    },
  );
  return true;
}

/**
 * A WebSocket from a page of another origin is refused: a browser sends Origin, ferry's CLI does
 * not. (The token is not ambient, so another site could not use it anyway; this is belt and braces.)
 */
export function crossOrigin(req: IncomingMessage): boolean {
  const origin = req.headers.origin;
  if (origin === undefined) return false;
  try {
    return new URL(origin).host !== req.headers.host;
  } catch {
    return true;
  }
}
