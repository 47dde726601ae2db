import { chmod, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QmpClient, type SchemaInfo, type VersionInfo } from '../../../src/qmp/index.js';
import { ferryCacheDir } from '../../../src/host/cache-dir.js';
import { diskSchemaCache, layeredSchemaCache, memorySchemaCache, noSchemaCache, schemaCacheFile, schemaCacheKey, type SchemaCache } from '../../../src/qmp/schema-cache.js';
import { FakeQmp, loadTranscript, type TranscriptLine } from './fake-qmp.js';

const DEBIAN_72: VersionInfo = { qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u18+b3' };
const OTHER_72: VersionInfo = { qemu: { major: 7, minor: 2, micro: 22 }, package: 'Debian 1:7.2+dfsg-7+deb12u17' };
const HAND_BUILT: VersionInfo = { qemu: { major: 7, minor: 2, micro: 22 }, package: '' };
const SCHEMA: SchemaInfo[] = [
  { name: 'query-status', 'meta-type': 'command', 'arg-type': '0', 'ret-type': '1' },
  { name: 'SHUTDOWN', 'meta-type': 'event', 'arg-type': '2' },
];

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-schema-cache-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('schemaCacheKey', () => {
  it('names a build by its version triple and package, and no build without a package', () => {
    expect(schemaCacheKey(DEBIAN_72)).toBe('7.2.22 Debian 1:7.2+dfsg-7+deb12u18+b3');
    expect(schemaCacheKey(OTHER_72)).not.toBe(schemaCacheKey(DEBIAN_72));
    expect(schemaCacheKey(HAND_BUILT)).toBeUndefined();
    expect(schemaCacheKey({ ...HAND_BUILT, package: '  ' })).toBeUndefined();
  });

  it('defaults to $XDG_CACHE_HOME/ferry, ignoring a relative one', () => {
    expect(ferryCacheDir({ XDG_CACHE_HOME: '/var/cache/u' })).toBe('/var/cache/u/ferry');
    expect(ferryCacheDir({ XDG_CACHE_HOME: 'rel' })).toMatch(/\/\.cache\/ferry$/);
    expect(ferryCacheDir({})).toMatch(/\/\.cache\/ferry$/);
  });
});

describe('diskSchemaCache', () => {
  it('misses, then hits with what was put, in a 0600 file under a 0700 dir', async () => {
    const cacheDir = join(dir, 'ferry');
    const cache = diskSchemaCache(cacheDir);
    expect(await cache.get(DEBIAN_72)).toBeUndefined();
    await cache.put(DEBIAN_72, SCHEMA);
    expect(await cache.get(DEBIAN_72)).toEqual(SCHEMA);
    // A fresh cache over the same dir (the next migrate-vm process) reads the file.
    expect(await diskSchemaCache(cacheDir).get(DEBIAN_72)).toEqual(SCHEMA);
    expect((await stat(cacheDir)).mode & 0o777).toBe(0o700);
    const files = await readdir(cacheDir);
    expect(files).toHaveLength(1);
    expect((await stat(join(cacheDir, files[0]!))).mode & 0o777).toBe(0o600);
  });

  it('never remembers a build without a package', async () => {
    const cache = diskSchemaCache(dir);
    expect(cache.remembers(HAND_BUILT)).toBe(false);
    await cache.put(HAND_BUILT, SCHEMA);
    expect(await readdir(dir)).toEqual([]);
    expect(await cache.get(HAND_BUILT)).toBeUndefined();
  });

  it("does not answer one build with another's schema", async () => {
    const cache = diskSchemaCache(dir);
    await cache.put(OTHER_72, SCHEMA);
    expect(await cache.get(DEBIAN_72)).toBeUndefined();
    // An entry of another build under this build's file name (a hash collision, a copied file) is ignored.
    const mine = schemaCacheFile(dir, DEBIAN_72)!;
    const theirs = schemaCacheFile(dir, OTHER_72)!;
    await writeFile(mine, await readFile(theirs, 'utf8'), { mode: 0o600 });
    expect(await cache.get(DEBIAN_72)).toBeUndefined();
    expect(await cache.get(OTHER_72)).toEqual(SCHEMA);
  });

  it('ignores a corrupt or malformed entry, and the next put replaces it', async () => {
    const cache = diskSchemaCache(dir);
    const file = schemaCacheFile(dir, DEBIAN_72)!;
    const good = JSON.stringify({ format: 1, qemu: DEBIAN_72.qemu, package: DEBIAN_72.package, schema: SCHEMA });
    for (const bad of [good.slice(0, good.length / 2), '', 'null', JSON.stringify({ format: 2, qemu: DEBIAN_72.qemu, package: DEBIAN_72.package, schema: SCHEMA }), JSON.stringify({ format: 1, qemu: DEBIAN_72.qemu, package: DEBIAN_72.package, schema: [{ name: 1 }] })]) {
      await writeFile(file, bad, { mode: 0o600 });
      expect(await cache.get(DEBIAN_72)).toBeUndefined();
    }
    await cache.put(DEBIAN_72, SCHEMA);
    expect(await cache.get(DEBIAN_72)).toEqual(SCHEMA);
  });

  it('does not trust an entry others can write', async () => {
    const cache = diskSchemaCache(dir);
    await cache.put(DEBIAN_72, SCHEMA);
    await chmod(schemaCacheFile(dir, DEBIAN_72)!, 0o666);
    expect(await cache.get(DEBIAN_72)).toBeUndefined();
  });

  it('a cache that cannot write only stays empty', async () => {
    const blocked = join(dir, 'file');
    await writeFile(blocked, '');
    const cache = diskSchemaCache(join(blocked, 'ferry'));
    await expect(cache.put(DEBIAN_72, SCHEMA)).resolves.toBeUndefined();
    expect(await cache.get(DEBIAN_72)).toBeUndefined();
  });
});

describe('layeredSchemaCache', () => {
  it('reads the file once, then from memory', async () => {
    await diskSchemaCache(dir).put(DEBIAN_72, SCHEMA);
    const cache = layeredSchemaCache(diskSchemaCache(dir));
    expect(await cache.get(DEBIAN_72)).toEqual(SCHEMA);
    await rm(schemaCacheFile(dir, DEBIAN_72)!);
    expect(await cache.get(DEBIAN_72)).toEqual(SCHEMA);
  });
});

/**
 * A fake QEMU of the recorded 7.2 session that answers each command from the transcript in any
 * order (a cache lookup may let query-migrate-capabilities out first) and counts what was asked.
 */
function fakeQemu(greetingPackage: string): FakeQmp {
  const t: TranscriptLine[] = loadTranscript('schema-full');
  const greeting = t[0]!.msg as { QMP: { version: VersionInfo } };
  const replies = new Map<string, Record<string, unknown>>();
  for (let i = 1; i < t.length; i++) {
    const sent = t[i]!;
    const reply = t[i + 1];
    if (sent.dir === 'send' && reply?.dir === 'recv') replies.set(String(sent.msg.execute), reply.msg);
  }
  const fake = new FakeQmp();
  fake.onMessage((m) => {
    const r = replies.get(String(m.execute));
    fake.send(r ? { ...r, id: m.id } : { error: { class: 'CommandNotFound', desc: `fake: ${String(m.execute)}` }, id: m.id });
  });
  fake.send({ QMP: { ...greeting.QMP, version: { ...greeting.QMP.version, package: greetingPackage } } });
  return fake;
}

const asked = (fake: FakeQmp, command: string): number => fake.received.filter((m) => m.execute === command).length;

async function probeWith(cache: SchemaCache, pkg = DEBIAN_72.package): Promise<{ fake: FakeQmp; commands: boolean; caps: boolean }> {
  const fake = fakeQemu(pkg);
  const qmp = await QmpClient.connect({ stream: fake.clientEnd }, { timeoutMs: 2_000, schemaCache: cache });
  try {
    const caps = await qmp.probeCapabilities({ timeoutMs: 2_000 });
    return { fake, commands: caps.hasCommand('blockdev-mirror'), caps: caps.migrationCapabilities.has('pause-before-switchover') };
  } finally {
    await qmp.close();
  }
}

describe('QmpClient.probeCapabilities through a schema cache', () => {
  it('probes the schema on a miss, and not again for the same build', async () => {
    const cache = diskSchemaCache(dir);
    const first = await probeWith(cache);
    expect(asked(first.fake, 'query-qmp-schema')).toBe(1);
    const second = await probeWith(diskSchemaCache(dir));
    expect(asked(second.fake, 'query-qmp-schema')).toBe(0);
    // Same answers from the remembered schema; the migration capabilities are still asked.
    expect(second).toMatchObject({ commands: true, caps: true });
    expect(asked(second.fake, 'query-migrate-capabilities')).toBe(1);
  });

  it('probes every session of a build without a package, and of another build', async () => {
    const cache = memorySchemaCache();
    for (let i = 0; i < 2; i++) expect(asked((await probeWith(cache, '')).fake, 'query-qmp-schema')).toBe(1);
    await probeWith(cache);
    expect(asked((await probeWith(cache, OTHER_72.package)).fake, 'query-qmp-schema')).toBe(1);
    expect(asked((await probeWith(cache)).fake, 'query-qmp-schema')).toBe(0);
  });

  it('re-probes when the entry on disk is corrupt, and repairs it', async () => {
    await probeWith(diskSchemaCache(dir));
    await writeFile(schemaCacheFile(dir, DEBIAN_72)!, '{"format":1,', { mode: 0o600 });
    expect(asked((await probeWith(diskSchemaCache(dir))).fake, 'query-qmp-schema')).toBe(1);
    expect(asked((await probeWith(diskSchemaCache(dir))).fake, 'query-qmp-schema')).toBe(0);
  });

  it('remembers nothing unless an entry point chose a cache', async () => {
    for (let i = 0; i < 2; i++) expect(asked((await probeWith(noSchemaCache)).fake, 'query-qmp-schema')).toBe(1);
  });
});
