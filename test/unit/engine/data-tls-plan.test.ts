import { describe, expect, test } from 'vitest';
import { planDataTls, type SideDataTls } from '../../../src/engine/data-tls-plan.js';

const can = (address: string, mode: SideDataTls['mode'] = 'preferred'): SideDataTls => ({ mode, identity: `CN=${address}`, names: [address], qemuMissing: [], address });
const noCert: SideDataTls = { mode: 'off', identity: null, names: [], qemuMissing: [], address: '10.0.0.2' };

describe('planDataTls', () => {
  test('both sides can: TLS when preferred or required, plain when off', () => {
    expect(planDataTls('preferred', can('10.0.0.1'), can('10.0.0.2'))).toEqual({ encrypted: true, source: { identity: 'CN=10.0.0.1', hostname: '10.0.0.1' }, destination: { identity: 'CN=10.0.0.2', hostname: '10.0.0.2' } });
    expect(planDataTls('required', can('10.0.0.1'), can('10.0.0.2')).encrypted).toBe(true);
    expect(planDataTls('off', can('10.0.0.1'), can('10.0.0.2'))).toEqual({ encrypted: false, reason: 'data TLS off for this migration' });
  });

  test('a side that requires it wins over off', () => {
    expect(planDataTls('off', can('10.0.0.1'), can('10.0.0.2', 'required')).encrypted).toBe(true);
    expect(() => planDataTls('off', can('10.0.0.1', 'required'), noCert)).toThrow(/the source host requires TLS on the data path, but the destination has no data-path certificate/);
  });

  test('required and a side cannot: refused in preflight as a user error, naming why', () => {
    const err = (() => {
      try {
        planDataTls('required', { ...can('10.0.0.1'), qemuMissing: ['nbd-server-start tls-creds/tls-authz'] }, can('10.0.0.2'));
      } catch (e) {
        return e;
      }
    })();
    expect(err).toMatchObject({ code: 'DATA_TLS_UNAVAILABLE', userError: true, message: expect.stringMatching(/the source's QEMU lacks nbd-server-start/) });
    expect(() => planDataTls('required', can('10.0.0.1'), { ...can('10.0.0.9'), address: '10.0.0.2' })).toThrow(/not valid for its migration address 10.0.0.2 \(it names 10.0.0.9\)/);
  });

  test('preferred and a side cannot: plain, and the plan says why', () => {
    expect(planDataTls('preferred', can('10.0.0.1'), noCert)).toEqual({ encrypted: false, reason: 'the destination has no data-path certificate (dataTls off)' });
  });
});
