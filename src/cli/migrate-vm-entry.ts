/**
 * The migrate-vm bin's entry point. `--help` is answered here, before ./migrate-vm.ts is loaded:
 * that module pulls in the engine, zod, pino and ws, about 0.2 s of module loading on a 2-core
 * machine, which someone asking for the usage should not wait for. Everything else, a bad flag
 * included, goes to migrate-vm.ts's main, which parses the arguments again and owns every answer.
 */
import { parseCli, USAGE } from './args.js';

export async function main(argv: string[]): Promise<number> {
  let help = false;
  try {
    help = parseCli(argv).kind === 'help';
  } catch {
    // A bad flag: migrate-vm.ts's main says which.
  }
  if (help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const { main: migrateVm } = await import('./migrate-vm.js');
  return migrateVm(argv);
}
