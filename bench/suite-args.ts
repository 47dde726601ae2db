/**
 * What the suites of `npm run bench:migrate -- --suite ...` share (bench/convergence.ts,
 * bench/lazy.ts): their flags, the QEMUs they run on, and how a cell's runs are summed up.
 */
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '..');

/** The QEMUs a suite may run on: the system's 7.2, and the bootstrap's 10.0 (.cache/qemu-10.0). */
export const QEMUS: Record<string, string> = {
  '7.2': 'qemu-system-x86_64',
  '10.0': join(ROOT, '.cache', 'qemu-10.0', 'bin', 'qemu-system-x86_64'),
};

/** The value after `--name`, if given. */
export function flag(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

/** `--name a,b`: each one of `all`, or all of them when the flag is absent. */
export function list<T extends string>(name: string, all: readonly T[]): T[] {
  const v = flag(name);
  if (v === undefined) return [...all];
  const chosen = v.split(',').map((s) => s.trim()).filter(Boolean);
  for (const c of chosen) if (!all.includes(c as T)) throw new Error(`--${name}: unknown '${c}'; known: ${all.join(', ')}`);
  return chosen as T[];
}

/** The middle value (the upper one of an even count), undefined for none. */
export function median(xs: number[]): number | undefined {
  if (xs.length === 0) return undefined;
  const v = [...xs].sort((a, b) => a - b);
  return v[Math.floor(v.length / 2)];
}

/** `median [min..max]`, rounded; one value alone; '-' for none. */
export function stat(xs: (number | undefined)[]): string {
  const v = xs.filter((x): x is number => typeof x === 'number').sort((a, b) => a - b);
  if (v.length === 0) return '-';
  const med = v[Math.floor(v.length / 2)]!;
  return v.length === 1 ? String(Math.round(med)) : `${Math.round(med)} [${Math.round(v[0]!)}..${Math.round(v[v.length - 1]!)}]`;
}
