/**
 * The web view in a real browser: Debian's chromium, headless, driven by puppeteer-core, against
 * the scheduler service over two real agents on loopback and two writing guests on host A. The
 * page opens with its token in the URL fragment, a drain asked for and then declined changes
 * nothing, a confirmed drain shows both migrations progress (bytes, rate, ETA) live over the
 * WebSocket to the end, with their downtime; a click shows a journal; the hosts follow.
 * On failure a screenshot goes to test-output/web-view-failure.png. FERRY_WEB_SCREENSHOT=PATH
 * also saves one mid-drain (that is how docs/web-view.png is made).
 */
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { afterAll, beforeAll, expect, test } from 'vitest';
import { AgentClient } from '../../src/agent/client.js';
import { startAgent, type RunningAgent } from '../../src/agent/server.js';
import { IMAGE_DIR } from '../../src/guest/image.js';
import { highestAcks } from '../../src/guest/serial.js';
import { startSchedulerService, type RunningScheduler } from '../../src/scheduler/service.js';
import { agentGuestSpec, cleanupAll, killPids, makeTempDir } from '../helpers/guest.js';

const REPO = resolve(import.meta.dirname, '../..');
const CHROMIUM = '/usr/bin/chromium';
const AGENT_TOKEN = 'agent-token-for-the-scheduler-0123';
const API_TOKEN = 'operator-token-0123456789abcdef';
const VMS = ['web1', 'web2'];
const agents: Record<string, RunningAgent> = {};
const roots: Record<string, string> = {};
const pids: number[] = [];
let svc: RunningScheduler;
let browser: Browser | undefined;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const acksIn = async (path: string): Promise<number> =>
  highestAcks((await readFile(path, 'utf8').catch(() => '')).split('\n').map((text) => ({ text }))).get('data') ?? -1;

beforeAll(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: run node scripts/bootstrap.mjs --browser (as root it installs Debian's chromium)`);
  for (const [i, h] of ['A', 'B'].entries()) {
    roots[h] = await makeTempDir(`ferry-web-${h}-`);
    agents[h] = await startAgent({ name: h, listenPort: 0, storageRoot: roots[h], bootRoots: [IMAGE_DIR], tokens: { [AGENT_TOKEN]: 'scheduler' }, portRange: [26000 + 500 * i, 26499 + 500 * i] });
  }
  const a = await AgentClient.connect(agents.A!.url, AGENT_TOKEN);
  for (const vm of VMS) {
    const { spec } = await agentGuestSpec(roots.A!, vm, { memoryMiB: 128, diskMiB: 32, fillMiB: 6, rate: 20, tickMs: 100 });
    await a.call('vm.create', { spec });
    pids.push(((await a.call('vm.start', { name: vm })) as { pid: number }).pid);
  }
  a.close();
  for (let i = 0; i < 300; i++) {
    const acks = await Promise.all(VMS.map((vm) => acksIn(join(roots.A!, vm, 'run', 'serial.log'))));
    if (acks.every((n) => n >= 3)) break;
    await sleep(100);
  }
  svc = await startSchedulerService({
    listenPort: 0,
    database: join(await makeTempDir('ferry-web-db-'), 'state.db'),
    hosts: [
      { name: 'A', url: agents.A!.url },
      { name: 'B', url: agents.B!.url },
    ],
    agentToken: AGENT_TOKEN,
    tokens: { [API_TOKEN]: 'ops' },
    // 16 MiB/s out of A, shared by the two migrations: each copy (disk, then RAM) runs for seconds, long enough
    // for the page to show it under way.
    limits: { outgoingPerHost: 2, bandwidthPerHostBytesPerSec: 16 << 20 },
  });
  browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: await makeTempDir('ferry-web-chromium-'),
    // Root (CI) has no user namespace sandbox for chromium; the page is our own, on loopback.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check'],
  });
}, 120_000);

afterAll(async () => {
  await browser?.close().catch(() => {});
  await svc?.close({ graceMs: 0 });
  for (const a of Object.values(agents)) await a.close();
  // Every QEMU of this file, wherever it migrated: the agents' records know their PIDs.
  for (const h of Object.keys(roots)) {
    const dir = join(roots[h]!, '.ferry-agent', 'vms');
    for (const f of await readdir(dir).catch(() => [] as string[])) {
      const rec = JSON.parse(await readFile(join(dir, f), 'utf8').catch(() => '{}')) as { pid?: number };
      if (rec.pid) pids.push(rec.pid);
    }
  }
  killPids(pids);
  await cleanupAll();
}, 60_000);

interface Row {
  id: string;
  vm: string;
  state: string;
  percent: number | null;
  rate: string;
  downtime: string;
}

const rows = (page: Page): Promise<Row[]> =>
  page.$$eval('#migrations tbody tr', (trs) =>
    trs.map((tr) => {
      const p = tr.querySelector('progress');
      return {
        id: tr.getAttribute('data-migration') ?? '',
        vm: tr.getAttribute('data-vm') ?? '',
        state: tr.getAttribute('data-state') ?? '',
        percent: p ? Number(p.getAttribute('data-percent')) : null,
        rate: tr.querySelector('.rate')?.textContent ?? '',
        downtime: tr.querySelector('[data-field="downtime"]')?.textContent ?? '',
      };
    }),
  );

/**
 * A click inside the page, in one step: the page re-renders its rows on every event, so a click
 * by coordinates on a node found a moment before could find it replaced.
 */
async function clickIn(page: Page, selector: string): Promise<void> {
  await page.waitForSelector(selector, { timeout: 10_000 });
  const clicked = await page.evaluate(`(() => { const e = document.querySelector(${JSON.stringify(selector)}); if (!e) return false; e.click(); return true; })()`);
  if (clicked !== true) throw new Error(`nothing to click at ${selector}`);
}

test('without a token the page asks for one; a wrong one is refused, a right one connects', async () => {
  const context = await browser!.createBrowserContext();
  const page = await context.newPage();
  try {
    await page.goto(svc.url.replace(/^ws/, 'http') + '/');
    await page.waitForSelector('#login:not([hidden])', { timeout: 10_000 });
    expect(await page.$eval('#app', (e) => e.hasAttribute('hidden'))).toBe(true);
    await page.type('#token', 'not-a-token-of-this-scheduler');
    await page.click('#login button[type="submit"]');
    await page.waitForFunction(`document.querySelector('#login-error').textContent === 'The scheduler refused that token.'`, { timeout: 10_000 });
    await page.type('#token', API_TOKEN);
    await page.click('#login button[type="submit"]');
    await page.waitForSelector('#status[data-state="live"]', { timeout: 10_000 });
    expect(await page.$eval('#login', (e) => e.hasAttribute('hidden'))).toBe(true);
  } finally {
    await context.close();
  }
}, 60_000);

test('the page shows a drain of two writing guests progress live to the end', async () => {
  const started = performance.now();
  const page = await browser!.newPage();
  const pageErrors: string[] = [];
  page.on('pageerror', (err) => pageErrors.push(String(err)));
  await page.setViewport({ width: 1280, height: 860 });
  try {
    const base = svc.url.replace(/^ws/, 'http');
    await page.goto(`${base}/#token=${encodeURIComponent(API_TOKEN)}`);
    await page.waitForSelector('#status[data-state="live"]', { timeout: 15_000 });
    // The token left the address bar at once (it stays in this tab's sessionStorage).
    expect(page.url()).toBe(`${base}/`);
    await page.waitForFunction(`document.querySelector('[data-host="A"]')?.getAttribute('data-vms') === '2'`, { timeout: 15_000 });
    expect(await page.$$eval('[data-host="A"] li', (lis) => lis.map((l) => l.getAttribute('data-vm')).sort())).toEqual(VMS);

    // Declined: nothing is queued.
    await clickIn(page, '[data-host="A"] [data-action="drain"]');
    await page.waitForSelector('#confirm[open]');
    expect(await page.$eval('#confirm-text', (e) => e.textContent)).toBe('Drain A? Its 2 running VMs will be moved to other hosts.');
    await page.click('#confirm-no');
    await sleep(500);
    expect(await rows(page)).toEqual([]);
    expect(await svc.scheduler.list()).toEqual([]);

    // Confirmed: the drain runs, and the page follows it without a reload.
    await clickIn(page, '[data-host="A"] [data-action="drain"]');
    await page.waitForSelector('#confirm[open]');
    await page.click('#confirm-yes');
    const midway = new Map<string, number[]>();
    const rates = new Set<string>();
    let shot = false;
    let declinedCancel = false;
    let last: Row[] = [];
    const deadline = Date.now() + 100_000;
    while (Date.now() < deadline) {
      last = await rows(page);
      for (const r of last) {
        if (r.state === 'running' && r.percent !== null && r.percent > 0 && r.percent < 100) {
          midway.set(r.vm, [...(midway.get(r.vm) ?? []), r.percent]);
          if (/\/s · ETA /.test(r.rate)) rates.add(r.rate);
        }
      }
      const running = last.find((r) => r.state === 'running');
      if (!declinedCancel && running) {
        // Cancel asks first; declined, the migration runs on.
        await clickIn(page, `tr[data-vm="${running.vm}"] [data-action="cancel"]`);
        await page.waitForSelector('#confirm[open]');
        expect(await page.$eval('#confirm-text', (e) => e.textContent)).toBe(`Cancel the migration of ${running.vm} (A → B)? A running one is rolled back; the guest stays on A.`);
        await page.click('#confirm-no');
        declinedCancel = true;
      }
      if (!shot && process.env.FERRY_WEB_SCREENSHOT && last.length === 2 && last.every((r) => r.state === 'running' && (r.percent ?? 0) >= 25 && !/ 0 B\/s/.test(r.rate))) {
        await clickIn(page, `tr[data-vm="${last[0]!.vm}"]`);
        await sleep(300);
        await page.screenshot({ path: resolve(REPO, process.env.FERRY_WEB_SCREENSHOT) });
        shot = true;
      }
      if (last.length === 2 && last.every((r) => r.state !== 'queued' && r.state !== 'running')) break;
      await sleep(150);
    }
    expect(last.map((r) => [r.vm, r.state]).sort()).toEqual(VMS.map((vm) => [vm, 'succeeded']));
    expect(declinedCancel).toBe(true);
    // Live: each migration was seen part-way, its bar moving, with bytes, a rate and an ETA.
    expect([...midway.keys()].sort()).toEqual(VMS);
    expect([...midway.values()].some((seen) => new Set(seen).size > 1)).toBe(true);
    expect(rates.size).toBeGreaterThan(0);
    expect([...rates][0]).toMatch(/^\d+(\.\d)? (B|KiB|MiB) \/ \d+(\.\d)? (KiB|MiB|GiB) · \d+(\.\d)? (B|KiB|MiB)\/s · ETA /);
    // The downtime comes with the migration's `finished` event, just after its state changed.
    const downtimeDeadline = Date.now() + 10_000;
    while (Date.now() < downtimeDeadline && !last.every((r) => /^\d+ ms$/.test(r.downtime))) {
      await sleep(100);
      last = await rows(page);
    }
    for (const r of last) {
      expect(r.percent).toBe(100);
      expect(r.downtime).toMatch(/^\d+ ms$/);
    }
    // The hosts follow: A is empty, B runs both.
    await page.waitForFunction(`document.querySelector('[data-host="A"]')?.getAttribute('data-vms') === '0' && document.querySelector('[data-host="B"]')?.getAttribute('data-vms') === '2'`, { timeout: 15_000 });
    // A migration's journal on click.
    await clickIn(page, `tr[data-vm="${VMS[0]}"]`);
    await page.waitForFunction(`!document.querySelector('#journal').hidden && document.querySelectorAll('#journal tbody tr').length >= 3`, { timeout: 10_000 });
    const journal = await page.$$eval('#journal tbody tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent ?? '')));
    expect(journal[0]![1]).toBe('queued');
    expect(journal.at(-1)![1]).toBe('succeeded');
    expect(journal.at(-1)![3]).toMatch(/runs on B; .*downtime \d+ ms$/);
    expect(pageErrors).toEqual([]);
  } catch (err) {
    const out = join(REPO, 'test-output');
    await mkdir(out, { recursive: true });
    const path = join(out, 'web-view-failure.png');
    await page.screenshot({ path }).catch(() => {});
    process.stderr.write(`web view test failed: screenshot at ${path}\n`);
    throw err;
  } finally {
    await page.close().catch(() => {});
  }

  // The guests run on B and keep writing there.
  const b = await AgentClient.connect(agents.B!.url, AGENT_TOKEN);
  const onB = (await b.call('vm.list')) as { name: string; role: string; state: string }[];
  b.close();
  expect(onB.map((v) => [v.name, v.role, v.state]).sort()).toEqual(VMS.map((vm) => [vm, 'vm', 'running']));
  for (const vm of VMS) {
    const run = (await readdir(join(roots.B!, vm))).find((f) => f.startsWith('run-'))!;
    const serial = join(roots.B!, vm, run, 'serial.log');
    const first = await acksIn(serial);
    for (let i = 0; i < 50 && (await acksIn(serial)) <= first; i++) await sleep(100);
    expect(await acksIn(serial), `${vm} writes on B`).toBeGreaterThan(first);
  }
  process.stderr.write(`web view test: ${((performance.now() - started) / 1000).toFixed(1)} s from page open to the end\n`);
}, 200_000);
