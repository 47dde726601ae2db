#!/usr/bin/env node
// ferry-scheduler: see src/scheduler/main.ts. Runs dist/ when built from the current sources, else the sources (bin/launch.mjs).
import { launch } from './launch.mjs';

await launch('scheduler/main');
