/**
 * The scheduler's durable state: one SQLite file (WAL), migrations and their journal. Every
 * change is a transaction that updates the row and appends to the journal, and it is committed
 * before the scheduler acts on it, so a crash leaves a state a restart can reconcile.
 *
 *   queued ──start──► running ──► succeeded | failed | cancelled | needs-source
 *     │                  └──retry / recovery──► queued
 *     └──cancel──► cancelled
 *
 * One active (queued or running) migration per VM is a UNIQUE partial index, not a check in
 * code: two schedulers racing, or a bug, cannot make a VM move twice at once.
 *
 * The embedded default (one scheduler, one machine). better-sqlite3 is synchronous; the methods
 * are async only to meet the SchedulerStore interface (store.ts) that the PostgreSQL store shares.
 * Not shared: no leases, no epochs (a single scheduler has no one to fence off).
 */
import Database from 'better-sqlite3';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { SavedSourceSettingsSchema, type SavedSourceSettings } from '../engine/types.js';
import { SchedulerError, type MigrationJob, type MigrationState } from './types.js';
import { ALLOWED, journalSchema, rowSchema, SCHEMA_VERSION, toJob, toProtection, toRecovery, type EnqueueRequest, type JournalEntry, type ProtectionRow, type RecoveryRow, type SchedulerStore, type TransitionChange } from './store.js';

export class SqliteStore implements SchedulerStore {
  readonly shared = false;
  readonly #db: Database.Database;
  readonly #stmts;

  constructor(path: string) {
    this.#db = new Database(path);
    this.#db.pragma('journal_mode = WAL');
    // FULL: a committed transition survives a power cut, not only a process crash.
    this.#db.pragma('synchronous = FULL');
    this.#migrate();
    this.#stmts = {
      insert: this.#db.prepare(
        `INSERT INTO migrations (id, vm, src, dst, reason, priority, mode, state, attempts, phase, error, bandwidth, memory_mib, disk_bytes, not_before, created_at, updated_at, seq)
         VALUES (@id, @vm, @src, @dst, @reason, @priority, @mode, 'queued', 0, NULL, NULL, NULL, @memoryMiB, @diskBytes, 0, @now, @now, (SELECT COALESCE(MAX(seq), 0) + 1 FROM migrations))`,
      ),
      get: this.#db.prepare('SELECT * FROM migrations WHERE id = ?'),
      activeForVm: this.#db.prepare("SELECT * FROM migrations WHERE vm = ? AND state IN ('queued', 'running')"),
      byState: this.#db.prepare('SELECT * FROM migrations WHERE state = ? ORDER BY priority DESC, seq ASC'),
      all: this.#db.prepare('SELECT * FROM migrations ORDER BY seq DESC LIMIT ?'),
      update: this.#db.prepare(
        'UPDATE migrations SET state = @state, attempts = @attempts, phase = @phase, error = @error, bandwidth = @bandwidth, not_before = @not_before, updated_at = @now WHERE id = @id',
      ),
      // Only a running migration has phases: a late report after the end changes nothing.
      setPhase: this.#db.prepare("UPDATE migrations SET phase = ?, updated_at = ? WHERE id = ? AND state = 'running'"),
      journal: this.#db.prepare('INSERT INTO journal (migration_id, at, state, phase, detail) VALUES (?, ?, ?, ?, ?)'),
      journalOf: this.#db.prepare('SELECT * FROM journal WHERE migration_id = ? ORDER BY rowid'),
      setSourceSaved: this.#db.prepare("UPDATE migrations SET source_saved = ?, updated_at = ? WHERE id = ? AND state = 'running'"),
      sourceSaved: this.#db.prepare('SELECT source_saved FROM migrations WHERE id = ?'),
    };
  }

  #migrate(): void {
    const version = z.number().int().parse(this.#db.pragma('user_version', { simple: true }));
    if (version > SCHEMA_VERSION) throw new SchedulerError('DB_TOO_NEW', `the database has schema ${version}; this scheduler knows ${SCHEMA_VERSION}`, { userError: true });
    if (version < 1) {
      this.#db.exec(`
        CREATE TABLE migrations (
          id TEXT PRIMARY KEY, vm TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL,
          reason TEXT NOT NULL, priority INTEGER NOT NULL, mode TEXT NOT NULL, state TEXT NOT NULL,
          attempts INTEGER NOT NULL, phase TEXT, error TEXT, bandwidth REAL,
          memory_mib INTEGER NOT NULL, disk_bytes INTEGER NOT NULL,
          not_before INTEGER NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
          seq INTEGER NOT NULL);
        CREATE UNIQUE INDEX one_active_migration_per_vm ON migrations (vm) WHERE state IN ('queued', 'running');
        CREATE INDEX migrations_by_state ON migrations (state, priority, seq);
        CREATE TABLE journal (migration_id TEXT NOT NULL, at INTEGER NOT NULL, state TEXT NOT NULL, phase TEXT, detail TEXT);
        CREATE INDEX journal_by_migration ON journal (migration_id);
        PRAGMA user_version = 1;`);
    }
    if (version < 2) {
      // The next seq and the recent list read MAX(seq) / ORDER BY seq: without an index both walk
      // every migration ever stored, and enqueue slowed as history grew.
      this.#db.exec(`CREATE INDEX migrations_by_seq ON migrations (seq); PRAGMA user_version = 2;`);
    }
    if (version < 3) {
      // What the engine changed on the source and how to put it back: a recovery after a crash
      // restores the capabilities and parameters, and resumes the guest only if it ran.
      this.#db.exec(`ALTER TABLE migrations ADD COLUMN source_saved TEXT; PRAGMA user_version = 3;`);
    }
    if (version < 4) {
      // Standby replicas (issue 12): who is protected where, and every failover with its RPO.
      this.#db.exec(`
        CREATE TABLE protections (vm TEXT PRIMARY KEY, src TEXT NOT NULL, standby TEXT NOT NULL, interval_ms INTEGER NOT NULL,
          spec TEXT NOT NULL, created_at INTEGER NOT NULL);
        CREATE TABLE recoveries (id TEXT PRIMARY KEY, vm TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL, state TEXT NOT NULL,
          seq INTEGER, point_at INTEGER, rpo_ms INTEGER, detail TEXT, created_at INTEGER NOT NULL);
        PRAGMA user_version = 4;`);
    }
    // Schema 5 leases the standby sync loops between replicas (PostgreSQL's protection_leases):
    // one scheduler on SQLite runs every loop itself and has nothing to add.
    if (version < 5) this.#db.exec('PRAGMA user_version = 5;');
  }

  /** New queued migrations, all or none. A VM that already has an active one keeps it. */
  async enqueue(requests: EnqueueRequest[]): Promise<{ job: MigrationJob; existing: boolean }[]> {
    const now = Date.now();
    return this.#db.transaction(() =>
      requests.map((r) => {
        const active = this.#stmts.activeForVm.get(r.vm);
        if (active) return { job: toJob(active), existing: true };
        const id = `m-${randomBytes(5).toString('hex')}`;
        this.#stmts.insert.run({ id, vm: r.vm, src: r.from, dst: r.to, reason: r.reason, priority: r.priority, mode: r.mode ?? 'precopy', memoryMiB: r.memoryMiB, diskBytes: r.diskBytes, now });
        this.#stmts.journal.run(id, now, 'queued', null, `${r.reason}: ${r.from} -> ${r.to}`);
        return { job: toJob(this.#stmts.get.get(id)), existing: false };
      }),
    )();
  }

  async get(id: string): Promise<MigrationJob | undefined> {
    return this.#get(id);
  }

  #get(id: string): MigrationJob | undefined {
    const row = this.#stmts.get.get(id);
    return row ? toJob(row) : undefined;
  }

  async activeFor(vm: string): Promise<MigrationJob | undefined> {
    const row = this.#stmts.activeForVm.get(vm);
    return row ? toJob(row) : undefined;
  }

  async inState(state: MigrationState): Promise<MigrationJob[]> {
    return this.#stmts.byState.all(state).map(toJob);
  }

  async recent(limit = 1000): Promise<MigrationJob[]> {
    return this.#stmts.all.all(limit).map(toJob);
  }

  async journal(id: string): Promise<JournalEntry[]> {
    return this.#stmts.journalOf.all(id).map((r) => journalSchema.parse(r));
  }

  /** The one way a migration changes state: checked, written and journalled in one transaction. */
  async transition(id: string, to: MigrationState, change: TransitionChange = {}): Promise<MigrationJob> {
    return this.#db.transaction(() => {
      const cur = this.#get(id);
      if (!cur) throw new SchedulerError('NO_SUCH_MIGRATION', `no migration '${id}'`, { userError: true });
      if (!ALLOWED[cur.state].includes(to)) {
        throw new SchedulerError('BAD_TRANSITION', `migration ${id} is ${cur.state} and cannot become ${to}`, { userError: true, context: { id, from: cur.state, to } });
      }
      const now = Date.now();
      this.#stmts.update.run({
        id,
        state: to,
        attempts: change.attempts ?? cur.attempts,
        phase: to === 'queued' ? null : cur.phase,
        error: change.error === undefined ? cur.error : change.error,
        bandwidth: change.bandwidthBytesPerSec === undefined ? cur.bandwidthBytesPerSec : change.bandwidthBytesPerSec,
        not_before: change.notBefore ?? cur.notBefore,
        now,
      });
      this.#stmts.journal.run(id, now, to, cur.phase, change.detail ?? null);
      return this.#get(id)!;
    })();
  }

  /** A phase reported by the engine: journalled, so a post-mortem reads the whole story. */
  async phase(id: string, phase: string): Promise<void> {
    const now = Date.now();
    this.#db.transaction(() => {
      if (this.#stmts.setPhase.run(phase, now, id).changes === 1) this.#stmts.journal.run(id, now, 'running', phase, null);
    })();
  }

  /**
   * The source's settings before the engine changed them (its `source-saved` event), journalled
   * and committed before the engine goes on: a recovery after a crash reads them back.
   */
  async saveSource(id: string, saved: SavedSourceSettings): Promise<void> {
    const now = Date.now();
    this.#db.transaction(() => {
      if (this.#stmts.setSourceSaved.run(JSON.stringify(saved), now, id).changes === 1) {
        this.#stmts.journal.run(id, now, 'running', this.#get(id)?.phase ?? null, `source saved: ${saved.wasRunning ? 'running' : 'paused'}, ${saved.capabilities.length} capabilities`);
      }
    })();
  }

  /** What saveSource stored, parsed; undefined if the engine never got that far. */
  async savedSource(id: string): Promise<SavedSourceSettings | undefined> {
    const row = z.object({ source_saved: z.string().nullable() }).optional().parse(this.#stmts.sourceSaved.get(id));
    if (!row?.source_saved) return undefined;
    return SavedSourceSettingsSchema.parse(JSON.parse(row.source_saved));
  }

  async close(): Promise<void> {
    this.#db.close();
  }

  async addProtection(p: ProtectionRow): Promise<void> {
    this.#db.prepare('INSERT INTO protections (vm, src, standby, interval_ms, spec, created_at) VALUES (?, ?, ?, ?, ?, ?)').run(p.vm, p.source, p.standby, p.intervalMs, JSON.stringify(p.spec), p.createdAt);
  }

  async protections(): Promise<ProtectionRow[]> {
    return this.#db.prepare('SELECT * FROM protections ORDER BY vm').all().map(toProtection);
  }

  async protection(vm: string): Promise<ProtectionRow | undefined> {
    const row = this.#db.prepare('SELECT * FROM protections WHERE vm = ?').get(vm);
    return row ? toProtection(row) : undefined;
  }

  async retargetProtection(vm: string, source: string, spec: unknown): Promise<void> {
    this.#db.prepare('UPDATE protections SET src = ?, spec = ? WHERE vm = ?').run(source, JSON.stringify(spec), vm);
  }

  async removeProtection(vm: string): Promise<void> {
    this.#db.prepare('DELETE FROM protections WHERE vm = ?').run(vm);
  }

  async addRecovery(r: RecoveryRow): Promise<void> {
    this.#db
      .prepare('INSERT INTO recoveries (id, vm, src, dst, state, seq, point_at, rpo_ms, detail, created_at) VALUES (@id, @vm, @source, @standby, @state, @seq, @pointAt, @rpoMs, @detail, @createdAt)')
      .run(r);
  }

  async recoveries(limit = 100): Promise<RecoveryRow[]> {
    return this.#db.prepare('SELECT * FROM recoveries ORDER BY created_at DESC LIMIT ?').all(limit).map(toRecovery);
  }
}
