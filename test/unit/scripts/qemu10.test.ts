import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, expect, test } from 'vitest';
import { systemMirror } from '../../../scripts/qemu10.mjs';

const dirs: string[] = [];
afterEach(async () => {
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
});

/** An /etc/apt look-alike: sources.list text and sources.list.d files. */
async function etc(list: string | undefined, parts: Record<string, string> = {}): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), 'ferry-apt-'));
  dirs.push(d);
  if (list !== undefined) await writeFile(join(d, 'sources.list'), list);
  await mkdir(join(d, 'sources.list.d'));
  for (const [name, text] of Object.entries(parts)) await writeFile(join(d, 'sources.list.d', name), text);
  return d;
}

test('deb822: the stanza whose Suites hold the codename, with its Signed-By (this machine)', async () => {
  const d = await etc(undefined, {
    'debian.sources': [
      'Types: deb',
      '# http://snapshot.debian.org/archive/debian/20250520T000000Z',
      'URIs: http://deb.debian.org/debian',
      'Suites: bookworm bookworm-updates',
      'Components: main',
      'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg',
      '',
      'Types: deb',
      'URIs: http://deb.debian.org/debian-security',
      'Suites: bookworm-security',
      'Components: main',
      '',
    ].join('\n'),
    'nodesource.sources.disabled-by-farm': 'Types: deb\nURIs: https://example.invalid/\nSuites: bookworm\n',
  });
  expect(systemMirror('bookworm', d)).toEqual({
    uri: 'http://deb.debian.org/debian',
    signedBy: '/usr/share/keyrings/debian-archive-keyring.gpg',
    from: join(d, 'sources.list.d', 'debian.sources'),
  });
});

test('one-line format: options, comments, a security line before the main one, deb-src skipped', async () => {
  const d = await etc(
    [
      '# deb http://old.invalid/debian bookworm main',
      'deb http://security.debian.org/debian-security bookworm-security main',
      'deb-src http://src.invalid/debian bookworm main',
      'deb [arch=amd64 signed-by=/etc/apt/keyrings/mirror.gpg] http://mirror.example.org/debian/ bookworm main contrib',
    ].join('\n'),
  );
  expect(systemMirror('bookworm', d)).toEqual({ uri: 'http://mirror.example.org/debian', signedBy: '/etc/apt/keyrings/mirror.gpg', from: join(d, 'sources.list') });
});

test('a disabled stanza does not count; no source for the codename is an error naming the folder', async () => {
  const d = await etc('', { 'a.sources': 'Enabled: no\nTypes: deb\nURIs: http://a.invalid/debian\nSuites: bookworm\n' });
  expect(() => systemMirror('bookworm', d)).toThrow(`no apt source in ${d}/sources.list(.d) has suite 'bookworm'`);
});
