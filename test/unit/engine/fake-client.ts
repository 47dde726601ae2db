/** A QmpClient on a FakeQmp for one test, closed after it (also when the test fails). */
import { afterEach } from 'vitest';
import { QmpClient } from '../../../src/qmp/index.js';
import type { FakeQmp } from '../qmp/fake-qmp.js';

export function fakeClients(): (fake: FakeQmp) => Promise<QmpClient> {
  const open: QmpClient[] = [];
  afterEach(async () => {
    for (const c of open.splice(0)) await c.close();
  });
  return async (fake) => {
    const c = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 2_000 });
    open.push(c);
    return c;
  };
}
