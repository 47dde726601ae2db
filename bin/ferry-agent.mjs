#!/usr/bin/env node
// ferry-agent: see src/agent/main.ts. Runs dist/ when built from the current sources, else the sources (bin/launch.mjs).
import { launch } from './launch.mjs';

await launch('agent/main');
