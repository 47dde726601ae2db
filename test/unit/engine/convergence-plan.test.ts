import { expect, test } from 'vitest';
import { planConvergence } from '../../../src/engine/convergence/index.js';
import { buildCapabilities } from '../../../src/qmp/capabilities.js';

const caps = (commands: string[]) =>
  buildCapabilities(
    commands.map((name) => ({ name, 'meta-type': 'command' as const, 'arg-type': '0', 'ret-type': '0' })),
    [],
  );
const v = (major: number, minor = 0) => ({ qemu: { major, minor, micro: 0 }, package: '' });
const q72 = caps(['blockdev-mirror']);
const q10 = caps(['blockdev-mirror', 'block-job-change']);

test('auto: active-sync where the source has block-job-change, the relay where the destination is before 8.0', () => {
  expect(planConvergence('auto', q72, v(7, 2))).toEqual({ relay: true, mirrorCopyMode: 'background', activeSync: false, path: 'auto:background+relay' });
  expect(planConvergence('auto', q10, v(10))).toEqual({ relay: false, mirrorCopyMode: 'background', activeSync: true, path: 'auto:active-sync' });
  expect(planConvergence('auto', q10, v(7, 2))).toEqual({ relay: true, mirrorCopyMode: 'background', activeSync: true, path: 'auto:active-sync+relay' });
  expect(planConvergence('auto', q72, v(8))).toEqual({ relay: false, mirrorCopyMode: 'background', activeSync: false, path: 'auto:background' });
});

test('an explicit copy mode is what QEMU does: no relay, no change of mode', () => {
  expect(planConvergence('background', q10, v(10))).toMatchObject({ mirrorCopyMode: 'background', activeSync: false, relay: false, path: 'background' });
  expect(planConvergence('write-blocking', q72, v(7, 2))).toMatchObject({ mirrorCopyMode: 'write-blocking', activeSync: false, relay: false, path: 'write-blocking' });
});
