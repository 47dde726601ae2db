#!/usr/bin/env node
// ferry: see src/scheduler/cli.ts. Runs dist/ when built from the current sources, else the sources (bin/launch.mjs).
import { launch } from './launch.mjs';

await launch('scheduler/cli');
