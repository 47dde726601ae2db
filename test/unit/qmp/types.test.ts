/**
 * Compile-time checks of the typed API (tsc reads this file; `@ts-expect-error` fails the
 * typecheck if the line it guards ever compiles), plus the runtime guards they rely on.
 */
import { describe, expect, expectTypeOf, it } from 'vitest';
import { eventIs, isEvent, type QmpClient, type QmpEvent, type QueryMigrateReturn, type StatusInfo } from '../../../src/qmp/index.js';

// Never called: only type-checked.
function typeChecks(qmp: QmpClient): void {
  void qmp.execute('query-status');
  void qmp.execute('query-status', undefined, { timeoutMs: 5 });
  void qmp.execute('query-named-block-nodes', { flat: true });
  void qmp.execute('blockdev-mirror', { device: 'a', target: 'b', sync: 'full', 'copy-mode': 'write-blocking' }, { signal: AbortSignal.timeout(1) });
  // @ts-expect-error blockdev-mirror needs its arguments
  void qmp.execute('blockdev-mirror');
  // @ts-expect-error sync is an enum
  void qmp.execute('blockdev-mirror', { device: 'a', target: 'b', sync: 'everything' });
  // @ts-expect-error query-status takes no arguments
  void qmp.execute('query-status', { verbose: true });
  // @ts-expect-error not a typed command (use executeRaw)
  void qmp.execute('query-cpus-fast');
  expectTypeOf(qmp.execute('query-status')).resolves.toEqualTypeOf<StatusInfo>();
  expectTypeOf(qmp.execute('query-migrate')).resolves.toEqualTypeOf<QueryMigrateReturn>();
  void qmp.waitForEvent(isEvent('MIGRATION'), { timeoutMs: 1 }).then((e) => expectTypeOf(e.data.status).toBeString());
}
void typeChecks;

describe('event guards', () => {
  const ts = { seconds: 0, microseconds: 0 };
  it('narrow a known event and reject others', () => {
    const e: QmpEvent = { event: 'JOB_STATUS_CHANGE', data: { id: 'j', status: 'concluded' }, timestamp: ts };
    expect(isEvent('JOB_STATUS_CHANGE')(e) && e.data.status === 'concluded').toBe(true);
    expect(eventIs(e, 'MIGRATION')).toBe(false);
    const other: QmpEvent = { event: 'DEVICE_DELETED', data: {}, timestamp: ts };
    expect(isEvent('JOB_STATUS_CHANGE')(other)).toBe(false);
  });
});
