/**
 * The fault matrix of issue 17: every fault at every phase, each cell's expected outcome written
 * down here (and in docs/faults.md's recovery table, which a unit test holds to this one).
 *
 * A cell is `phase/fault`. The harness waits for the phase's event on migrate-vm's --json stream,
 * then injects the fault at a random offset inside the phase (seeded; the seed is printed), and
 * one verifier (verdict.ts) judges every cell the same way.
 *
 * Two phases belong to standby replicas (issue 12), run by the standby rig (standby-rig.ts: two
 * agents in network namespaces and a ferry-scheduler that protects the guest onto B):
 *   sync      the fault strikes while a sync is in flight (the standby's manifest records it
 *             pending); nothing migrates, the guest stays on the source unless the fault kills it
 *   evacuate  `ferry migrate VM --to B` by delta onto the replica; the fault strikes inside the
 *             migration, and the cell is judged by the engine phase it hit (the migration rows)
 */

export const PHASES = ['preflight', 'prepare-destination', 'mirror', 'ram', 'switchover', 'confirm', 'cleanup', 'hydrate', 'sync', 'evacuate'] as const;
export type FaultPhase = (typeof PHASES)[number];
export const isFaultPhase = (p: string | undefined): p is FaultPhase => (PHASES as readonly (string | undefined)[]).includes(p);

export const FAULTS = [
  'kill-source-qemu',
  'kill-destination-qemu',
  'kill-orchestrator',
  'sigterm-orchestrator',
  'kill-source-agent',
  'kill-destination-agent',
  'link-cut-restore',
  'link-cut-forever',
  'disk-full',
  'disk-io-error',
  'slow-link',
] as const;
export type Fault = (typeof FAULTS)[number];

/**
 * Where the guest is once the dust settles, as the verifier establishes it (and as the exit code
 * must say):
 *   source       runs on the source as before (exit 1, 130, or 2 for a refusal; after a killed
 *                orchestrator: once the watchdog / `migrate-vm --recover` settled it)
 *   destination  runs on the destination, the source QEMU is gone (exit 0)
 *   killed       it ran on the destination and the fault killed it there (exit 0): its writes
 *                are on the destination's disks, nothing of it runs anywhere
 *   nowhere      the source died before the switchover and nothing of it started elsewhere (exit 5)
 *   needs-source (lazy) runs on the destination, the source must stay up (exit 4)
 *   uncertain    the source is left paused and nobody can know (exit 3): only where no one can
 */
export type Outcome = 'source' | 'destination' | 'killed' | 'nowhere' | 'needs-source' | 'uncertain';

/** The standby-replica phases: their cells run on the standby rig whatever the fault. */
export const STANDBY_PHASES: ReadonlySet<FaultPhase> = new Set(['sync', 'evacuate']);

/**
 * Which rig runs a cell: two local folders under one migrate-vm, two agents in network
 * namespaces, or (sync, evacuate) those two agents under a ferry-scheduler protecting the guest.
 */
export function rigOf(cell: Cell): 'local' | 'netns' | 'standby' {
  if (STANDBY_PHASES.has(cell.phase)) return 'standby';
  const fault = cell.fault;
  return fault === 'kill-source-agent' || fault === 'kill-destination-agent' || fault.startsWith('link-') || fault === 'slow-link' ? 'netns' : 'local';
}

type Row = Partial<Record<FaultPhase, readonly Outcome[]>>;

/**
 * Expected outcomes per fault and phase; a phase a fault has no cell in is absent. Where the
 * fault can land on either side of the point of no return (`cont` on the destination, inside
 * confirm), both outcomes are allowed and the verifier checks the one that happened is true.
 * An evacuate cell is judged by the row's entry for the engine phase it hit (a fault in its
 * mirror phase expects what mirror does); its own entry is the union, for a cell whose phase
 * event never came.
 */
export const EXPECTED: Record<Fault, Row> = {
  'kill-source-qemu': {
    preflight: ['nowhere'],
    'prepare-destination': ['nowhere'],
    mirror: ['nowhere'],
    ram: ['nowhere'],
    switchover: ['nowhere'],
    confirm: ['nowhere', 'destination'],
    cleanup: ['destination'],
    hydrate: ['needs-source'],
    sync: ['nowhere'],
  },
  'kill-destination-qemu': {
    'prepare-destination': ['source'],
    mirror: ['source'],
    ram: ['source'],
    switchover: ['source'],
    // A kill that lands while `cont` is on its way leaves it unanswered: whether the destination
    // ran before it died nobody can know, so the source stays paused (seed 5 hit that at +2 ms).
    confirm: ['source', 'uncertain', 'killed'],
    cleanup: ['killed'],
    evacuate: ['source', 'killed'],
  },
  'kill-orchestrator': {
    preflight: ['source'],
    'prepare-destination': ['source'],
    mirror: ['source'],
    ram: ['source'],
    switchover: ['source'],
    confirm: ['source', 'destination'],
    cleanup: ['destination'],
    sync: ['source'],
    evacuate: ['source', 'destination'],
  },
  'sigterm-orchestrator': {
    preflight: ['source'],
    'prepare-destination': ['source'],
    mirror: ['source'],
    ram: ['source'],
    switchover: ['source'],
    confirm: ['source', 'destination'],
    cleanup: ['destination'],
    hydrate: ['destination'],
    sync: ['source'],
  },
  'kill-source-agent': {
    'prepare-destination': ['source'],
    mirror: ['source'],
    ram: ['source'],
    switchover: ['source'],
    confirm: ['source', 'destination'],
    cleanup: ['destination'],
    sync: ['source'],
    evacuate: ['source', 'destination'],
  },
  'kill-destination-agent': {
    'prepare-destination': ['source'],
    mirror: ['source'],
    ram: ['source'],
    switchover: ['source'],
    confirm: ['source', 'destination'],
    cleanup: ['destination'],
    sync: ['source'],
    evacuate: ['source', 'destination'],
  },
  'link-cut-restore': {
    'prepare-destination': ['source', 'destination'],
    mirror: ['source', 'destination'],
    ram: ['source', 'destination'],
    switchover: ['source', 'destination'],
    confirm: ['source', 'destination'],
    cleanup: ['destination'],
    sync: ['source'],
    evacuate: ['source', 'destination'],
  },
  'link-cut-forever': {
    'prepare-destination': ['source'],
    mirror: ['source'],
    ram: ['source'],
    switchover: ['source'],
    confirm: ['source', 'uncertain', 'destination'],
    cleanup: ['destination'],
    sync: ['source'],
  },
  'disk-full': {
    preflight: ['source'],
    'prepare-destination': ['source'],
    mirror: ['source'],
    ram: ['source'],
    switchover: ['source', 'destination'],
    confirm: ['source', 'destination'],
    cleanup: ['destination'],
  },
  'disk-io-error': {
    'prepare-destination': ['source'],
    mirror: ['source'],
  },
  'slow-link': {
    mirror: ['source'],
    ram: ['source'],
  },
};

export interface Cell {
  phase: FaultPhase;
  fault: Fault;
}

export const cellId = (c: Cell): string => `${c.phase}/${c.fault}`;

export function allCells(): Cell[] {
  const out: Cell[] = [];
  for (const phase of PHASES) for (const fault of FAULTS) if (EXPECTED[fault][phase]) out.push({ phase, fault });
  return out;
}

/**
 * The CI subset (test/integration/faults.test.ts): every phase and every fault kind at least
 * once, the four defects of issue 17 among them, on the cheapest rig that shows each.
 */
export const CI_CELLS: readonly string[] = [
  'preflight/kill-source-qemu',
  'preflight/disk-full',
  'prepare-destination/kill-destination-qemu',
  'prepare-destination/disk-io-error',
  'mirror/kill-source-qemu',
  'mirror/kill-destination-qemu',
  'mirror/kill-orchestrator',
  'mirror/sigterm-orchestrator',
  'mirror/disk-full',
  'mirror/disk-io-error',
  'mirror/link-cut-restore',
  'ram/kill-orchestrator',
  'ram/kill-destination-qemu',
  'ram/kill-source-agent',
  'ram/slow-link',
  // the total timeout, which Node 20 once collected unfired
  'mirror/slow-link',
  'ram/link-cut-forever',
  'switchover/kill-source-qemu',
  'switchover/sigterm-orchestrator',
  'switchover/kill-destination-agent',
  // seed 17 hits the stop of the guest: only the out-of-band yank reaches the source then
  'switchover/link-cut-forever',
  'confirm/kill-destination-qemu',
  'confirm/sigterm-orchestrator',
  'cleanup/sigterm-orchestrator',
  'hydrate/sigterm-orchestrator',
  'hydrate/kill-source-qemu',
  // The standby rig's two cheapest (about 25 s each): a scheduler killed mid-sync, and a delta
  // evacuation whose destination dies (rolled back: the replica served again, the loop on).
  'sync/kill-orchestrator',
  // a standby silent for good: the sync gives up on its stall bound instead of holding the loop
  'sync/link-cut-forever',
  'evacuate/kill-destination-qemu',
];

/**
 * Cells of the CI subset that fail today for a defect not fixed yet (docs/faults.md, "Open"):
 * CI holds them to exactly these problems, so a fix (the cell passes) or a new problem (one that
 * matches none of these) fails the test until this list is updated.
 */
export const OPEN_FINDINGS: Readonly<Record<string, readonly RegExp[]>> = {};

/** Parses `--cells a/b,c/*,*` against the matrix; an unknown cell is an error naming it. */
export function selectCells(spec: string | undefined): Cell[] {
  const all = allCells();
  if (!spec) return all;
  const out: Cell[] = [];
  for (const pattern of spec.split(',').map((s) => s.trim()).filter(Boolean)) {
    const [p, f] = pattern.includes('/') ? pattern.split('/', 2) : [pattern, '*'];
    const hits = all.filter((c) => (p === '*' || c.phase === p) && (f === '*' || c.fault === f));
    if (hits.length === 0) throw new Error(`--cells: '${pattern}' names no cell of the matrix (phases: ${PHASES.join(', ')}; faults: ${FAULTS.join(', ')})`);
    for (const h of hits) if (!out.some((o) => cellId(o) === cellId(h))) out.push(h);
  }
  return out;
}

/** A small seeded PRNG (mulberry32): a cell's offsets and durations replay from its seed. */
export function rng(seed: number, salt: string): () => number {
  let a = seed >>> 0;
  for (const ch of salt) a = Math.imul(a ^ ch.charCodeAt(0), 0x9e3779b1) >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * How long each phase usually lasts with the harness's small guest (ms): the injection lands at
 * a random offset in [0, window). A phase that ends sooner gets the fault in a later one; the
 * result says which phase it really hit, and the expectation is the one of that phase.
 */
export const PHASE_WINDOW_MS: Record<FaultPhase, number> = {
  preflight: 60,
  'prepare-destination': 150,
  mirror: 800,
  ram: 300,
  switchover: 5,
  confirm: 5,
  cleanup: 30,
  hydrate: 600,
  // From the standby's manifest naming a sync pending (a sync over a 2 Mbit/s link lasts seconds).
  sync: 1500,
  // From the delta migration's mirror phase (its backup passes, then RAM at 16 MiB/s: about 8 s).
  evacuate: 3000,
};
