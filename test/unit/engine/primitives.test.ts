/**
 * The undo steps are idempotent (defect 3 registers them before their side effect, so they may
 * run when the side effect never happened): against a scripted QMP peer, each one asks first and
 * acts only on what is there.
 */
import { describe, expect, test } from 'vitest';
import { cancelAndResumeSource, cancelJob, deleteNode, stopNbdServer, unexport } from '../../../src/engine/primitives.js';
import { FakeQmp } from '../qmp/fake-qmp.js';
import { fakeClients } from './fake-client.js';

/** A peer that answers from `state` and records every command. */
function peer(state: { nodes?: string[]; exports?: string[]; jobs?: { id: string; status: string }[]; nbdRunning?: boolean; migration?: string; status?: string; concludeOnCancel?: boolean }) {
  const fake = new FakeQmp();
  const commands: string[] = [];
  const node = (name: string) => ({ file: '/x', 'node-name': name, ro: false, drv: 'raw', backing_file_depth: 0, encrypted: false, detect_zeroes: 'off', image: { filename: '/x', format: 'raw', 'virtual-size': 1 }, cache: { writeback: true, direct: false, 'no-flush': false }, write_threshold: 0 });
  fake.onMessage((m) => {
    const cmd = String(m.execute);
    commands.push(cmd);
    const ok = (ret: unknown = {}): void => fake.send({ return: ret, id: m.id });
    switch (cmd) {
      case 'qmp_capabilities':
        return ok();
      case 'query-named-block-nodes':
        return ok((state.nodes ?? []).map(node));
      case 'query-block-exports':
        return ok((state.exports ?? []).map((id) => ({ id, type: 'nbd', 'node-name': 'n', 'shutting-down': false })));
      case 'query-jobs':
        return ok((state.jobs ?? []).map((j) => ({ ...j, type: 'mirror', 'current-progress': 0, 'total-progress': 0 })));
      case 'query-migrate':
        return ok(state.migration ? { status: state.migration } : {});
      case 'query-status':
        return ok({ running: state.status === 'running', status: state.status ?? 'running' });
      case 'nbd-server-stop':
        if (!state.nbdRunning) return fake.send({ error: { class: 'GenericError', desc: 'NBD server not running' }, id: m.id });
        state.nbdRunning = false;
        return ok();
      case 'block-job-cancel': {
        // As QEMU answers a job that ended by itself since it was listed.
        const j = (state.jobs ?? []).find((x) => x.id === (m.arguments as { device: string }).device);
        if (j && (state.concludeOnCancel ?? false)) {
          j.status = 'concluded';
          return fake.send({ error: { class: 'GenericError', desc: `Job '${j.id}' in state 'concluded' cannot accept command verb 'cancel'` }, id: m.id });
        }
        return ok();
      }
      case 'job-dismiss':
        state.jobs = (state.jobs ?? []).filter((j) => j.id !== (m.arguments as { id: string }).id);
        return ok();
      default:
        return ok();
    }
  });
  fake.greet();
  return { fake, commands };
}

const connect = fakeClients();

describe('undo steps are idempotent', () => {
  test('deleteNode, unexport, cancelJob: nothing there, nothing sent but the question', async () => {
    const { fake, commands } = peer({});
    const q = await connect(fake);
    await deleteNode(q, 'ferry-nbd-root', 2_000);
    await unexport(q, 'ferry-x-root', 2_000);
    await cancelJob(q, 'ferry-mirror-root', 2_000);
    expect(commands.filter((c) => c !== 'qmp_capabilities')).toEqual(['query-named-block-nodes', 'query-block-exports', 'query-jobs']);
  });

  test('cancelJob: a job that ended by itself between the query and the cancel is dismissed, not an error', async () => {
    const { fake, commands } = peer({ jobs: [{ id: 'ferry-mirror-root', status: 'running' }], concludeOnCancel: true });
    const q = await connect(fake);
    await cancelJob(q, 'ferry-mirror-root', 2_000);
    expect(commands.filter((c) => c !== 'qmp_capabilities')).toEqual(['query-jobs', 'block-job-cancel', 'query-jobs', 'job-dismiss']);
  });

  test('deleteNode and unexport act on what is there', async () => {
    const { fake, commands } = peer({ nodes: ['ferry-nbd-root'], exports: ['ferry-x-root'] });
    const q = await connect(fake);
    await deleteNode(q, 'ferry-nbd-root', 2_000);
    await unexport(q, 'ferry-x-root', 2_000);
    expect(commands).toContain('blockdev-del');
    expect(commands).toContain('block-export-del');
  });

  test('stopNbdServer: a server that is not running is stopped already; run twice, one stop', async () => {
    const { fake, commands } = peer({ nbdRunning: true });
    const q = await connect(fake);
    await stopNbdServer(q, 2_000);
    await stopNbdServer(q, 2_000);
    expect(commands.filter((c) => c === 'nbd-server-stop')).toHaveLength(2);
  });

  test('cancelAndResumeSource: no migration, a guest that was paused stays paused', async () => {
    const { fake, commands } = peer({ status: 'paused' });
    const q = await connect(fake);
    expect(await cancelAndResumeSource(q, { wasRunning: false, targetNodes: [], timeoutMs: 2_000 })).toEqual({ cancelled: false, resumed: false });
    expect(commands).not.toContain('cont');
    expect(commands).not.toContain('migrate_cancel');
  });
});
