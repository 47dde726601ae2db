/**
 * The root of every error ferry throws on purpose. Each module derives its own root from this one
 * (QmpError, SpecError, MigrationError, ...), with a stable `code` to branch on (never the message)
 * and the context that helps an operator: the command, job id, phase, field.
 *
 * `userError` marks mistakes in what the caller gave us (bad spec, missing socket, no room): the CLI
 * prints their message without a stack trace and exits with the usage/input exit code.
 */
export class FerryError extends Error {
  override name = 'FerryError';
  readonly code: string;
  readonly context: Readonly<Record<string, unknown>>;
  readonly userError: boolean;

  constructor(
    code: string,
    message: string,
    options: { cause?: unknown; context?: Record<string, unknown>; userError?: boolean } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.context = options.context ?? {};
    this.userError = options.userError ?? false;
  }
}

/** Text of any thrown value, for logs and for wrapping foreign errors. */
export function errorText(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}
