import { errorText } from '../errors.js';

interface UndoStep {
  name: string;
  side: 'source' | 'destination';
  run: () => Promise<void>;
}

/**
 * Undo actions registered beside the side effects they undo, run newest first. A failing step is
 * recorded and the rest still run: cleanup never hides the first error, and never stops halfway.
 */
export class UndoStack {
  #steps: UndoStep[] = [];

  push(name: string, side: UndoStep['side'], run: () => Promise<void>): void {
    this.#steps.push({ name, side, run });
  }

  /** Drops a step whose side effect was undone on the normal path (an NBD node deleted after use). */
  drop(name: string): void {
    this.#steps = this.#steps.filter((s) => s.name !== name);
  }

  /** Past the point of no return nothing may touch the source's guest state: forget those steps. */
  dropSide(side: UndoStep['side']): void {
    this.#steps = this.#steps.filter((s) => s.side !== side);
  }

  /** Runs one step now, out of order, and forgets it. */
  async runNow(name: string, report: (step: string, err: unknown) => void): Promise<unknown[]> {
    const step = this.#steps.find((s) => s.name === name);
    if (!step) return [];
    this.drop(name);
    try {
      await step.run();
      report(step.name, undefined);
      return [];
    } catch (err) {
      report(step.name, err);
      return [new Error(`${step.name}: ${errorText(err)}`, { cause: err })];
    }
  }

  get size(): number {
    return this.#steps.length;
  }

  /**
   * `moot`: a failure that means there was nothing left to undo (the side's QEMU is gone, and
   * with it what the step would remove) is reported as skipped, not as a cleanup error.
   */
  async runAll(report: (step: string, err: unknown, skipped?: string) => void, opts: { moot?: (side: UndoStep['side'], err: unknown) => string | undefined } = {}): Promise<unknown[]> {
    const errors: unknown[] = [];
    while (this.#steps.length > 0) {
      const step = this.#steps.pop()!;
      try {
        await step.run();
        report(step.name, undefined);
      } catch (err) {
        const skipped = opts.moot?.(step.side, err);
        if (skipped !== undefined) {
          report(step.name, undefined, skipped);
          continue;
        }
        errors.push(new Error(`${step.name}: ${errorText(err)}`, { cause: err }));
        report(step.name, err);
      }
    }
    return errors;
  }
}
