/**
 * Bytes a socket counter says were sent, across reconnects: a new socket's counter starts at zero,
 * so what the old one carried is kept as a base. `bytes()` is what moved since `start()`.
 */
export class WireCounter {
  readonly #read: () => Promise<number | undefined>;
  readonly #onReset: (before: number, now: number) => void;
  #atStart = 0;
  #base = 0;
  #last = 0;
  #seen: number | undefined;

  constructor(read: () => Promise<number | undefined>, onReset: (before: number, now: number) => void = () => undefined) {
    this.#read = read;
    this.#onReset = onReset;
  }

  async start(): Promise<void> {
    this.#atStart = (await this.#read()) ?? 0;
  }

  async sample(): Promise<void> {
    this.add(await this.#read());
  }

  /** One reading of the counter (undefined: this host cannot tell). */
  add(sample: number | undefined): void {
    if (sample === undefined) return;
    if (sample < this.#last) {
      this.#base += this.#last;
      this.#onReset(this.#last, sample);
    }
    this.#last = sample;
    this.#seen = Math.max(this.#seen ?? 0, this.#base + sample);
  }

  bytes(): number | undefined {
    return this.#seen === undefined ? undefined : this.#seen - this.#atStart;
  }
}
