#!/usr/bin/env node
// Not a command of its own: the watchdog migrate-vm leaves beside itself (src/cli/watchdog.ts).
import { launch } from './launch.mjs';

await launch('cli/watchdog');
