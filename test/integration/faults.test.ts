/**
 * The fault matrix's CI subset (issue 17; test/faults/): every phase and every fault kind at least
 * once, each cell a real guest, a real migrate-vm process and a real fault, judged by the one
 * verifier (one running copy at every instant, no acked write lost, the exit code true, no
 * debris). The seed is fixed so a failure replays with the command in its message; the netns
 * cells (agents, link) and disk-full need root and are skipped without it.
 */
import { afterAll, expect, test } from 'vitest';
import { CI_CELLS, OPEN_FINDINGS, rigOf, selectCells } from '../faults/cells.js';
import { runLocalCell } from '../faults/local-rig.js';
import { NetnsRig } from '../faults/netns-rig.js';
import { StandbyRig } from '../faults/standby-rig.js';
import { netnsAvailable } from '../helpers/netns.js';

const SEED = Number(process.env.FERRY_FAULT_SEED ?? 17);
const canNetns = await netnsAvailable();
let rig: Promise<NetnsRig> | undefined;
let standbyRig: Promise<StandbyRig> | undefined;
afterAll(async () => {
  await (await rig?.catch(() => undefined))?.close();
  await (await standbyRig?.catch(() => undefined))?.close();
}, 60_000);

const cells = selectCells(CI_CELLS.join(','));

test.each(cells.map((c) => ({ ...c, id: `${c.phase}/${c.fault}` })))('$id', async (cell) => {
  const kind = rigOf(cell);
  // Network namespaces and the tmpfs of disk-full need root, as the other netns tests do.
  if ((kind !== 'local' && !canNetns) || (cell.fault === 'disk-full' && process.getuid?.() !== 0)) return;
  // The two namespace rigs name their pair alike (by PID): the one not in use is closed first.
  if (kind === 'standby' && rig) {
    await (await rig.catch(() => undefined))?.close();
    rig = undefined;
  }
  if (kind === 'netns' && standbyRig) {
    await (await standbyRig.catch(() => undefined))?.close();
    standbyRig = undefined;
  }
  const r =
    kind === 'netns' ? await (rig ??= NetnsRig.create()).then((x) => x.runCell(cell, SEED)) : kind === 'standby' ? await (standbyRig ??= StandbyRig.create()).then((x) => x.runCell(cell, SEED)) : await runLocalCell(cell, SEED);
  const where = `${r.id} (seed ${SEED}, hit ${r.hitPhase ?? '-'} +${r.offsetMs} ms, exit ${r.exit}, ${r.notes.join('; ')}): replay with ${r.replay}`;
  const open = OPEN_FINDINGS[r.id];
  if (!open) {
    expect(r.problems, where).toEqual([]);
    return;
  }
  // A known open defect: exactly its problems, no other; fixed, it must leave OPEN_FINDINGS.
  expect(r.problems.length, `${where}: passes now, remove it from OPEN_FINDINGS`).toBeGreaterThan(0);
  expect(r.problems.filter((p) => !open.some((re) => re.test(p))), where).toEqual([]);
}, 240_000);
