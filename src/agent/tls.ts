/** Moved to src/host/tls.ts (host-level, shared by the agent, its callers and the data path); kept so existing imports resolve. */
export * from '../host/tls.js';
