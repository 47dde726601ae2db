export { QmpClient, DEFAULT_CALL_TIMEOUT_MS, type QmpGreeting, type ConnectOptions } from './client.js';
export type { QmpTarget } from './transport.js';
export { describeTarget } from './transport.js';
export * from './errors.js';
export * from './events.js';
export * from './commands.js';
export { buildCapabilities, enumPaths, type QmpCapabilities } from './capabilities.js';
export { LineDecoder } from './framing.js';
export { diskSchemaCache, layeredSchemaCache, memorySchemaCache, noSchemaCache, processSchemaCache, schemaCacheKey, useSchemaCache, type SchemaCache } from './schema-cache.js';
