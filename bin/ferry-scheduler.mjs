#!/usr/bin/env node
// Runs ferry's TypeScript sources directly through tsx, so a git checkout works without a build.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/scheduler/main.ts');
process.exit(await main(process.argv.slice(2)));
