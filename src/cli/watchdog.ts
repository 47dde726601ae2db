/**
 * The watchdog a local `migrate-vm` leaves beside itself (issue 17): a detached process, in its
 * own session, whose stdin is a pipe from migrate-vm. migrate-vm tells it what it needs as the
 * migration goes (the destination's run dir and disks, the source's saved settings, each phase)
 * and "done" before it exits. The pipe closing without "done" means migrate-vm died (kill -9, OOM,
 * a crash): the watchdog then settles the migration from what the two QEMUs report
 * (src/engine/settle-local.ts), so a dead orchestrator costs the guest a bounded pause, not an
 * endless one. It speaks on migrate-vm's stderr, which it inherits.
 */
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { z } from 'zod';
import { pino } from 'pino';
import { errorText } from '../errors.js';
import { settleLocalMigration, type LocalDestinationLeft } from '../engine/settle-local.js';
import { SavedSourceSettingsSchema, type SavedSourceSettings } from '../engine/types.js';

export const WatchdogMessageSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('begin'), parentPid: z.number().int(), migrationId: z.string(), sourceQmp: z.string(), destination: z.object({ runDir: z.string(), dir: z.string(), disks: z.array(z.string()) }).strict(), tempDirs: z.array(z.string().startsWith(tmpdir())) }).strict(),
  z.object({ type: z.literal('phase'), phase: z.string() }).strict(),
  z.object({ type: z.literal('saved'), saved: SavedSourceSettingsSchema }).strict(),
  z.object({ type: z.literal('done') }).strict(),
]);
export type WatchdogMessage = z.infer<typeof WatchdogMessageSchema>;

/** Phases after which the destination's disks exist and are this migration's (preflight found none there). */
const DESTINATION_MADE = new Set(['prepare-destination', 'mirror', 'ram', 'switchover', 'confirm', 'hydrate', 'cleanup', 'rollback', 'failed']);

export async function main(): Promise<number> {
  // A terminal's Ctrl-C or hang-up is meant for migrate-vm, not for what cleans up after it.
  for (const sig of ['SIGINT', 'SIGHUP', 'SIGPIPE'] as const) process.on(sig, () => undefined);
  const say = (line: string): void => void process.stderr.write(`migrate-vm watchdog: ${line}\n`);
  let begin: Extract<WatchdogMessage, { type: 'begin' }> | undefined;
  let saved: SavedSourceSettings | undefined;
  let phase = 'preflight';
  let done = false;
  let buffer = '';
  process.stdin.setEncoding('utf8');
  for await (const chunk of process.stdin) {
    buffer += String(chunk);
    for (let nl = buffer.indexOf('\n'); nl >= 0; nl = buffer.indexOf('\n')) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      let json: unknown;
      try {
        json = JSON.parse(line);
      } catch {
        continue;
      }
      const m = WatchdogMessageSchema.safeParse(json);
      if (!m.success) continue;
      if (m.data.type === 'begin') begin = m.data;
      else if (m.data.type === 'phase') phase = m.data.phase;
      else if (m.data.type === 'saved') saved = m.data.saved;
      else done = true;
    }
  }
  if (done || !begin) return 0;
  // migrate-vm is gone without finishing. Nothing of it is left to continue or cancel.
  say(`migrate-vm (pid ${begin.parentPid}) died during ${phase} of migration ${begin.migrationId}; settling it from what the QEMUs report`);
  const destinations: LocalDestinationLeft[] = [{ ...begin.destination, disks: DESTINATION_MADE.has(phase) ? begin.destination.disks : [] }];
  const log = pino({ level: process.env.FERRY_WATCHDOG_LOG ?? 'silent' }, pino.destination(2));
  try {
    const report = await settleLocalMigration({ sourceQmp: begin.sourceQmp, destinations, saved, fresh: true, log });
    // migrate-vm's throwaway PKI: QEMU read it when the objects were made; nobody needs it now.
    for (const dir of begin.tempDirs) await rm(dir, { recursive: true, force: true });
    for (const d of report.did) say(d);
    say(`${WHERE[report.where]}${report.advice ? `: ${report.advice}` : ''}`);
    return report.where === 'uncertain' ? 1 : 0;
  } catch (err) {
    say(`could not settle the migration: ${errorText(err)}; look at both QEMUs before resuming anything`);
    return 1;
  }
}

const WHERE = {
  source: 'settled: the guest runs on the source',
  destination: 'settled: the guest runs on the destination',
  nowhere: 'settled: no QEMU runs the guest',
  uncertain: 'NOT SETTLED, OUTCOME UNCERTAIN',
} as const;
