#!/usr/bin/env node
// migrate-vm: see src/cli/migrate-vm-entry.ts. Runs dist/ when built from the current sources, else the sources (bin/launch.mjs).
import { launch } from './launch.mjs';

await launch('cli/migrate-vm-entry');
