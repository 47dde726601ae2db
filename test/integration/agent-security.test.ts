/**
 * A hostile caller with a valid token of an ordinary principal, against one real ferry-agent and
 * real QEMUs on loopback: each hole found by probing (issue 14) is refused, nothing changes on
 * disk, and the agent answers normally afterwards.
 */
import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { IMAGE_DIR, loadGuestImage } from '../../src/guest/image.js';
import { QmpCommandError, type QmpClient } from '../../src/qmp/index.js';
import { cleanupAll, killPids, makeDisk, makeTempDir } from '../helpers/guest.js';

const TOKEN_A = 'token-of-alice-0123456789';
const TOKEN_B = 'token-of-bob-0123456789ab';
let agent: RunningAgent;
let root: string;
/** Outside the storage root: nothing may ever appear or change here. */
let outside: string;
const pids: number[] = [];
const clients: AgentClient[] = [];

beforeEach(async () => {
  const top = await makeTempDir('ferry-agent-sec-');
  root = join(top, 'root');
  outside = join(top, 'outside');
  await mkdir(root);
  await mkdir(outside);
  await writeFile(join(outside, 'secret'), 'do not touch\n');
  agent = await startAgent({ name: 'hostS', listenPort: 0, storageRoot: root, bootRoots: [IMAGE_DIR], tokens: { [TOKEN_A]: 'alice', [TOKEN_B]: 'bob' }, portRange: [32000, 32999] });
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await agent.close();
  killPids(pids);
  await cleanupAll();
});

async function connect(token: string): Promise<AgentClient> {
  const c = await AgentClient.connect(agent.url, token);
  clients.push(c);
  return c;
}

async function guestSpec(name: string, extra: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
  const image = await loadGuestImage();
  await mkdir(join(root, name), { recursive: true });
  const disk = join(root, name, 'd0.qcow2');
  if (!existsSync(disk)) await makeDisk(disk, { id: 'd0', format: 'qcow2', size: 16 << 20 });
  return { name, memoryMiB: 64, disks: [{ id: 'd0', path: disk, format: 'qcow2' }], boot: { kernel: image.kernel, initrd: image.initrd, append: 'console=ttyS0 quiet' }, runDir: join(root, name, 'run'), ...extra };
}

/** A running VM of alice's, and a QMP session to it through the agent's tunnel. */
async function runningSource(c: AgentClient): Promise<{ vmId: string; qmp: QmpClient }> {
  await c.call('vm.create', { spec: await guestSpec('src') });
  const { vmId, pid } = (await c.call('vm.start', { name: 'src' })) as { vmId: string; pid: number };
  pids.push(pid);
  return { vmId, qmp: await c.openQmp(vmId) };
}

async function refusedQmp(qmp: QmpClient, command: string, args: Record<string, unknown>): Promise<string> {
  const err = await qmp.executeRaw(command, args).catch((e: unknown) => e);
  expect(err, `${command} ${JSON.stringify(args)}`).toBeInstanceOf(QmpCommandError);
  const message = (err as Error).message;
  expect(message).toMatch(/QMP_REFUSED/);
  return message;
}

async function expectHealthy(c: AgentClient): Promise<void> {
  expect(await c.call('host.info')).toMatchObject({ name: 'hostS' });
  expect(await readFile(join(outside, 'secret'), 'utf8')).toBe('do not touch\n');
  expect(await readdir(outside)).toEqual(['secret']);
}

describe('the QMP tunnel checks arguments, not only command names', () => {
  test("migrate to exec:, unix: or fd: is refused, and no shell runs", async () => {
    const alice = await connect(TOKEN_A);
    const { qmp } = await runningSource(alice);
    const pwned = join(outside, 'pwned');
    for (const uri of [`exec:id > ${pwned}`, `unix:${join(outside, 'sock')}`, 'fd:3', 'tcp:localhost:4444', 'rdma:127.0.0.1:4444', 'tcp:127.0.0.1:4444,exec:x']) {
      await refusedQmp(qmp, 'migrate', { uri });
    }
    await refusedQmp(qmp, 'migrate', { uri: 'tcp:127.0.0.1:4444', blk: true });
    await new Promise((r) => setTimeout(r, 500));
    expect(existsSync(pwned)).toBe(false);
    expect((await qmp.execute('query-migrate')).status).toBeUndefined();
    expect((await qmp.execute('query-status')).status).toBe('running');
    await qmp.close();
    await expectHealthy(alice);
  });

  test('a file blockdev, a writable export of the source, and the other dangerous commands are refused', async () => {
    const alice = await connect(TOKEN_A);
    const { qmp } = await runningSource(alice);
    await refusedQmp(qmp, 'blockdev-add', { driver: 'file', 'node-name': 'ferry-nbd-d0', filename: join(outside, 'secret') });
    await refusedQmp(qmp, 'blockdev-add', { driver: 'nbd', 'node-name': 'ferry-nbd-d0', server: { type: 'unix', path: '/run/x.sock' }, export: 'ferry-1-d0' });
    await refusedQmp(qmp, 'blockdev-add', { driver: 'nbd', 'node-name': 'ferry-nbd-d0', server: { type: 'inet', host: '127.0.0.1', port: '1' }, export: 'ferry-1-d0', 'tls-creds': 'x' });
    // The source's own export, read-only only, only of its disk nodes, only on its own address.
    await refusedQmp(qmp, 'nbd-server-start', { addr: { type: 'inet', data: { host: '0.0.0.0', port: '32001' } } });
    await refusedQmp(qmp, 'nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: '10809' } } });
    await refusedQmp(qmp, 'nbd-server-start', { addr: { type: 'unix', data: { path: join(outside, 'nbd.sock') } } });
    await qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: '32002' } } });
    await refusedQmp(qmp, 'block-export-add', { type: 'nbd', id: 'ferry-1-d0', 'node-name': 'disk-d0', name: 'ferry-1-d0', writable: true });
    await refusedQmp(qmp, 'block-export-add', { type: 'nbd', id: 'ferry-1-d0', 'node-name': 'file-d0', name: 'ferry-1-d0', writable: false });
    await qmp.execute('nbd-server-stop');
    for (const [cmd, args] of [
      ['human-monitor-command', { 'command-line': 'info status' }],
      ['object-add', { 'qom-type': 'secret', id: 's', data: 'x' }],
      ['chardev-add', { id: 'c', backend: { type: 'file', data: { out: join(outside, 'chardev') } } }],
      ['getfd', { fdname: 'x' }],
      ['add-fd', {}],
      ['device_add', { driver: 'virtio-blk-pci' }],
      ['blockdev-create', { 'job-id': 'x', options: { driver: 'file', filename: join(outside, 'new'), size: 0 } }],
      ['dump-guest-memory', { paging: false, protocol: `file:${join(outside, 'dump')}` }],
      ['blockdev-mirror', { 'job-id': 'ferry-mirror-d0', device: 'disk-d0', target: 'disk-d0', sync: 'full' }],
    ] as const) {
      await refusedQmp(qmp, cmd, args);
    }
    const oob = await qmp.executeRaw('query-status').then(() => 'ok');
    expect(oob).toBe('ok');
    expect((await qmp.execute('query-named-block-nodes', { flat: true })).map((n) => n['node-name']).sort()).toEqual(['disk-d0', 'file-d0']);
    await qmp.close();
    await expectHealthy(alice);
  });

  test("the destination's incoming port and NBD server only on the agent's own address and range", async () => {
    const alice = await connect(TOKEN_A);
    const spec = await guestSpec('dst');
    const disk = join(root, 'dst', 'in.qcow2');
    await alice.call('dest.createDisk', { path: disk, format: 'qcow2', virtualSize: 16 << 20 });
    const { vmId, pid } = (await alice.call('dest.start', { spec: { ...spec, disks: [{ id: 'd0', path: disk, format: 'qcow2' }] } })) as { vmId: string; pid: number };
    pids.push(pid);
    const qmp = await alice.openQmp(vmId);
    await refusedQmp(qmp, 'migrate-incoming', { uri: `exec:cat > ${join(outside, 'x')}` });
    await refusedQmp(qmp, 'migrate-incoming', { uri: 'tcp:0.0.0.0:32005' });
    await refusedQmp(qmp, 'migrate-incoming', { uri: 'tcp:127.0.0.1:4444' });
    await refusedQmp(qmp, 'nbd-server-start', { addr: { type: 'inet', data: { host: '127.0.0.1', port: '10809' } } });
    await refusedQmp(qmp, 'quit', {});
    expect((await qmp.execute('query-status')).status).toBe('inmigrate');
    await qmp.close();
    await alice.call('dest.abandon', { vmId });
    await expectHealthy(alice);
  });
});

describe('specs from the API name no raw QEMU option and no path outside what is theirs', () => {
  test('extraArgs is refused: no -pidfile written outside the root', async () => {
    const alice = await connect(TOKEN_A);
    const pidfile = join(outside, 'qemu.pid');
    await expect(alice.call('vm.create', { spec: await guestSpec('x', { extraArgs: ['-pidfile', pidfile] }) })).rejects.toMatchObject({ code: 'EXTRA_ARGS_REFUSED' });
    await expect(alice.call('dest.start', { spec: await guestSpec('y', { extraArgs: ['-chardev', 'file,id=c,path=/tmp/x'] }) })).rejects.toMatchObject({ code: 'EXTRA_ARGS_REFUSED' });
    expect(await alice.call('vm.list')).toEqual([]);
    expect(existsSync(pidfile)).toBe(false);
    await expectHealthy(alice);
  });

  test("a run dir that is the root, or holds another VM's files, is refused; vm.delete removes nothing of others'", async () => {
    const alice = await connect(TOKEN_A);
    const bob = await connect(TOKEN_B);
    await alice.call('vm.create', { spec: await guestSpec('a1') });
    const aliceDisk = join(root, 'a1', 'd0.qcow2');
    // The storage root itself, the folder holding alice's VM, and alice's own run dir.
    for (const runDir of [root, join(root, 'a1'), join(root, 'a1', 'run'), join(root, 'a1', 'run', 'deeper')]) {
      const err = await bob.call('vm.create', { spec: { ...(await guestSpec('b1')), runDir } }).catch((e: unknown) => e);
      expect(err, runDir).toMatchObject({ code: expect.stringMatching(/^(PATH_REFUSED|RUNDIR_REFUSED|NOT_YOURS)$/) });
    }
    // A run dir holding the VM's own disk would be deleted with it.
    await expect(bob.call('vm.create', { spec: { ...(await guestSpec('b2')), runDir: join(root, 'b2') } })).rejects.toMatchObject({ code: 'RUNDIR_REFUSED' });
    expect(await bob.call('vm.list')).toEqual([]);
    // Bob's own VM elsewhere is fine, and deleting it leaves alice's disk alone.
    await bob.call('vm.create', { spec: await guestSpec('b3') });
    await bob.call('vm.delete', { name: 'b3', removeDisks: true });
    expect(existsSync(aliceDisk)).toBe(true);
    expect((await readdir(root)).sort()).toEqual(['.ferry-agent', 'a1', 'b1', 'b2', 'b3']);
    await expectHealthy(alice);
  });

  test("another principal's disks and VMs: dest.createDisk, dest.removeDisk, dest.start, vm.* all refused", async () => {
    const alice = await connect(TOKEN_A);
    const bob = await connect(TOKEN_B);
    const { vmId } = await runningSource(alice);
    const aliceDisk = join(root, 'src', 'd0.qcow2');
    const before = await readFile(aliceDisk);
    await expect(bob.call('dest.removeDisk', { path: aliceDisk })).rejects.toMatchObject({ code: 'NOT_YOURS' });
    await expect(bob.call('dest.createDisk', { path: aliceDisk, format: 'raw', virtualSize: 1 << 20 })).rejects.toMatchObject({ code: 'NOT_YOURS' });
    await expect(bob.call('dest.createDisk', { path: join(root, 'src', 'run', 'x.raw'), format: 'raw', virtualSize: 1 << 20 })).rejects.toMatchObject({ code: 'NOT_YOURS' });
    // Alice's own running disk cannot be removed from under her VM either.
    await expect(alice.call('dest.removeDisk', { path: aliceDisk })).rejects.toMatchObject({ code: 'PATH_IN_USE' });
    // A disk made for alice, then used by bob's incoming VM.
    const made = join(root, 'm', 'd0.qcow2');
    await alice.call('dest.createDisk', { path: made, format: 'qcow2', virtualSize: 16 << 20 });
    const bobSpec = { ...(await guestSpec('bobvm')), disks: [{ id: 'd0', path: made, format: 'qcow2' }] };
    await expect(bob.call('dest.start', { spec: bobSpec })).rejects.toMatchObject({ code: 'NOT_YOURS' });
    await expect(bob.call('vm.create', { spec: bobSpec })).rejects.toMatchObject({ code: 'NOT_YOURS' });
    // An existing file nobody made through the API is no destination disk either.
    await makeDisk(join(root, 'loose.qcow2'), { id: 'd0', format: 'qcow2', size: 16 << 20 });
    await expect(bob.call('dest.start', { spec: { ...bobSpec, disks: [{ id: 'd0', path: join(root, 'loose.qcow2'), format: 'qcow2' }] } })).rejects.toMatchObject({ code: 'NOT_YOURS' });
    for (const [method, params] of [
      ['dest.kill', { vmId }],
      ['dest.abandon', { vmId }],
      ['vm.retire', { vmId, timeoutMs: 1000, removeDisks: true }],
      ['vm.nbdBytesSent', { vmId, localPort: 32001 }],
      ['vm.stop', { name: 'src' }],
      ['vm.delete', { name: 'src', removeDisks: true }],
    ] as const) {
      await expect(bob.call(method, params), method).rejects.toMatchObject({ code: 'VM_NOT_FOUND' });
    }
    await expect(bob.call('vm.list', { all: true })).rejects.toMatchObject({ code: 'NOT_ADMIN' });
    await expect(bob.openQmp(vmId)).rejects.toThrow(/HTTP 404/);
    expect((await readFile(aliceDisk)).equals(before)).toBe(true);
    expect(existsSync(made)).toBe(true);
    expect(await alice.call('vm.list')).toEqual([expect.objectContaining({ vmId, running: true })]);
    await expectHealthy(alice);
  });

  test('dangling and swapped symbolic links inside the root are refused at the door and at use', async () => {
    const alice = await connect(TOKEN_A);
    await mkdir(join(root, 'l'));
    // A dangling link: the old check resolved its parent and created the image outside.
    await symlink(join(outside, 'created-outside.raw'), join(root, 'l', 'dangling.raw'));
    await expect(alice.call('dest.createDisk', { path: join(root, 'l', 'dangling.raw'), format: 'raw', virtualSize: 1 << 20 })).rejects.toMatchObject({ code: 'PATH_REFUSED' });
    expect(existsSync(join(outside, 'created-outside.raw'))).toBe(false);
    // A folder link to outside.
    await symlink(outside, join(root, 'l', 'dir'));
    await expect(alice.call('dest.createDisk', { path: join(root, 'l', 'dir', 'x.raw'), format: 'raw', virtualSize: 1 << 20 })).rejects.toMatchObject({ code: 'PATH_REFUSED' });
    // Swapped after the check: vm.create sees a real file, vm.start finds a link in its place.
    await alice.call('vm.create', { spec: await guestSpec('sw') });
    const disk = join(root, 'sw', 'd0.qcow2');
    await rename(disk, join(root, 'sw', 'moved.qcow2'));
    await makeDisk(join(outside, 'target.qcow2'), { id: 'd0', format: 'qcow2', size: 16 << 20 });
    await symlink(join(outside, 'target.qcow2'), disk);
    await expect(alice.call('vm.start', { name: 'sw' })).rejects.toMatchObject({ code: 'PATH_REFUSED' });
    expect(await alice.call('vm.list')).toEqual([expect.objectContaining({ name: 'sw', running: false })]);
    // The run dir swapped for a link: vm.delete refuses to remove through it.
    await mkdir(join(outside, 'rundir'));
    await writeFile(join(outside, 'rundir', 'keep'), 'x');
    await symlink(join(outside, 'rundir'), join(root, 'sw', 'run'));
    await expect(alice.call('vm.delete', { name: 'sw', removeDisks: false })).rejects.toMatchObject({ code: 'PATH_REFUSED' });
    expect(existsSync(join(outside, 'rundir', 'keep'))).toBe(true);
    expect((await readdir(outside)).sort()).toEqual(['rundir', 'secret', 'target.qcow2']);
    expect(await alice.call('host.info')).toMatchObject({ name: 'hostS' });
  });

  test('kernel and initrd only from the storage root or a configured boot root', async () => {
    const alice = await connect(TOKEN_A);
    const spec = await guestSpec('k');
    await expect(alice.call('vm.create', { spec: { ...spec, boot: { kernel: join(outside, 'secret') } } })).rejects.toMatchObject({ code: 'PATH_REFUSED' });
    await expect(alice.call('vm.create', { spec: { ...spec, boot: { kernel: (spec.boot as { kernel: string }).kernel, initrd: '/etc/shadow' } } })).rejects.toMatchObject({ code: 'PATH_REFUSED' });
    expect(await alice.call('vm.list')).toEqual([]);
  });
});
