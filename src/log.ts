import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * The process-wide logger. Level from FERRY_LOG_LEVEL (default `info`, `silent` in tests unless
 * set), JSON to stderr so stdout stays free for a CLI's own output.
 */
export function createLogger(bindings: Record<string, unknown> = {}): Logger {
  const level = process.env.FERRY_LOG_LEVEL ?? (process.env.VITEST ? 'silent' : 'info');
  return pino({ level, base: { ...bindings } }, pino.destination(2));
}

/** A logger that drops everything, for library callers that pass none. */
export const silentLogger: Logger = pino({ level: 'silent' });
