/** What a QMP session is opened with, and what QEMU greets it with. */
import { z } from 'zod';
import type { Logger } from '../log.js';
import { versionInfoSchema } from './commands.js';
import type { SchemaCache } from './schema-cache.js';

export const greetingSchema = z.object({
  QMP: z.object({ version: versionInfoSchema, capabilities: z.array(z.string()) }),
});
export type QmpGreeting = z.infer<typeof greetingSchema>['QMP'];

export interface ConnectOptions {
  /** Deadline for the whole handshake: connect, greeting, negotiation. Default 30 s. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** Ask for out-of-band execution (granted only if QEMU offers it). */
  oob?: boolean;
  logger?: Logger;
  /** Names the session in logs; defaults to the target. */
  name?: string;
  /** Where probeCapabilities looks for this build's schema first; default processSchemaCache(). */
  schemaCache?: SchemaCache;
}

