/**
 * The scheduler's state in PostgreSQL, shared by any number of ferry-scheduler replicas. The
 * same tables as the SQLite store at the same schema version (migrations, journal), plus what
 * sharing needs: `leases` (which replica holds an in-flight migration, until when, under which
 * epoch) and two sequences (arrival order, fencing epochs).
 *
 * Claiming: one short transaction per claim. It takes a transaction-level advisory lock, so the
 * admission limits (running migrations per source, per destination, in all, counted in the
 * database) hold across replicas exactly; the candidate row is then locked with
 * `FOR UPDATE SKIP LOCKED`, so a claim never waits behind a row another transaction holds (a
 * cancel, a takeover). No transaction is ever open while the engine talks to QEMU or an agent:
 * the claim commits, then the replica acts, then each phase is its own small transaction.
 *
 * Leases use the database's clock (clock_timestamp), never a replica's: replicas whose clocks
 * disagree still agree on when a lease ran out. An epoch comes from `fencing_epoch`, so a later
 * claim of a migration always carries a larger one; every write about a claimed migration names
 * its claim (owner and epoch) and is refused (LEASE_LOST) when that is no longer the current one.
 *
 * Client: node-postgres (`pg`): the reference PostgreSQL client for Node, plain JavaScript (no
 * native build, unlike better-sqlite3 or pg-native), parameterised queries, a pool that drops a
 * broken connection and dials again, maintained for over a decade with typed bindings.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { z } from 'zod';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { SavedSourceSettingsSchema, type SavedSourceSettings } from '../engine/types.js';
import { SchedulerError, type MigrationJob, type MigrationState } from './types.js';
import {
  ALLOWED,
  journalSchema,
  SCHEMA_VERSION,
  toJob,
  toProtection,
  toRecovery,
  type Claim,
  type ClaimedJob,
  type ClaimLimits,
  type EnqueueRequest,
  type FleetMessage,
  type JournalEntry,
  type ProtectionRow,
  type RecoveryRow,
  type SchedulerStore,
  type TransitionChange,
  redactDatabase as redact,
} from './store.js';

/** Milliseconds since the epoch on the database's clock. */
const NOW_MS = '(extract(epoch from clock_timestamp()) * 1000)::bigint';
/** Any constant: the lock that serialises claims (and schema changes) across replicas. */
const CLAIM_LOCK = 7_430_001;
const SCHEMA_LOCK = 7_430_002;

const intText = z.union([z.number().int(), z.string().regex(/^-?\d+$/).transform(Number)]);

/** SQLSTATEs and socket errors after which the same statement may simply be sent again. */
const TRANSIENT = new Set(['57P01', '57P02', '57P03', '08000', '08003', '08006', '08001', '08004', '53300', 'ECONNREFUSED', 'ECONNRESET', 'ENOENT', 'EPIPE', 'ETIMEDOUT']);

function transient(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const code = 'code' in err && typeof err.code === 'string' ? err.code : undefined;
  if (code !== undefined && TRANSIENT.has(code)) return true;
  // node-postgres' own words for a connection that went away under a query.
  const message = err instanceof Error ? err.message : '';
  return /Connection terminated|connection timeout|Client has encountered a connection error/i.test(message);
}

/** The NOTIFY channel replicas publish their watch events on (fleet-events.ts). */
const EVENT_CHANNEL = 'ferry_events';
const fleetMessageSchema = z.object({ origin: z.string(), event: z.unknown() });

/**
 * LISTEN on a connection of its own (a pooled one goes back to others, and its LISTEN with it),
 * dialled again a second after it drops: a database restart costs watchers the events published
 * while it was down, never the stream.
 */
class EventListener {
  readonly #url: string;
  readonly #log: Logger;
  readonly #onMessage: (m: FleetMessage) => void;
  #client: pg.Client | undefined;
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  constructor(url: string, log: Logger, onMessage: (m: FleetMessage) => void) {
    this.#url = url;
    this.#log = log;
    this.#onMessage = onMessage;
  }

  /** One attempt; a failed one is tried again later, so this never throws. */
  async connect(): Promise<void> {
    if (this.#closed) return;
    const client = new pg.Client({ connectionString: this.#url, connectionTimeoutMillis: 5_000 });
    client.on('notification', (n) => {
      if (n.channel !== EVENT_CHANNEL || n.payload === undefined) return;
      let raw: unknown;
      try {
        raw = JSON.parse(n.payload);
      } catch {
        return void this.#log.warn('a NOTIFY on the events channel was not JSON; skipped');
      }
      const m = fleetMessageSchema.safeParse(raw);
      if (m.success) this.#onMessage(m.data);
      else this.#log.warn('a NOTIFY on the events channel had no origin; skipped');
    });
    client.on('error', (err) => this.#log.warn({ err: errorText(err) }, 'the events connection failed; dialling again'));
    client.on('end', () => {
      if (this.#client === client) this.#client = undefined;
      this.#again();
    });
    try {
      await client.connect();
      await client.query(`LISTEN ${EVENT_CHANNEL}`);
      if (this.#closed) return void (await client.end().catch(() => undefined));
      this.#client = client;
    } catch (err) {
      this.#log.warn({ err: errorText(err) }, 'cannot listen for the other replicas\' events yet; trying again');
      await client.end().catch(() => undefined);
      this.#again();
    }
  }

  #again(): void {
    if (this.#closed || this.#timer) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      void this.connect();
    }, 1_000);
  }

  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    const c = this.#client;
    this.#client = undefined;
    await c?.end().catch(() => undefined);
  }
}

export class PostgresStore implements SchedulerStore {
  readonly shared = true;
  readonly #pool: pg.Pool;
  readonly #log: Logger;
  /** How long a statement keeps being retried while the database is unreachable. */
  readonly #retryMs: number;

  readonly #url: string;

  private constructor(url: string, pool: pg.Pool, log: Logger, retryMs: number) {
    this.#url = url;
    this.#pool = pool;
    this.#log = log;
    this.#retryMs = retryMs;
  }

  static async open(url: string, opts: { log?: Logger; retryMs?: number } = {}): Promise<PostgresStore> {
    const log = (opts.log ?? silentLogger).child({ component: 'pg-store' });
    const pool = new pg.Pool({ connectionString: url, max: 8, connectionTimeoutMillis: 5_000, idleTimeoutMillis: 30_000 });
    // An idle connection the server closed (a restart) must not become an uncaught error.
    pool.on('error', (err) => log.warn({ err: errorText(err) }, 'an idle database connection failed; the pool dials again'));
    const store = new PostgresStore(url, pool, log, opts.retryMs ?? 10_000);
    try {
      await store.#migrate();
    } catch (err) {
      await pool.end().catch(() => undefined);
      if (err instanceof SchedulerError) throw err;
      throw new SchedulerError('DB_UNREACHABLE', `cannot open the PostgreSQL database ${redact(url)}: ${errorText(err)}`, { userError: true, cause: err });
    }
    return store;
  }

  /** One transaction, sent again while the database is restarting or unreachable (up to retryMs). */
  async #tx<T>(what: string, fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
    const deadline = Date.now() + this.#retryMs;
    for (let attempt = 1; ; attempt++) {
      let client: pg.PoolClient | undefined;
      // A connection the server ends while it is checked out (a restart between two statements)
      // emits 'error' on the client: without a listener that is an uncaught exception. The
      // statement in flight fails as well, and that failure is the one handled below.
      const onError = (err: Error): void => this.#log.warn({ what, err: errorText(err) }, 'a database connection failed in a transaction');
      try {
        client = await this.#pool.connect();
        client.on('error', onError);
        await client.query('BEGIN');
        const out = await fn(client);
        await client.query('COMMIT');
        client.off('error', onError);
        client.release();
        return out;
      } catch (err) {
        if (client) {
          await client.query('ROLLBACK').catch(() => undefined);
          // A broken connection goes out of the pool instead of back into it (keeping the
          // listener: it may still report its end); a sound one goes back without it.
          if (transient(err)) client.release(true);
          else {
            client.off('error', onError);
            client.release();
          }
        }
        if (!transient(err) || Date.now() >= deadline) {
          if (err instanceof SchedulerError) throw err;
          if (transient(err)) throw new SchedulerError('DB_UNREACHABLE', `${what}: the database did not answer for ${this.#retryMs} ms: ${errorText(err)}`, { cause: err });
          throw err;
        }
        this.#log.warn({ what, attempt, err: errorText(err) }, 'database unreachable; trying again');
        await new Promise((r) => setTimeout(r, Math.min(1_000, 100 * attempt)));
      }
    }
  }

  /** One statement outside a transaction (a read), sent again while the database is unreachable. */
  async #read(sql: string, params: unknown[]): Promise<pg.QueryResult> {
    const deadline = Date.now() + this.#retryMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.#pool.query(sql, params);
      } catch (err) {
        if (!transient(err) || Date.now() >= deadline) {
          if (transient(err)) throw new SchedulerError('DB_UNREACHABLE', `read: the database did not answer for ${this.#retryMs} ms: ${errorText(err)}`, { cause: err });
          throw err;
        }
        await new Promise((r) => setTimeout(r, Math.min(1_000, 100 * attempt)));
      }
    }
  }

  async #migrate(): Promise<void> {
    await this.#tx('schema', async (c) => {
      await c.query('SELECT pg_advisory_xact_lock($1)', [SCHEMA_LOCK]);
      await c.query('CREATE TABLE IF NOT EXISTS ferry_schema (version INTEGER NOT NULL)');
      const rows = (await c.query('SELECT version FROM ferry_schema')).rows;
      const version = rows.length === 0 ? 0 : z.object({ version: z.number().int() }).parse(rows[0]).version;
      if (version > SCHEMA_VERSION) throw new SchedulerError('DB_TOO_NEW', `the database has schema ${version}; this scheduler knows ${SCHEMA_VERSION}`, { userError: true });
      if (version === SCHEMA_VERSION) return;
      // Schema 3 at once: the SQLite store's versions 1-3 (its tables, indexes and source_saved).
      if (version < 3) await c.query(`
        CREATE TABLE migrations (
          id TEXT PRIMARY KEY, vm TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL,
          reason TEXT NOT NULL, priority INTEGER NOT NULL, mode TEXT NOT NULL, state TEXT NOT NULL,
          attempts INTEGER NOT NULL, phase TEXT, error TEXT, bandwidth DOUBLE PRECISION,
          memory_mib BIGINT NOT NULL, disk_bytes BIGINT NOT NULL,
          not_before BIGINT NOT NULL, created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL,
          seq BIGINT NOT NULL, source_saved TEXT);
        CREATE UNIQUE INDEX one_active_migration_per_vm ON migrations (vm) WHERE state IN ('queued', 'running');
        CREATE INDEX migrations_by_state ON migrations (state, priority DESC, seq);
        CREATE INDEX migrations_by_seq ON migrations (seq);
        CREATE INDEX active_by_destination ON migrations (dst) INCLUDE (memory_mib, disk_bytes) WHERE state IN ('queued', 'running');
        CREATE TABLE journal (entry BIGSERIAL PRIMARY KEY, migration_id TEXT NOT NULL, at BIGINT NOT NULL, state TEXT NOT NULL, phase TEXT, detail TEXT);
        CREATE INDEX journal_by_migration ON journal (migration_id, entry);
        CREATE SEQUENCE migration_seq;
        CREATE SEQUENCE fencing_epoch;
        CREATE TABLE leases (
          migration_id TEXT PRIMARY KEY REFERENCES migrations (id),
          owner TEXT NOT NULL, epoch BIGINT NOT NULL, lease_until BIGINT NOT NULL,
          cancel_requested BOOLEAN NOT NULL DEFAULT false);
        CREATE INDEX leases_by_expiry ON leases (lease_until);`);
      // Schema 4: standby replicas (issue 12), who is protected where, and every failover with its RPO.
      if (version < 4) {
        await c.query(`
          CREATE TABLE protections (vm TEXT PRIMARY KEY, src TEXT NOT NULL, standby TEXT NOT NULL, interval_ms INTEGER NOT NULL,
            spec TEXT NOT NULL, created_at BIGINT NOT NULL);
          CREATE TABLE recoveries (id TEXT PRIMARY KEY, vm TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL, state TEXT NOT NULL,
            seq BIGINT, point_at BIGINT, rpo_ms BIGINT, detail TEXT, created_at BIGINT NOT NULL);`);
      }
      // Schema 5: the standby sync loops are leased (one replica runs each protection's loop).
      // `op`: taken for an operation (unprotect, recover, evacuation), no loop runs under it.
      if (version < 5) {
        await c.query(`
          CREATE TABLE protection_leases (vm TEXT PRIMARY KEY, owner TEXT NOT NULL, lease_until BIGINT NOT NULL,
            op BOOLEAN NOT NULL DEFAULT false, hand_over BOOLEAN NOT NULL DEFAULT false);`);
      }
      await c.query('DELETE FROM ferry_schema');
      await c.query('INSERT INTO ferry_schema (version) VALUES ($1)', [SCHEMA_VERSION]);
    });
  }

  async enqueue(requests: EnqueueRequest[]): Promise<{ job: MigrationJob; existing: boolean }[]> {
    const now = Date.now();
    const attempt = (): Promise<{ job: MigrationJob; existing: boolean }[]> =>
      this.#tx('enqueue', async (c) => {
        const out: { job: MigrationJob; existing: boolean }[] = [];
        for (const r of requests) {
          const active = (await c.query("SELECT * FROM migrations WHERE vm = $1 AND state IN ('queued', 'running')", [r.vm])).rows[0];
          if (active) {
            out.push({ job: toJob(active), existing: true });
            continue;
          }
          const id = `m-${randomBytes(5).toString('hex')}`;
          const row = (
            await c.query(
              `INSERT INTO migrations (id, vm, src, dst, reason, priority, mode, state, attempts, phase, error, bandwidth, memory_mib, disk_bytes, not_before, created_at, updated_at, seq)
               VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', 0, NULL, NULL, NULL, $8, $9, 0, $10, $10, nextval('migration_seq')) RETURNING *`,
              [id, r.vm, r.from, r.to, r.reason, r.priority, r.mode ?? 'precopy', r.memoryMiB, r.diskBytes, now],
            )
          ).rows[0];
          await c.query('INSERT INTO journal (migration_id, at, state, phase, detail) VALUES ($1, $2, $3, NULL, $4)', [id, now, 'queued', `${r.reason}: ${r.from} -> ${r.to}`]);
          out.push({ job: toJob(row), existing: false });
        }
        return out;
      });
    try {
      return await attempt();
    } catch (err) {
      // Another replica queued one of these VMs at the same instant: all or none, so again, and
      // this time its migration is the existing one.
      if (typeof err === 'object' && err !== null && 'code' in err && err.code === '23505') return attempt();
      throw err;
    }
  }

  async #one(sql: string, params: unknown[]): Promise<unknown> {
    return (await this.#read(sql, params)).rows[0];
  }

  async get(id: string): Promise<MigrationJob | undefined> {
    const row = await this.#one('SELECT * FROM migrations WHERE id = $1', [id]);
    return row ? toJob(row) : undefined;
  }

  async activeFor(vm: string): Promise<MigrationJob | undefined> {
    const row = await this.#one("SELECT * FROM migrations WHERE vm = $1 AND state IN ('queued', 'running')", [vm]);
    return row ? toJob(row) : undefined;
  }

  async inState(state: MigrationState): Promise<MigrationJob[]> {
    return (await this.#read('SELECT * FROM migrations WHERE state = $1 ORDER BY priority DESC, seq ASC', [state])).rows.map(toJob);
  }

  async recent(limit = 1000): Promise<MigrationJob[]> {
    return (await this.#read('SELECT * FROM migrations ORDER BY seq DESC LIMIT $1', [limit])).rows.map(toJob);
  }

  async journal(id: string): Promise<JournalEntry[]> {
    return (await this.#read('SELECT migration_id, at, state, phase, detail FROM journal WHERE migration_id = $1 ORDER BY entry', [id])).rows.map((r) => journalSchema.parse(r));
  }

  /** The migration's row, locked, after checking that `claim` (if any) is still its current one. */
  async #locked(c: pg.PoolClient, id: string, claim: Claim | undefined): Promise<MigrationJob> {
    const row: unknown = (await c.query('SELECT * FROM migrations WHERE id = $1 FOR UPDATE', [id])).rows[0];
    if (!row) throw new SchedulerError('NO_SUCH_MIGRATION', `no migration '${id}'`, { userError: true });
    if (claim) {
      const lease = (await c.query('SELECT owner, epoch FROM leases WHERE migration_id = $1 FOR UPDATE', [id])).rows[0];
      const held = z.object({ owner: z.string(), epoch: intText }).optional().parse(lease);
      if (!held || held.owner !== claim.owner || held.epoch !== claim.epoch) {
        throw new SchedulerError('LEASE_LOST', `migration ${id}: the claim of ${claim.owner} (epoch ${claim.epoch}) is no longer current${held ? `; ${held.owner} holds it at epoch ${held.epoch}` : ''}`, {
          context: { id, epoch: claim.epoch },
        });
      }
    }
    return toJob(row);
  }

  async transition(id: string, to: MigrationState, change: TransitionChange = {}, claim?: Claim): Promise<MigrationJob> {
    return this.#tx('transition', async (c) => {
      const cur = await this.#locked(c, id, claim);
      if (!ALLOWED[cur.state].includes(to)) {
        throw new SchedulerError('BAD_TRANSITION', `migration ${id} is ${cur.state} and cannot become ${to}`, { userError: true, context: { id, from: cur.state, to } });
      }
      const now = Date.now();
      const row = (
        await c.query('UPDATE migrations SET state = $2, attempts = $3, phase = $4, error = $5, bandwidth = $6, not_before = $7, updated_at = $8 WHERE id = $1 RETURNING *', [
          id,
          to,
          change.attempts ?? cur.attempts,
          to === 'queued' ? null : cur.phase,
          change.error === undefined ? cur.error : change.error,
          change.bandwidthBytesPerSec === undefined ? cur.bandwidthBytesPerSec : change.bandwidthBytesPerSec,
          change.notBefore ?? cur.notBefore,
          now,
        ])
      ).rows[0];
      await c.query('INSERT INTO journal (migration_id, at, state, phase, detail) VALUES ($1, $2, $3, $4, $5)', [id, now, to, cur.phase, change.detail ?? null]);
      // Nothing is in flight any more: no lease (needs-source keeps its own, for the next attempt).
      if (to !== 'running' && to !== 'needs-source') await c.query('DELETE FROM leases WHERE migration_id = $1', [id]);
      return toJob(row);
    });
  }

  async phase(id: string, phase: string, claim?: Claim): Promise<void> {
    await this.#tx('phase', async (c) => {
      const cur = await this.#locked(c, id, claim);
      if (cur.state !== 'running') return;
      const now = Date.now();
      await c.query('UPDATE migrations SET phase = $2, updated_at = $3 WHERE id = $1', [id, phase, now]);
      await c.query('INSERT INTO journal (migration_id, at, state, phase, detail) VALUES ($1, $2, $3, $4, NULL)', [id, now, 'running', phase]);
    });
  }

  async saveSource(id: string, saved: SavedSourceSettings, claim?: Claim): Promise<void> {
    await this.#tx('saveSource', async (c) => {
      const cur = await this.#locked(c, id, claim);
      if (cur.state !== 'running') return;
      const now = Date.now();
      await c.query('UPDATE migrations SET source_saved = $2, updated_at = $3 WHERE id = $1', [id, JSON.stringify(saved), now]);
      await c.query('INSERT INTO journal (migration_id, at, state, phase, detail) VALUES ($1, $2, $3, $4, $5)', [
        id,
        now,
        'running',
        cur.phase,
        `source saved: ${saved.wasRunning ? 'running' : 'paused'}, ${saved.capabilities.length} capabilities`,
      ]);
    });
  }

  async savedSource(id: string): Promise<SavedSourceSettings | undefined> {
    const row = z.object({ source_saved: z.string().nullable() }).optional().parse(await this.#one('SELECT source_saved FROM migrations WHERE id = $1', [id]));
    if (!row?.source_saved) return undefined;
    return SavedSourceSettingsSchema.parse(JSON.parse(row.source_saved));
  }

  async #lease(c: pg.PoolClient, id: string, owner: string, leaseMs: number): Promise<{ epoch: number; previous: string | undefined }> {
    const before = z.object({ owner: z.string() }).optional().parse((await c.query('SELECT owner FROM leases WHERE migration_id = $1', [id])).rows[0]);
    const row = (
      await c.query(
        `INSERT INTO leases (migration_id, owner, epoch, lease_until, cancel_requested) VALUES ($1, $2, nextval('fencing_epoch'), ${NOW_MS} + $3, false)
         ON CONFLICT (migration_id) DO UPDATE SET owner = EXCLUDED.owner, epoch = EXCLUDED.epoch, lease_until = EXCLUDED.lease_until, cancel_requested = leases.cancel_requested
         RETURNING epoch`,
        [id, owner, leaseMs],
      )
    ).rows[0];
    return { epoch: z.object({ epoch: intText }).parse(row).epoch, previous: before?.owner };
  }

  async claimQueued(owner: string, leaseMs: number, limits: ClaimLimits): Promise<ClaimedJob | undefined> {
    return this.#tx('claim', async (c) => {
      await c.query('SELECT pg_advisory_xact_lock($1)', [CLAIM_LOCK]);
      // What runs now, in every replica (a handful of rows): which hosts are full. Stable while
      // the lock is held, since every claim takes it.
      const running = z
        .array(z.object({ src: z.string(), dst: z.string(), now_ms: intText }))
        .parse((await c.query(`SELECT src, dst, ${NOW_MS} AS now_ms FROM migrations WHERE state = 'running'`)).rows);
      if (running.length >= limits.cluster) return undefined;
      const count = (key: 'src' | 'dst'): Map<string, number> => running.reduce((m, r) => m.set(r[key], (m.get(r[key]) ?? 0) + 1), new Map<string, number>());
      const out = count('src');
      const inc = count('dst');
      const fullSrc = [...out].filter(([, n]) => n >= limits.outgoingPerHost).map(([h]) => h);
      const fullDst = [...inc].filter(([, n]) => n >= limits.incomingPerHost).map(([h]) => h);
      const nowMs = running[0]?.now_ms ?? z.object({ now_ms: intText }).parse((await c.query(`SELECT ${NOW_MS} AS now_ms`)).rows[0]).now_ms;
      // Walks the queued rows in index order (state, priority DESC, seq) and stops at the first
      // that fits: it does not grow with the queue unless most of it waits for full hosts.
      const found: unknown = (
        await c.query(
          `SELECT * FROM migrations
           WHERE state = 'queued' AND not_before <= $1 AND NOT (src = ANY($2::text[])) AND NOT (dst = ANY($3::text[]))
           ORDER BY priority DESC, seq ASC
           LIMIT 1
           FOR UPDATE SKIP LOCKED`,
          [nowMs, fullSrc, fullDst],
        )
      ).rows[0];
      if (!found) return undefined;
      const queued = toJob(found);
      const now = Date.now();
      const bandwidth = limits.bandwidth((out.get(queued.from) ?? 0) + 1, (inc.get(queued.to) ?? 0) + 1);
      const row = (
        await c.query("UPDATE migrations SET state = 'running', attempts = attempts + 1, error = NULL, bandwidth = $2, updated_at = $3 WHERE id = $1 RETURNING *", [queued.id, bandwidth, now])
      ).rows[0];
      const { epoch } = await this.#lease(c, queued.id, owner, leaseMs);
      await c.query('INSERT INTO journal (migration_id, at, state, phase, detail) VALUES ($1, $2, $3, NULL, $4)', [queued.id, now, 'running', `claimed by ${owner}, epoch ${epoch}`]);
      return { job: toJob(row), claim: { owner, epoch } };
    });
  }

  async claimExpired(owner: string, leaseMs: number, max: number): Promise<ClaimedJob[]> {
    return this.#tx('takeover', async (c) => {
      const rows = (
        await c.query(
          `SELECT m.* FROM migrations m LEFT JOIN leases l ON l.migration_id = m.id
           WHERE m.state IN ('running', 'needs-source') AND (l.migration_id IS NULL OR l.lease_until < ${NOW_MS})
           ORDER BY m.seq LIMIT $1
           FOR UPDATE OF m SKIP LOCKED`,
          [max],
        )
      ).rows;
      const out: ClaimedJob[] = [];
      for (const row of rows) {
        const job = toJob(row);
        const { epoch, previous } = await this.#lease(c, job.id, owner, leaseMs);
        await c.query('INSERT INTO journal (migration_id, at, state, phase, detail) VALUES ($1, $2, $3, $4, $5)', [
          job.id,
          Date.now(),
          job.state,
          job.phase,
          `taken over by ${owner}, epoch ${epoch}: the lease of ${previous ?? 'no replica'} expired`,
        ]);
        out.push({ job, claim: { owner, epoch } });
      }
      return out;
    });
  }

  async renew(claims: { id: string; claim: Claim }[], leaseMs: number): Promise<{ id: string; cancelRequested: boolean }[]> {
    if (claims.length === 0) return [];
    // One try only: a heartbeat that cannot reach the database says so at once; the caller counts.
    const res = await this.#pool.query(
      `UPDATE leases l SET lease_until = ${NOW_MS} + $4
       FROM unnest($1::text[], $2::text[], $3::bigint[]) AS h(id, owner, epoch)
       WHERE l.migration_id = h.id AND l.owner = h.owner AND l.epoch = h.epoch
       RETURNING l.migration_id, l.cancel_requested`,
      [claims.map((x) => x.id), claims.map((x) => x.claim.owner), claims.map((x) => x.claim.epoch), leaseMs],
    );
    return res.rows.map((r) => {
      const p = z.object({ migration_id: z.string(), cancel_requested: z.boolean() }).parse(r);
      return { id: p.migration_id, cancelRequested: p.cancel_requested };
    });
  }

  async release(id: string, claim: Claim, afterMs = 0): Promise<void> {
    await this.#tx('release', (c) => c.query(`UPDATE leases SET lease_until = ${NOW_MS} + $4 WHERE migration_id = $1 AND owner = $2 AND epoch = $3`, [id, claim.owner, claim.epoch, afterMs]));
  }

  async claimProtections(owner: string, leaseMs: number): Promise<{ held: string[]; handOver: string[] }> {
    return this.#tx('claimProtections', async (c) => {
      await c.query('DELETE FROM protection_leases l WHERE NOT EXISTS (SELECT 1 FROM protections p WHERE p.vm = l.vm)');
      await c.query(
        `INSERT INTO protection_leases (vm, owner, lease_until)
         SELECT p.vm, $1, ${NOW_MS} + $2 FROM protections p
         ON CONFLICT (vm) DO UPDATE SET owner = $1, lease_until = EXCLUDED.lease_until, op = false, hand_over = false
         WHERE protection_leases.lease_until < ${NOW_MS}`,
        [owner, leaseMs],
      );
      const rows = (await c.query(`UPDATE protection_leases SET lease_until = ${NOW_MS} + $2 WHERE owner = $1 AND NOT op RETURNING vm, hand_over`, [owner, leaseMs])).rows;
      // An operation's lease is renewed too, but never runs a loop.
      await c.query(`UPDATE protection_leases SET lease_until = ${NOW_MS} + $2 WHERE owner = $1 AND op`, [owner, leaseMs]);
      const parsed = rows.map((r) => z.object({ vm: z.string(), hand_over: z.boolean() }).parse(r));
      return { held: parsed.filter((r) => !r.hand_over).map((r) => r.vm), handOver: parsed.filter((r) => r.hand_over).map((r) => r.vm) };
    });
  }

  async takeProtection(vm: string, owner: string, leaseMs: number): Promise<boolean> {
    return this.#tx('takeProtection', async (c) => {
      const taken = await c.query(
        `INSERT INTO protection_leases (vm, owner, lease_until, op) VALUES ($1, $2, ${NOW_MS} + $3, true)
         ON CONFLICT (vm) DO UPDATE SET owner = $2, lease_until = EXCLUDED.lease_until, op = true, hand_over = false
         WHERE protection_leases.owner = $2 OR protection_leases.lease_until < ${NOW_MS}
         RETURNING vm`,
        [vm, owner, leaseMs],
      );
      if (taken.rows.length > 0) return true;
      await c.query('UPDATE protection_leases SET hand_over = true WHERE vm = $1', [vm]);
      return false;
    });
  }

  async releaseProtection(vm: string, owner: string): Promise<void> {
    await this.#tx('releaseProtection', (c) => c.query('DELETE FROM protection_leases WHERE vm = $1 AND owner = $2', [vm, owner]));
  }

  async requestCancel(id: string): Promise<void> {
    await this.#tx('cancel', (c) => c.query('UPDATE leases SET cancel_requested = true WHERE migration_id = $1', [id]));
  }

  async reservations(): Promise<Map<string, { memoryMiB: number; diskBytes: number }>> {
    const res = await this.#read("SELECT dst, sum(memory_mib) AS memory_mib, sum(disk_bytes) AS disk_bytes FROM migrations WHERE state IN ('queued', 'running') GROUP BY dst", []);
    const row = z.object({ dst: z.string(), memory_mib: z.union([z.number(), z.string()]).transform(Number), disk_bytes: z.union([z.number(), z.string()]).transform(Number) });
    return new Map(res.rows.map((r) => row.parse(r)).map((r) => [r.dst, { memoryMiB: r.memory_mib, diskBytes: r.disk_bytes }]));
  }

  async close(): Promise<void> {
    await this.#pool.end();
  }

  async publish(m: FleetMessage): Promise<void> {
    const payload = JSON.stringify(m);
    // NOTIFY refuses a payload of 8000 bytes or more; events are small by design (fleet-events.ts).
    if (Buffer.byteLength(payload) >= 8000) throw new SchedulerError('EVENT_TOO_LARGE', `an event of ${Buffer.byteLength(payload)} bytes does not fit a NOTIFY`);
    await this.#pool.query('SELECT pg_notify($1, $2)', [EVENT_CHANNEL, payload]);
  }

  async listen(listener: (m: FleetMessage) => void): Promise<() => Promise<void>> {
    const l = new EventListener(this.#url, this.#log, listener);
    await l.connect();
    return () => l.close();
  }

  async addProtection(p: ProtectionRow): Promise<void> {
    await this.#tx('addProtection', (c) =>
      c.query('INSERT INTO protections (vm, src, standby, interval_ms, spec, created_at) VALUES ($1, $2, $3, $4, $5, $6)', [p.vm, p.source, p.standby, p.intervalMs, JSON.stringify(p.spec), p.createdAt]),
    );
  }

  async protections(): Promise<ProtectionRow[]> {
    return (await this.#read('SELECT * FROM protections ORDER BY vm', [])).rows.map(toProtection);
  }

  async protection(vm: string): Promise<ProtectionRow | undefined> {
    const row = await this.#one('SELECT * FROM protections WHERE vm = $1', [vm]);
    return row ? toProtection(row) : undefined;
  }

  async retargetProtection(vm: string, source: string, spec: unknown): Promise<void> {
    await this.#tx('retargetProtection', (c) => c.query('UPDATE protections SET src = $1, spec = $2 WHERE vm = $3', [source, JSON.stringify(spec), vm]));
  }

  async removeProtection(vm: string): Promise<void> {
    await this.#tx('removeProtection', (c) => c.query('DELETE FROM protections WHERE vm = $1', [vm]));
  }

  async addRecovery(r: RecoveryRow): Promise<void> {
    await this.#tx('addRecovery', (c) =>
      c.query('INSERT INTO recoveries (id, vm, src, dst, state, seq, point_at, rpo_ms, detail, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)', [
        r.id, r.vm, r.source, r.standby, r.state, r.seq, r.pointAt, r.rpoMs, r.detail, r.createdAt,
      ]),
    );
  }

  async recoveries(limit = 100): Promise<RecoveryRow[]> {
    return (await this.#read('SELECT * FROM recoveries ORDER BY created_at DESC LIMIT $1', [limit])).rows.map(toRecovery);
  }
}
