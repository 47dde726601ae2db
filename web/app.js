// ferry's web view: one ES module, no build step, no dependency. Everything it shows and does
// goes over the scheduler's WebSocket API (/v1, the framing of src/scheduler/protocol.ts); the
// browser cannot set Authorization on a WebSocket, so the token goes in the subprotocol offer
// `ferry.bearer.<base64url>` beside `ferry.v1` (docs/scheduler.md, "Web view"). The token comes
// from the URL fragment (#token=…, never sent to a server, removed from the address bar at once)
// or the login form, and stays in this tab's sessionStorage. No cookie: nothing ambient for
// another site to ride on.

const PROTOCOL_VERSION = 1;
const TOKEN_KEY = 'ferry.token';
const ACTIVE = new Set(['queued', 'running']);

const $ = (sel) => document.querySelector(sel);

/** A DOM element; text goes in as text (never as HTML). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  return e;
}

function bytes(n) {
  if (!Number.isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function duration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '–';
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

function tokenOffer(token) {
  const b64 = btoa(String.fromCharCode(...new TextEncoder().encode(token)));
  return `ferry.bearer.${b64.replaceAll('+', '-').replaceAll('/', '_').replace(/=+$/, '')}`;
}

// ------------------------------------------------------------------ state

const state = {
  hosts: [],
  vms: [],
  /** id -> job, as the API gives it. */
  jobs: new Map(),
  /** id -> { doneBytes, totalBytes, bytesPerSec, etaMs, phase } from progress events. */
  progress: new Map(),
  /** id -> downtime ms, from `finished` events (and the journal's success detail). */
  downtime: new Map(),
  selected: null,
};

// ------------------------------------------------------------------ the API session

class Session {
  #ws;
  #next = 1;
  #pending = new Map();
  #onEvent;
  #opened = false;

  constructor(token, onEvent, onClose) {
    this.#onEvent = onEvent;
    const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1`;
    this.#ws = new WebSocket(url, ['ferry.v1', tokenOffer(token)]);
    this.ready = new Promise((resolve, reject) => {
      this.#ws.addEventListener('open', () => {
        this.#opened = true;
        resolve();
      });
      this.#ws.addEventListener('error', () => reject(new Error('the scheduler refused the connection (is the token right?)')));
    });
    this.#ws.addEventListener('message', (m) => this.#message(m.data));
    this.#ws.addEventListener('close', () => {
      for (const p of this.#pending.values()) p.reject(new Error('the connection closed'));
      this.#pending.clear();
      onClose(this.#opened);
    });
  }

  #message(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (typeof msg !== 'object' || msg === null || msg.v !== PROTOCOL_VERSION) return;
    if (msg.event && typeof msg.event === 'object') return this.#onEvent(msg.event);
    const p = this.#pending.get(msg.id);
    if (!p) return;
    this.#pending.delete(msg.id);
    clearTimeout(p.timer);
    if (msg.ok) p.resolve(msg.result);
    else p.reject(new Error(msg.error?.message ?? 'the call failed'));
  }

  call(method, params = {}, timeoutMs = 20_000) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new Error(`${method}: no answer within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      this.#ws.send(JSON.stringify({ v: PROTOCOL_VERSION, id, method, params }));
    });
  }

  close() {
    this.#ws.close();
  }
}

let session = null;
let reconnectTimer = null;

function setStatus(kind, text) {
  const s = $('#status');
  s.dataset.state = kind;
  s.textContent = text;
}

function showLogin(error) {
  $('#app').hidden = true;
  $('#logout').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = error ?? '';
  $('#token').focus();
}

async function connect() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return showLogin();
  clearTimeout(reconnectTimer);
  setStatus('idle', 'connecting…');
  const s = new Session(token, onEvent, (opened) => {
    if (session !== s) return;
    session = null;
    if (!opened) {
      setStatus('down', 'refused');
      sessionStorage.removeItem(TOKEN_KEY);
      return showLogin('The scheduler refused that token.');
    }
    setStatus('down', 'disconnected: reconnecting…');
    reconnectTimer = setTimeout(connect, 2_000);
  });
  session = s;
  try {
    await s.ready;
  } catch {
    return; // the close handler says what happened
  }
  $('#login').hidden = true;
  $('#app').hidden = false;
  $('#logout').hidden = false;
  // Events first, then the picture: an event that arrives in between is newer, and wins by updatedAt.
  await s.call('watch');
  await Promise.all([refreshHosts(), refreshJobs()]);
  setStatus('live', 'live');
}

async function refreshHosts() {
  if (!session) return;
  const [hosts, vms] = await Promise.all([session.call('hosts'), session.call('vms')]);
  state.hosts = hosts;
  state.vms = vms;
  renderHosts();
}

async function refreshJobs() {
  if (!session) return;
  const jobs = await session.call('queue', { all: true, limit: 200 });
  for (const j of jobs) upsertJob(j);
  renderJobs();
}

let hostsTimer = null;
/** Hosts and VMs change when migrations end: asked again, at most every half second. */
function refreshHostsSoon() {
  if (hostsTimer) return;
  hostsTimer = setTimeout(() => {
    hostsTimer = null;
    refreshHosts().catch(() => {});
  }, 500);
}

function upsertJob(job) {
  const had = state.jobs.get(job.id);
  if (had && had.updatedAt > job.updatedAt) return;
  state.jobs.set(job.id, job);
}

function onEvent(e) {
  switch (e.type) {
    case 'job':
      upsertJob(e.job);
      // Running counts per host and, once a migration ends, where its VM runs.
      refreshHostsSoon();
      break;
    case 'phase': {
      const j = state.jobs.get(e.id);
      if (j) state.jobs.set(e.id, { ...j, phase: e.phase });
      break;
    }
    case 'progress':
      state.progress.set(e.id, { doneBytes: e.doneBytes, totalBytes: e.totalBytes, bytesPerSec: e.bytesPerSec, etaMs: e.etaMs, phase: e.phase });
      break;
    case 'finished':
      if (typeof e.downtimeMs === 'number') state.downtime.set(e.id, e.downtimeMs);
      break;
    default:
      return;
  }
  renderJobs();
  if (state.selected === e.id || state.selected === e.job?.id) showJournal(state.selected).catch(() => {});
}

// ------------------------------------------------------------------ confirmation

function confirmAction(text) {
  const dialog = $('#confirm');
  $('#confirm-text').textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'yes'), { once: true });
    dialog.returnValue = '';
    dialog.showModal();
  });
}

async function drain(host) {
  const n = state.vms.filter((v) => v.host === host).length;
  if (!(await confirmAction(`Drain ${host}? Its ${n} running VM${n === 1 ? '' : 's'} will be moved to other hosts.`))) return;
  try {
    const queued = await session.call('drain', { host });
    for (const r of queued) upsertJob(r.job);
    renderJobs();
  } catch (err) {
    alertError(`Drain of ${host} refused: ${err.message}`);
  }
}

async function cancel(job) {
  if (!(await confirmAction(`Cancel the migration of ${job.vm} (${job.from} → ${job.to})? A running one is rolled back; the guest stays on ${job.from}.`))) return;
  try {
    upsertJob(await session.call('cancel', { id: job.id }));
    renderJobs();
  } catch (err) {
    alertError(`Cancel refused: ${err.message}`);
  }
}

function alertError(text) {
  setStatus('down', text);
  setTimeout(() => session && setStatus('live', 'live'), 6_000);
}

// ------------------------------------------------------------------ rendering

function renderHosts() {
  // The page's own count follows events at once; the scheduler's (hosts.queued) also counts
  // queued migrations older than the 200 the page loaded.
  const queuedFrom = new Map();
  for (const j of state.jobs.values()) if (j.state === 'queued') queuedFrom.set(j.from, (queuedFrom.get(j.from) ?? 0) + 1);
  for (const h of state.hosts) if (typeof h.queued === 'number' && h.queued > (queuedFrom.get(h.name) ?? 0)) queuedFrom.set(h.name, h.queued);
  const cards = state.hosts.map((h) => {
    const vms = state.vms.filter((v) => v.host === h.name);
    return el(
      'article',
      { class: 'host', 'data-host': h.name, 'data-reachable': h.reachable, 'data-vms': vms.length },
      el('h3', {}, h.name, el('span', { class: 'muted' }, h.reachable ? 'up' : 'unreachable')),
      el('p', { class: 'facts' }, `free ${h.freeMemoryMiB ?? '–'} MiB · ${bytes(h.freeDiskBytes ?? NaN)} disk`),
      el('p', { class: 'facts' }, 'queue ', el('b', { 'data-field': 'queue' }, queuedFrom.get(h.name) ?? 0), ' · out ', el('b', { 'data-field': 'out' }, h.outgoing), ' · in ', el('b', { 'data-field': 'in' }, h.incoming)),
      vms.length ? el('ul', {}, vms.map((v) => el('li', { 'data-vm': v.name }, `${v.name} (${v.memoryMiB} MiB)`))) : el('p', { class: 'muted' }, 'no VMs'),
      el('button', { type: 'button', class: 'danger', 'data-action': 'drain', disabled: !h.reachable || vms.length === 0, onclick: () => drain(h.name) }, 'drain'),
    );
  });
  $('#hosts').replaceChildren(...cards);
}

function progressCell(job) {
  const p = state.progress.get(job.id);
  if (job.state === 'succeeded') {
    return el('td', {}, el('progress', { max: 100, value: 100, 'data-percent': 100 }), el('div', { class: 'rate' }, p ? `${bytes(p.doneBytes)} moved` : 'done'));
  }
  if (job.state !== 'running') return el('td', { class: 'muted' }, job.state === 'queued' ? 'waiting' : '');
  if (!p || p.totalBytes <= 0) return el('td', {}, el('progress', { 'data-percent': 0 }), el('div', { class: 'rate' }, 'starting…'));
  const pct = Math.min(100, Math.floor((100 * p.doneBytes) / p.totalBytes));
  return el(
    'td',
    {},
    el('progress', { max: 100, value: pct, 'data-percent': pct }),
    el('div', { class: 'rate' }, `${bytes(p.doneBytes)} / ${bytes(p.totalBytes)} · ${bytes(p.bytesPerSec)}/s · ETA ${duration(p.etaMs)}`),
  );
}

function renderJobs() {
  const jobs = [...state.jobs.values()].sort((a, b) => Number(ACTIVE.has(b.state)) - Number(ACTIVE.has(a.state)) || b.seq - a.seq);
  const rows = jobs.map((j) =>
    el(
      'tr',
      { 'data-migration': j.id, 'data-vm': j.vm, 'data-state': j.state, class: state.selected === j.id ? 'selected' : undefined, onclick: () => showJournal(j.id).catch(() => {}) },
      el('td', {}, j.vm),
      el('td', {}, `${j.from} → ${j.to}`),
      el('td', {}, `${j.reason}, ${j.mode}`),
      el('td', { class: 'state', title: j.error ?? '' }, j.state),
      el('td', { 'data-field': 'phase' }, j.phase ?? '–'),
      progressCell(j),
      el('td', { 'data-field': 'downtime' }, state.downtime.has(j.id) ? `${state.downtime.get(j.id)} ms` : '–'),
      el('td', {}, ACTIVE.has(j.state) ? el('button', { type: 'button', 'data-action': 'cancel', onclick: (ev) => (ev.stopPropagation(), cancel(j)) }, 'cancel') : ''),
    ),
  );
  $('#migrations tbody').replaceChildren(...rows);
  $('#no-migrations').hidden = rows.length > 0;
  renderHosts();
}

async function showJournal(id) {
  state.selected = id;
  const job = state.jobs.get(id);
  const entries = await session.call('journal', { id });
  if (state.selected !== id) return;
  $('#journal').hidden = false;
  $('#journal-title').textContent = job ? `${job.vm} (${id})` : id;
  $('#journal tbody').replaceChildren(
    ...entries.map((e) => {
      const m = /downtime (\d+) ms/.exec(e.detail ?? '');
      if (m) state.downtime.set(id, Number(m[1]));
      return el('tr', {}, el('td', {}, new Date(e.at).toLocaleTimeString()), el('td', {}, e.state), el('td', {}, e.phase ?? '–'), el('td', {}, e.detail ?? ''));
    }),
  );
  for (const tr of document.querySelectorAll('#migrations tbody tr')) tr.classList.toggle('selected', tr.dataset.migration === id);
}

// ------------------------------------------------------------------ start

$('#login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $('#token').value);
  $('#token').value = '';
  connect();
});
$('#logout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  const s = session;
  session = null;
  s?.close();
  setStatus('idle', 'not connected');
  showLogin();
});

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.has('token')) {
  sessionStorage.setItem(TOKEN_KEY, fragment.get('token'));
  history.replaceState(null, '', location.pathname + location.search);
}
connect();
