import { defineConfig } from 'vitest/config';

// Integration tests boot real QEMU guests under TCG, which is CPU bound: on the 2-core CI machine
// more than two files at once only makes every guest slower and every timeout tighter.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // A temp dir of the run's own, which must be empty at the end (test/global-setup.ts).
    globalSetup: ['test/global-setup.ts'],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 30_000,
    hookTimeout: 60_000,
    teardownTimeout: 30_000,
  },
});
