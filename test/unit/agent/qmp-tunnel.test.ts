import { describe, expect, test } from 'vitest';
import { DESTINATION_QMP_ALLOWLIST, SOURCE_QMP_ALLOWLIST, tunnelRefusal } from '../../../src/agent/qmp-tunnel.js';

describe('tunnelRefusal', () => {
  test('a source may be asked its machine type, and nothing else through qom-get', () => {
    expect(tunnelRefusal(SOURCE_QMP_ALLOWLIST, { execute: 'query-machines' })).toBeUndefined();
    expect(tunnelRefusal(SOURCE_QMP_ALLOWLIST, { execute: 'qom-get', arguments: { path: '/machine', property: 'type' } })).toBeUndefined();
    for (const args of [
      { path: '/objects/sec0', property: 'data' },
      { path: '/machine', property: 'type', extra: 1 },
      { path: '/machine' },
      'type',
      undefined,
    ]) {
      expect(tunnelRefusal(SOURCE_QMP_ALLOWLIST, { execute: 'qom-get', arguments: args }), JSON.stringify(args)).toMatch(
        /allows 'qom-get' on this VM only with the arguments \{"path":"\/machine","property":"type"\}/,
      );
    }
  });

  test('outside the allowlist, by name, for execute and exec-oob alike', () => {
    expect(tunnelRefusal(DESTINATION_QMP_ALLOWLIST, { execute: 'qom-get', arguments: { path: '/machine', property: 'type' } })).toBe(
      "the agent does not allow 'qom-get' on this VM",
    );
    expect(tunnelRefusal(SOURCE_QMP_ALLOWLIST, { 'exec-oob': 'human-monitor-command' })).toBe("the agent does not allow 'human-monitor-command' on this VM");
    expect(tunnelRefusal(SOURCE_QMP_ALLOWLIST, {})).toBe("the agent does not allow '(none)' on this VM");
    expect(tunnelRefusal(SOURCE_QMP_ALLOWLIST, { execute: 'query-status' })).toBeUndefined();
  });
});
