/**
 * `npm run bench:migrate -- --suite data-tls [--runs 5] [--scenarios idle,writer] [--variants plain,tls,...] [--qemu 7.2]`:
 * TLS on the data path beside plain text, in the same run: the idle guest (1 GiB qcow2 holding
 * 200 MiB) and a guest writing as fast as it can, each migrated N times per variant, interleaved
 * (plain, TLS, plain, ...) so that the machine's drift lands on all of them. Variants: `plain`,
 * `tls` (ferry's defaults: QEMU's default priority, NORMAL, where two gnutls QEMUs settle on
 * AES-256-GCM), `tls-aes128` / `tls-chacha` (that cipher first, the server's order deciding), and
 * `plain-multifd2` / `tls-multifd2` (RAM over 2 multifd channels). Reports median and spread of
 * total time and downtime, the ratios to plain of the medians (issue 16's goal: <= 1.15x total,
 * <= +20 ms downtime), and the pause step by step (scenario.ts, PauseSteps). JSON on stdout, a
 * table on stderr.
 */
import { loadGuestImage } from '../src/guest/image.js';
import { GiB, runScenario, type PauseSteps, type Row, type Scenario } from './scenario.js';
import { existsSync } from 'node:fs';
import { flag, list, QEMUS } from './suite-args.js';

const base: Scenario[] = [
  { name: 'idle', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20 } },
  { name: 'writer', diskSize: GiB, fillMiB: 200, workload: { tickMs: 20, write: { rate: 0 } } },
];

const variants = {
  plain: {},
  tls: { tls: true },
  'tls-aes128': { tls: true, tlsPriority: 'NORMAL:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:%SERVER_PRECEDENCE' },
  'tls-chacha': { tls: true, tlsPriority: 'NORMAL:-CIPHER-ALL:+CHACHA20-POLY1305:+AES-256-GCM:%SERVER_PRECEDENCE' },
  'plain-multifd2': { options: { multifdChannels: 2 } },
  'tls-multifd2': { tls: true, options: { multifdChannels: 2 } },
} satisfies Record<string, Partial<Scenario>>;
type Variant = keyof typeof variants;

interface Spread {
  median: number;
  min: number;
  max: number;
}

function spread(xs: number[]): Spread {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
  return { median: Math.round(mid), min: Math.round(s[0] ?? 0), max: Math.round(s.at(-1) ?? 0) };
}

export async function dataTlsSuite(argv: string[] = process.argv.slice(2)): Promise<void> {
  const runsAt = argv.indexOf('--runs');
  const runs = runsAt >= 0 ? Number(argv[runsAt + 1]) : 5;
  if (!Number.isInteger(runs) || runs < 1 || runs > 50) throw new Error(`--runs: a whole number from 1 to 50, got '${argv[runsAt + 1] ?? ''}'`);
  const chosen = list('variants', Object.keys(variants) as Variant[]);
  const want: Variant[] = chosen.includes('plain') ? chosen : ['plain', ...chosen];
  const scenarios = list('scenarios', base.map((s) => s.name)).map((n) => base.find((s) => s.name === n)!);
  const qemu = flag('qemu') ?? '7.2';
  const qemuBinary = QEMUS[qemu];
  if (qemuBinary === undefined) throw new Error(`--qemu: unknown '${qemu}'; known: ${Object.keys(QEMUS).join(', ')}`);
  if (qemu !== '7.2' && !existsSync(qemuBinary)) throw new Error(`QEMU ${qemu} is not at ${qemuBinary} (node scripts/bootstrap.mjs --qemu10)`);
  const image = await loadGuestImage();
  const rows: (Row & { variant: Variant; run: number; base: string })[] = [];
  for (let run = 0; run < runs; run++) {
    for (const s of scenarios) {
      for (const v of want) {
        process.stderr.write(`bench data-tls: ${s.name} ${v} run ${run + 1}/${runs}...\n`);
        const variant: Partial<Scenario> = variants[v];
        const scenario: Scenario = { ...s, ...variant, options: { ...s.options, ...variant.options }, name: `${s.name}-${v}`, ...(qemu === '7.2' ? {} : { qemuBinary }) };
        // No NBD baseline here: the ratio that matters is against plain, measured side by side.
        rows.push({ ...(await runScenario(scenario, image, 1)), variant: v, run, base: s.name });
      }
    }
  }
  const summary = scenarios.flatMap((s) => {
    const of = (v: Variant): Row[] => rows.filter((r) => r.ok && r.base === s.name && r.variant === v);
    const pick = (v: Variant, f: (r: Row) => number | undefined): Spread => spread(of(v).map(f).filter((x): x is number => x !== undefined));
    const figures = (v: Variant) => ({
      totalMs: pick(v, (r) => r.totalMs),
      downtimeMs: pick(v, (r) => r.downtimeMs),
      qemuDowntimeMs: pick(v, (r) => r.qemuDowntimeMs),
      mirrorMs: pick(v, (r) => r.phaseMs?.mirror),
      ramMs: pick(v, (r) => r.phaseMs?.ram),
      pause: Object.fromEntries(
        (['stopToPreSwitchover', 'mirrorsComplete', 'continueToDevice', 'deviceToCompleted', 'sourceToDestinationCompleted', 'destinationCompletedToResume', 'stopToResume'] as const).map((k) => [k, pick(v, (r) => r.pause?.[k])]),
      ) as Record<keyof PauseSteps, Spread>,
    });
    const plain = figures('plain');
    return want.map((v) => {
      const f = v === 'plain' ? plain : figures(v);
      return {
        scenario: s.name,
        variant: v,
        runs: of(v).length,
        encrypted: of(v).every((r) => r.encrypted === ('tls' in variants[v])),
        ...f,
        totalRatio: Number((f.totalMs.median / Math.max(1, plain.totalMs.median)).toFixed(2)),
        addedDowntimeMs: f.downtimeMs.median - plain.downtimeMs.median,
        addedQemuDowntimeMs: f.qemuDowntimeMs.median - plain.qemuDowntimeMs.median,
      };
    });
  });
  process.stdout.write(`${JSON.stringify({ bench: 'data-tls', qemu, runs, summary, rows }, null, 2)}\n`);
  const fmt = (x: Spread): string => `${x.median} [${x.min}..${x.max}]`;
  process.stderr.write(`\n${['scenario', 'variant', 'total ms', 'x plain', 'downtime ms', '+ms', 'QEMU dt', 'mirror ms', 'ram ms'].join(' | ')}\n`);
  for (const r of summary) {
    process.stderr.write(`${[r.scenario, r.variant, fmt(r.totalMs), r.totalRatio, fmt(r.downtimeMs), r.addedDowntimeMs, fmt(r.qemuDowntimeMs), fmt(r.mirrorMs), fmt(r.ramMs)].join(' | ')}\n`);
  }
  process.stderr.write(`\npause, median ms: ${['scenario', 'variant', 'stop>pre', 'mirrors', 'cont>device', 'device>done', 'src>dst done', 'dst done>resume', 'stop>resume'].join(' | ')}\n`);
  for (const r of summary) {
    const p = r.pause;
    process.stderr.write(`${[r.scenario, r.variant, p.stopToPreSwitchover.median, p.mirrorsComplete.median, p.continueToDevice.median, p.deviceToCompleted.median, p.sourceToDestinationCompleted.median, p.destinationCompletedToResume.median, fmt(p.stopToResume)].join(' | ')}\n`);
  }
  if (rows.some((r) => !r.ok)) process.exitCode = 1;
}
