import { defineConfig } from 'vitest/config';

// Integration tests boot real QEMU guests under TCG, which is CPU bound: on the 2-core CI machine
// more than two files at once only makes every guest slower and every timeout tighter.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 30_000,
    hookTimeout: 60_000,
    teardownTimeout: 30_000,
  },
});
