#!/usr/bin/env node
// Runs ferry's TypeScript sources directly through tsx, so a git checkout works without a build.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli/migrate-vm.ts');
const code = await main(process.argv.slice(2));
// The QMP and serial sockets would keep the event loop alive; the destination QEMU, if the
// migration succeeded, lives on by itself.
process.exit(code);
