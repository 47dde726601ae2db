/**
 * The errors of the QMP client. Every one is a QmpError (itself a FerryError), with a fixed `name`
 * and a stable `code` to branch on; never branch on the message.
 *
 *   FerryError
 *    └─ QmpError                      QMP_*           root of this module
 *        ├─ QmpConnectError           QMP_CONNECT     could not open a session: path missing, refused,
 *        │                                            not QMP, no greeting in time, negotiation refused
 *        ├─ QmpCommandError           QMP_COMMAND     QEMU answered a command with {"error": ...}
 *        ├─ QmpTimeoutError           QMP_TIMEOUT     a call or an event wait ran out of time
 *        ├─ QmpAbortError             QMP_ABORTED     the caller's AbortSignal fired
 *        ├─ QmpDisconnectedError      QMP_DISCONNECTED the session ended while a call was pending
 *        ├─ QmpProtocolError          QMP_PROTOCOL    QEMU said something QMP does not allow, or a reply
 *        │                                            lacks a field its command must return
 *        └─ QmpUsageError             QMP_USAGE       the caller asked for something this session
 *                                                     cannot do (out-of-band without oob negotiated)
 *
 * A command that timed out or was aborted may still run inside QEMU: the error says the reply was
 * not awaited, not that the command did not happen.
 */
import { FerryError } from '../errors.js';

type Opts = { cause?: unknown; context?: Record<string, unknown>; userError?: boolean };

export class QmpError extends FerryError {
  override name = 'QmpError';
  constructor(code: string, message: string, options: Opts = {}) {
    super(code, message, options);
  }
}

export class QmpConnectError extends QmpError {
  override name = 'QmpConnectError';
  constructor(message: string, options: Opts = {}) {
    super('QMP_CONNECT', message, options);
  }
}

export class QmpCommandError extends QmpError {
  override name = 'QmpCommandError';
  /** QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`. */
  readonly errorClass: string;
  /** QEMU's own description, verbatim. */
  readonly desc: string;
  readonly command: string;
  constructor(command: string, errorClass: string, desc: string, options: Opts = {}) {
    super('QMP_COMMAND', `QMP command '${command}' failed: ${errorClass}: ${desc}`, {
      ...options,
      context: { command, errorClass, ...options.context },
    });
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

export class QmpTimeoutError extends QmpError {
  override name = 'QmpTimeoutError';
  constructor(message: string, options: Opts = {}) {
    super('QMP_TIMEOUT', message, options);
  }
}

export class QmpAbortError extends QmpError {
  override name = 'QmpAbortError';
  constructor(message: string, options: Opts = {}) {
    super('QMP_ABORTED', message, options);
  }
}

export class QmpDisconnectedError extends QmpError {
  override name = 'QmpDisconnectedError';
  constructor(message: string, options: Opts = {}) {
    super('QMP_DISCONNECTED', message, options);
  }
}

export class QmpProtocolError extends QmpError {
  override name = 'QmpProtocolError';
  constructor(message: string, options: Opts = {}) {
    super('QMP_PROTOCOL', message, options);
  }
}

export class QmpUsageError extends QmpError {
  override name = 'QmpUsageError';
  constructor(message: string, options: Opts = {}) {
    super('QMP_USAGE', message, options);
  }
}
