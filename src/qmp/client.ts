/**
 * QmpClient: one QMP session. The layering follows QEMU's python/qemu/qmp: a connection with one
 * reader and one disconnect path, under the QMP specifics (greeting, negotiation, ids, execute).
 *
 * Lifecycle:  greeting -> negotiating -> ready -> closed   (closed is reachable from every state)
 *
 * Every way the session can end (close(), QEMU hanging up, a socket error, a protocol violation)
 * goes through #shutdown, which rejects every pending call with QmpDisconnectedError, fails every
 * event wait, ends every event iterator, and resolves `closed`. Nothing is left hanging.
 */
import type { Duplex } from 'node:stream';
import { z } from 'zod';
import { errorText } from '../errors.js';
import { silentLogger, type Logger } from '../log.js';
import { buildCapabilities, type QmpCapabilities } from './capabilities.js';
import {
  replySchemas,
  type ArgsOf,
  type SchemaInfo,
  type CallOptions,
  type QmpCommandName,
  type ReturnOf,
} from './commands.js';
import {
  QmpAbortError,
  QmpCommandError,
  QmpConnectError,
  QmpDisconnectedError,
  QmpError,
  QmpProtocolError,
  QmpTimeoutError,
  QmpUsageError,
} from './errors.js';
import { EventLog } from './event-log.js';
import { parseEvent, type QmpEvent } from './events.js';
import { LineDecoder } from './framing.js';
import { processSchemaCache, type SchemaCache } from './schema-cache.js';
import { greetingSchema, type ConnectOptions, type QmpGreeting } from './session-options.js';
import { describeTarget, openStream, type QmpTarget } from './transport.js';

export const DEFAULT_CALL_TIMEOUT_MS = 30_000;

export type { ConnectOptions, QmpGreeting } from './session-options.js';

type State = 'greeting' | 'negotiating' | 'ready' | 'closed';

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: QmpError): void;
}

/** Ids of calls given up (timeout, abort) whose replies may still come; bounded. */
const ABANDONED_KEPT = 1024;

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function snippet(text: string): string {
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}

export class QmpClient implements AsyncDisposable {
  readonly closed: Promise<QmpError | undefined>;
  readonly #where: string;
  readonly #stream: Duplex;
  readonly #log: Logger;
  readonly #decoder = new LineDecoder();
  readonly #pending = new Map<string, Pending>();
  readonly #abandoned = new Set<string>();
  readonly #events: EventLog;
  #state: State = 'greeting';
  #seq = 0;
  #oob = false;
  #greeting: QmpGreeting | undefined;
  #greetingWaiter: { resolve(g: QmpGreeting): void; reject(err: unknown): void } | undefined;
  #closedWith: QmpError | undefined;
  #resolveClosed!: (reason: QmpError | undefined) => void;
  #caps: Promise<QmpCapabilities> | undefined;
  readonly #schemaCache: SchemaCache;

  private constructor(stream: Duplex, where: string, logger: Logger, schemaCache: SchemaCache) {
    this.#stream = stream;
    this.#schemaCache = schemaCache;
    this.#where = where;
    this.#log = logger;
    this.#events = new EventLog({ logger, where });
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    stream.on('data', this.#onData);
    stream.on('end', this.#onEnd);
    stream.on('close', this.#onEnd);
    // Kept for the stream's whole life: a late 'error' after shutdown must not crash the process.
    stream.on('error', this.#onError);
  }

  /**
   * Opens a session: connects, reads the greeting, negotiates capabilities. Rejects with
   * QmpConnectError naming the target (missing path, refused, not QMP, no greeting in time,
   * negotiation refused) or QmpAbortError if `signal` fires.
   */
  static async connect(target: QmpTarget, opts: ConnectOptions = {}): Promise<QmpClient> {
    const where = describeTarget(target);
    const timeoutMs = opts.timeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
    const logger = (opts.logger ?? silentLogger).child({ qmp: opts.name ?? where });
    const deadline = new AbortController();
    const timedOut = Symbol('timeout');
    const timer = setTimeout(() => deadline.abort(timedOut), timeoutMs);
    const onAbort = (): void => deadline.abort(opts.signal?.reason);
    if (opts.signal?.aborted) onAbort();
    else opts.signal?.addEventListener('abort', onAbort, { once: true });

    let stage: 'connecting' | 'waiting for the greeting' | 'negotiating capabilities' = 'connecting';
    let client: QmpClient | undefined;
    try {
      const stream = await openStream(target, deadline.signal);
      stage = 'waiting for the greeting';
      client = new QmpClient(stream, where, logger, opts.schemaCache ?? processSchemaCache());
      const greeting = await client.#waitGreeting(deadline.signal);
      stage = 'negotiating capabilities';
      const enableOob = opts.oob === true && greeting.capabilities.includes('oob');
      await client.#call('execute', 'qmp_capabilities', enableOob ? { enable: ['oob'] } : undefined, {
        signal: deadline.signal,
        timeoutMs,
      });
      client.#oob = enableOob;
      client.#transition('ready');
      logger.debug({ version: greeting.version.qemu, oob: enableOob }, 'QMP session ready');
      return client;
    } catch (err) {
      const failure = QmpClient.#connectFailure(err, { where, stage, timeoutMs, timedOut, deadline: deadline.signal, userSignal: opts.signal });
      if (client) {
        client.#shutdown(failure);
      } else if ('stream' in target) {
        target.stream.destroy();
      }
      throw failure;
    } finally {
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }

  static #connectFailure(
    err: unknown,
    c: { where: string; stage: string; timeoutMs: number; timedOut: symbol; deadline: AbortSignal; userSignal: AbortSignal | undefined },
  ): QmpError {
    if (c.deadline.aborted && c.deadline.reason === c.timedOut) {
      // QEMU serves one client per QMP socket: a second one is accepted but never greeted.
      const hint = c.stage === 'waiting for the greeting' ? ' (not QMP, or QEMU is busy with another client on this socket?)' : '';
      return new QmpConnectError(`QMP at ${c.where}: timed out after ${c.timeoutMs} ms ${c.stage}${hint}`, {
        cause: err,
        context: { target: c.where, stage: c.stage },
      });
    }
    if (c.userSignal?.aborted) {
      return new QmpAbortError(`aborted while ${c.stage} to QMP at ${c.where}`, { cause: c.userSignal.reason });
    }
    if (err instanceof QmpConnectError) return err;
    if (err instanceof QmpCommandError) {
      return new QmpConnectError(`QMP at ${c.where} refused capabilities negotiation: ${err.errorClass}: ${err.desc}`, {
        cause: err,
        context: { target: c.where },
      });
    }
    return new QmpConnectError(`QMP at ${c.where}: failed ${c.stage}: ${errorText(err)}`, {
      cause: err,
      context: { target: c.where, stage: c.stage },
    });
  }

  get greeting(): QmpGreeting {
    // Only a connected client is ever handed out, and connect() waits for the greeting.
    return this.#greeting!;
  }

  /** Whether out-of-band execution was negotiated. */
  get oob(): boolean {
    return this.#oob;
  }

  /** A typed command: arguments checked by TypeScript, the reply parsed by zod. */
  execute<C extends QmpCommandName>(command: C, ...rest: ArgsOf<C>): Promise<ReturnOf<C>> {
    const [args, opts] = rest as [Record<string, unknown> | undefined, CallOptions | undefined];
    return this.#call('execute', command, args, opts).then((raw) => this.#parseReply(command, raw));
  }

  /** Any command, reply unparsed (`unknown`: parse it before use). */
  executeRaw(command: string, args?: Record<string, unknown>, opts?: CallOptions): Promise<unknown> {
    return this.#call('execute', command, args, opts);
  }

  /** Out-of-band: QEMU runs it even while an in-band command blocks. Needs `oob: true` at connect. */
  executeOob(command: string, args?: Record<string, unknown>, opts?: CallOptions): Promise<unknown> {
    if (!this.#oob) {
      return Promise.reject(
        new QmpUsageError(`cannot run '${command}' out-of-band: oob was not negotiated on ${this.#where}`, { context: { command } }),
      );
    }
    return this.#call('exec-oob', command, args, opts);
  }

  /** Events from now on, in order; the iterator ends when the session closes. */
  events(opts: { signal?: AbortSignal } = {}): AsyncIterableIterator<QmpEvent> {
    return this.#events.reader(opts);
  }

  /** Position in the event history. Take it BEFORE the command whose event you will wait for. */
  eventCursor(): number {
    return this.#events.cursor();
  }

  /**
   * Resolves with the first event matching `predicate`. With `since` (a cursor taken before the
   * command that causes the event), events that already arrived after that cursor count too: the
   * event may have come in the same chunk as the command's reply, before this wait began. See
   * event-log.ts. The timeout error names `what` was awaited and the last event seen.
   */
  waitForEvent<E extends QmpEvent>(
    predicate: ((e: QmpEvent) => e is E) | ((e: QmpEvent) => boolean),
    opts: { timeoutMs: number; signal?: AbortSignal; since?: number; what?: string },
  ): Promise<E> {
    return this.#events.wait<E>(predicate, opts);
  }

  /**
   * What this QEMU supports, from its schema; asked once per session, and the schema itself once
   * per build where the build is named (schema-cache.ts). The migration capabilities are always
   * asked: a cheap answer, and the one a preflight refuses on.
   */
  probeCapabilities(opts?: CallOptions): Promise<QmpCapabilities> {
    if (!this.#caps) {
      const probe = Promise.all([
        this.#schema(opts),
        this.execute('query-migrate-capabilities', undefined, opts),
      ]).then(([schema, migration]) => buildCapabilities(schema, migration));
      this.#caps = probe;
      // A failed probe is not cached: the next caller asks again.
      probe.catch(() => {
        if (this.#caps === probe) this.#caps = undefined;
      });
    }
    return this.#caps;
  }

  async #schema(opts: CallOptions | undefined): Promise<readonly SchemaInfo[]> {
    const build = this.greeting.version;
    // Sent before anything else is, as without a cache: no wait on a lookup that cannot hit.
    if (!this.#schemaCache.remembers(build)) return this.execute('query-qmp-schema', undefined, opts);
    // The cache promises never to reject; one that does anyway costs a probe, not the session.
    const remembered = await this.#schemaCache.get(build).catch(() => undefined);
    if (remembered) {
      this.#log.debug({ version: build.qemu, package: build.package }, 'QMP schema of this build remembered; not probed');
      return remembered;
    }
    const schema = await this.execute('query-qmp-schema', undefined, opts);
    await this.#schemaCache.put(build, schema).catch(() => undefined);
    return schema;
  }

  /** Ends the session. Sends nothing (`quit` is a command); idempotent. */
  async close(): Promise<void> {
    this.#shutdown(undefined);
    await this.closed;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // ---------------------------------------------------------------- calls

  #call(kind: 'execute' | 'exec-oob', command: string, args: Record<string, unknown> | undefined, opts: CallOptions = {}): Promise<unknown> {
    if (this.#state === 'closed') {
      return Promise.reject(
        new QmpDisconnectedError(`QMP session to ${this.#where} is closed; cannot run '${command}'`, {
          cause: this.#closedWith,
          context: { command },
        }),
      );
    }
    const signal = opts.signal;
    if (signal?.aborted) {
      return Promise.reject(new QmpAbortError(`'${command}' aborted before it was sent`, { cause: signal.reason, context: { command } }));
    }
    const id = `f${++this.#seq}`;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
    const line = JSON.stringify(args === undefined ? { [kind]: command, id } : { [kind]: command, arguments: args, id }) + '\n';
    return new Promise<unknown>((resolve, reject) => {
      const finish = (): void => {
        this.#pending.delete(id);
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      const giveUp = (err: QmpError): void => {
        this.#abandon(id);
        pending.reject(err);
      };
      const pending: Pending = {
        command,
        resolve: (v) => {
          finish();
          resolve(v);
        },
        reject: (err) => {
          finish();
          reject(err);
        },
      };
      const onAbort = (): void =>
        giveUp(new QmpAbortError(`'${command}' aborted while awaiting its reply (QEMU may still run it)`, { cause: signal?.reason, context: { command } }));
      const timer = setTimeout(
        () =>
          giveUp(
            new QmpTimeoutError(`no reply to '${command}' from ${this.#where} within ${timeoutMs} ms (QEMU may still run it)`, {
              context: { command, timeoutMs },
            }),
          ),
        timeoutMs,
      );
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#pending.set(id, pending);
      this.#stream.write(line);
    });
  }

  #abandon(id: string): void {
    this.#abandoned.add(id);
    if (this.#abandoned.size > ABANDONED_KEPT) {
      const oldest = this.#abandoned.values().next().value;
      if (oldest !== undefined) this.#abandoned.delete(oldest);
    }
  }

  #parseReply<C extends QmpCommandName>(command: C, raw: unknown): ReturnOf<C> {
    const parsed = replySchemas[command].safeParse(raw);
    if (!parsed.success) {
      throw new QmpProtocolError(`reply to '${command}' from ${this.#where} is not what QAPI promises: ${z.prettifyError(parsed.error)}`, {
        cause: parsed.error,
        context: { command },
      });
    }
    return parsed.data as ReturnOf<C>;
  }

  // ---------------------------------------------------------------- greeting

  #waitGreeting(signal: AbortSignal): Promise<QmpGreeting> {
    if (this.#greeting) return Promise.resolve(this.#greeting);
    if (this.#state === 'closed') return Promise.reject(this.#closedWith);
    if (signal.aborted) return Promise.reject(signal.reason);
    return new Promise<QmpGreeting>((resolve, reject) => {
      const finish = (): void => {
        this.#greetingWaiter = undefined;
        signal.removeEventListener('abort', onAbort);
      };
      const onAbort = (): void => {
        finish();
        reject(signal.reason);
      };
      this.#greetingWaiter = {
        resolve: (g) => {
          finish();
          resolve(g);
        },
        reject: (err) => {
          finish();
          reject(err);
        },
      };
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  // ---------------------------------------------------------------- reading

  readonly #onData = (chunk: Buffer | string): void => {
    if (this.#state === 'closed') return;
    try {
      this.#decoder.push(typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : chunk, this.#onLine);
    } catch (err) {
      this.#shutdown(err instanceof QmpError ? err : new QmpProtocolError(`QMP stream from ${this.#where}: ${errorText(err)}`, { cause: err }));
    }
  };

  readonly #onLine = (line: string): void => {
    if (this.#state === 'closed') return;
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch (err) {
      if (this.#state === 'greeting') {
        throw new QmpConnectError(`${this.#where} is not a QMP server: it said ${snippet(line)}`, { cause: err, context: { target: this.#where } });
      }
      throw new QmpProtocolError(`${this.#where} sent malformed JSON: ${snippet(line)}`, { cause: err });
    }
    if (!isRecord(msg)) throw new QmpProtocolError(`${this.#where} sent a message that is not a JSON object: ${snippet(line)}`);
    if (this.#state === 'greeting') return this.#handleGreeting(msg, line);
    if (typeof msg.event === 'string') return this.#handleEvent(msg.event, msg);
    if ('return' in msg || 'error' in msg) return this.#handleReply(msg, line);
    throw new QmpProtocolError(`${this.#where} sent a message that is neither a reply nor an event: ${snippet(line)}`);
  };

  #handleGreeting(msg: Record<string, unknown>, line: string): void {
    const g = greetingSchema.safeParse(msg);
    if (!g.success) {
      throw new QmpConnectError(`${this.#where} is not a QMP server: its first message was ${snippet(line)}`, {
        context: { target: this.#where },
      });
    }
    this.#greeting = g.data.QMP;
    this.#transition('negotiating');
    this.#greetingWaiter?.resolve(g.data.QMP);
  }

  #handleEvent(name: string, msg: Record<string, unknown>): void {
    const parsed = parseEvent(name, msg);
    if (!parsed.ok) {
      // Dropped, not fatal: ending the session would also take away the channel a migration
      // needs to roll back. Every wait for an event has a deadline and the engine polls state
      // beside its waits, so a lost event costs time, never correctness.
      this.#log.warn({ event: name, problem: parsed.problem }, 'malformed QMP event dropped');
      return;
    }
    this.#log.trace({ event: name }, 'QMP event');
    this.#events.push(parsed.event);
  }

  #handleReply(msg: Record<string, unknown>, line: string): void {
    const id = msg.id;
    if (id === undefined) {
      if ('error' in msg) {
        // QEMU answers without an id only when it could not read what we sent: the stream is
        // out of step and no pending call can be trusted to get its reply.
        const e = this.#errorOf(msg.error);
        throw new QmpProtocolError(`${this.#where} reported an error outside any command: ${e.errorClass}: ${e.desc}`, {
          context: { errorClass: e.errorClass },
        });
      }
      this.#log.warn({ line: snippet(line) }, 'QMP reply without id dropped');
      return;
    }
    const pending = typeof id === 'string' ? this.#pending.get(id) : undefined;
    if (!pending) {
      if (typeof id === 'string' && this.#abandoned.delete(id)) {
        this.#log.debug({ id }, 'late reply to an abandoned QMP call dropped');
      } else {
        this.#log.warn({ id, line: snippet(line) }, 'QMP reply with an unknown id dropped');
      }
      return;
    }
    if ('error' in msg) {
      const e = this.#errorOf(msg.error);
      pending.reject(new QmpCommandError(pending.command, e.errorClass, e.desc));
    } else {
      pending.resolve(msg.return);
    }
  }

  #errorOf(error: unknown): { errorClass: string; desc: string } {
    if (isRecord(error) && typeof error.class === 'string' && typeof error.desc === 'string') {
      return { errorClass: error.class, desc: error.desc };
    }
    throw new QmpProtocolError(`${this.#where} sent a malformed error: ${snippet(JSON.stringify(error) ?? String(error))}`);
  }

  readonly #onEnd = (): void => {
    this.#shutdown(new QmpDisconnectedError(`QMP connection to ${this.#where} was closed by the other side`));
  };

  readonly #onError = (err: Error): void => {
    this.#shutdown(new QmpDisconnectedError(`QMP connection to ${this.#where} failed: ${errorText(err)}`, { cause: err }));
  };

  // ---------------------------------------------------------------- state

  #transition(to: State): void {
    const allowed: Record<State, readonly State[]> = {
      greeting: ['negotiating', 'closed'],
      negotiating: ['ready', 'closed'],
      ready: ['closed'],
      closed: [],
    };
    if (!allowed[this.#state].includes(to)) throw new Error(`QmpClient: illegal transition ${this.#state} -> ${to}`);
    this.#log.debug({ from: this.#state, to }, 'QMP session state');
    this.#state = to;
  }

  /** The one disconnect path. `reason` undefined means the caller closed the session. */
  #shutdown(reason: QmpError | undefined): void {
    if (this.#state === 'closed') return;
    this.#transition('closed');
    this.#closedWith = reason;
    if (reason) this.#log.warn({ err: reason.message, code: reason.code }, 'QMP session ended');
    this.#stream.off('data', this.#onData);
    this.#stream.off('end', this.#onEnd);
    this.#stream.off('close', this.#onEnd);
    this.#stream.destroy();
    const why = reason ? reason.message : 'closed by the caller';
    for (const [id, p] of this.#pending) {
      this.#pending.delete(id);
      p.reject(
        new QmpDisconnectedError(`QMP session to ${this.#where} ended while '${p.command}' awaited its reply: ${why}`, {
          cause: reason,
          context: { command: p.command },
        }),
      );
    }
    this.#abandoned.clear();
    this.#greetingWaiter?.reject(reason ?? new QmpDisconnectedError(`QMP session to ${this.#where} closed before its greeting`));
    this.#events.end(reason);
    this.#resolveClosed(reason);
  }
}
