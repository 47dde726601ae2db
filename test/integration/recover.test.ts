/**
 * Crash recovery on a real source QEMU (defect 5): a rollback after a scheduler crash puts back
 * the migration capabilities and parameters the engine changed, and resumes the guest only if it
 * ran before: a guest the operator had paused stays paused.
 */
import { afterEach, expect, test } from 'vitest';
import { rollBackSource } from '../../src/engine/recover.js';
import { silentLogger } from '../../src/log.js';
import { bootWorkloadGuest, cleanupAll } from '../helpers/guest.js';

afterEach(cleanupAll);

test('defect 5: recovery restores the saved capabilities and parameters, and leaves a paused guest paused', async () => {
  const { vm } = await bootWorkloadGuest({ disks: [{ id: 'data', format: 'qcow2', size: 16 << 20 }], workload: { tickMs: 100 } });
  const q = vm.qmp;
  await q.execute('stop');
  const caps = await q.execute('query-migrate-capabilities');
  const params = await q.execute('query-migrate-parameters');
  const saved = {
    wasRunning: false,
    capabilities: caps.filter((c) => ['events', 'pause-before-switchover'].includes(c.capability)).map((c) => ({ capability: c.capability, state: c.state })),
    parameters: { 'max-bandwidth': params['max-bandwidth'], 'downtime-limit': params['downtime-limit'] },
  };
  // What the engine had done when the scheduler died.
  await q.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }, { capability: 'pause-before-switchover', state: true }] });
  await q.execute('migrate-set-parameters', { 'max-bandwidth': 2 ** 40, 'downtime-limit': 1234 });

  const did = await rollBackSource(q, silentLogger, { saved });
  expect((await q.execute('query-status')).status).toBe('paused');
  const after = await q.execute('query-migrate-capabilities');
  for (const c of saved.capabilities) expect(after.find((a) => a.capability === c.capability)?.state).toBe(c.state);
  const p = await q.execute('query-migrate-parameters');
  expect({ bw: p['max-bandwidth'], dl: p['downtime-limit'] }).toEqual({ bw: saved.parameters['max-bandwidth'], dl: saved.parameters['downtime-limit'] });
  expect(did).toContain('restored the migration capabilities and parameters');
}, 60_000);
