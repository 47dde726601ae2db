/**
 * migrate-vm's exit code and last line follow the engine's outcome. Defect 10: before, every
 * guestOn 'destination' error was reported as a hydration failure (exit 4), also in pre-copy.
 */
import { describe, expect, test } from 'vitest';
import { EXIT, exitCodeOf, whereIsTheGuest } from '../../../src/cli/migrate-vm.js';
import { classifyFailure, outcomeOfError } from '../../../src/engine/outcome.js';
import { MigrationError } from '../../../src/engine/types.js';

const failure = (code: string, at: Parameters<typeof classifyFailure>[1]): MigrationError => {
  const first = new MigrationError(code, code, { phase: 'confirm' });
  return new MigrationError(code, code, { phase: 'confirm', outcome: classifyFailure(first, at) });
};

describe('migrate-vm outcome', () => {
  test('defect 10: a pre-copy failure after cont is not reported as a hydration failure', () => {
    const o = outcomeOfError(failure('DESTINATION_STATE', { pastNoReturn: true, mode: 'precopy', source: 'other' }));
    expect(exitCodeOf(o)).not.toBe(EXIT.hydrationFailed);
    expect(whereIsTheGuest(o)).not.toMatch(/hydrat/);
  });

  test('lazy: a failure after cont keeps the source up (exit 4)', () => {
    const o = outcomeOfError(failure('HYDRATION_FAILED', { pastNoReturn: true, mode: 'lazy', source: 'other' }));
    expect(o.kind).toBe('onDestinationNeedsSource');
    expect(exitCodeOf(o)).toBe(EXIT.hydrationFailed);
  });

  test.each([
    ['as-before', 'rolledBack', EXIT.rolledBack],
    ['gone', 'sourceDied', EXIT.sourceDied],
    ['unreachable', 'uncertain', EXIT.uncertain],
  ] as const)('before the point of no return, a source %s after rollback: %s', (source, kind, exit) => {
    const o = outcomeOfError(failure('MIRROR_FAILED', { pastNoReturn: false, mode: 'precopy', source }));
    expect(o.kind).toBe(kind);
    expect(exitCodeOf(o)).toBe(exit);
  });

  test('a cancel that rolled back exits 130; a refused input exits 2; a cont without answer stays uncertain', () => {
    expect(exitCodeOf(outcomeOfError(new MigrationError('CANCELLED', 'x', { phase: 'ram' }), true))).toBe(EXIT.cancelled);
    expect(exitCodeOf(outcomeOfError(new MigrationError('PREFLIGHT_REFUSED', 'x', { phase: 'preflight', userError: true })))).toBe(EXIT.badInput);
    const uncertain = new MigrationError('SWITCHOVER_UNCERTAIN', 'x', { phase: 'confirm', outcome: 'uncertain' });
    expect(classifyFailure(uncertain, { pastNoReturn: true, mode: 'lazy', source: 'other' })).toBe('uncertain');
  });
});
