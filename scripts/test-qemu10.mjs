#!/usr/bin/env node
// The QEMU 10.0 test leg: the migration, lazy, bitmap and agent integration tests (and the launch
// tests) again, with FERRY_QEMU at the QEMU 10.0 the bootstrap unpacked (scripts/qemu10.mjs).
// Arguments go to vitest (.ci/run adds its reporters). Fails, saying why, when 10.0 is missing.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qemu10Paths } from './qemu10.mjs';

export const QEMU10_LEG = [
  'test/integration/migrate.test.ts',
  'test/integration/lazy.test.ts',
  'test/integration/bitmaps.test.ts',
  'test/integration/launcher.test.ts',
  'test/integration/agent.test.ts',
  'test/integration/qemu-leg.test.ts',
  'test/integration/auto-converge.test.ts',
  'test/integration/build-cache.test.ts',
];

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { wrapper } = qemu10Paths(root);
if (!existsSync(wrapper)) {
  process.stderr.write(`test:qemu10: QEMU 10.0 is not unpacked at ${wrapper}; run: node scripts/bootstrap.mjs --qemu10\n`);
  process.exit(1);
}
const vitest = join(root, 'node_modules', 'vitest', 'vitest.mjs');
const r = spawnSync(process.execPath, [vitest, 'run', ...QEMU10_LEG, ...process.argv.slice(2)], {
  cwd: root,
  stdio: 'inherit',
  env: { ...process.env, FERRY_QEMU: wrapper },
});
process.exit(r.status ?? 1);
