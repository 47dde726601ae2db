/**
 * What this host's QEMU is and can do, asked of the binary itself once: a QEMU with no machine,
 * QMP on its stdio, answers the version and its migration capabilities, then quits.
 */
import { spawn } from 'node:child_process';
import { Duplex } from 'node:stream';
import { errorText } from '../errors.js';
import { QmpClient } from '../qmp/index.js';

export interface QemuInfo {
  version: string;
  migrationCapabilities: string[];
  /** Why the probe failed, if it did; the agent still serves. */
  error?: string;
}

export async function probeQemu(binary: string, timeoutMs = 10_000): Promise<QemuInfo> {
  const child = spawn(binary, ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', 'stdio'], { stdio: ['pipe', 'pipe', 'ignore'] });
  const spawned = new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', reject);
  });
  try {
    await spawned;
    const qmp = await QmpClient.connect({ stream: Duplex.from({ readable: child.stdout, writable: child.stdin }) }, { timeoutMs, name: 'qemu-probe' });
    const caps = await qmp.execute('query-migrate-capabilities', undefined, { timeoutMs });
    const v = qmp.greeting.version.qemu;
    const pkg = qmp.greeting.version.package.trim();
    await qmp.execute('quit', undefined, { timeoutMs }).catch(() => undefined);
    await qmp.close();
    return { version: `${v.major}.${v.minor}.${v.micro}${pkg ? ` (${pkg})` : ''}`, migrationCapabilities: caps.map((c) => c.capability).sort() };
  } catch (err) {
    return { version: 'unknown', migrationCapabilities: [], error: errorText(err) };
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}
