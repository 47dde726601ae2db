/**
 * Two network namespaces joined by a veth pair, for tests whose traffic must cross a real link.
 * Names carry this process's PID so parallel runs never collide; `remove` kills what still runs
 * inside (only our own processes can be there) and deletes the namespaces, which takes the veth
 * pair with them. Call it in a finally / afterAll, so it runs on failure too.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';

const run = promisify(execFile);

export interface NetnsPair {
  names: [string, string];
  addresses: [string, string];
  /** The veth ends, in names' order (a capture runs on one of them). */
  veths: [string, string];
  /**
   * With `third`: a third host joined to the second by its own veth pair, routed to the pair's
   * link: a bystander (a rogue client) that reaches the second host's addresses.
   */
  third?: { name: string; address: string };
  remove(): Promise<void>;
}

export async function netnsAvailable(): Promise<boolean> {
  if (process.getuid?.() !== 0) return false;
  try {
    await run('ip', ['netns', 'list']);
    return true;
  } catch {
    return false;
  }
}

export async function createNetnsPair(opts: { rateMbit?: number; third?: boolean } = {}): Promise<NetnsPair> {
  const tag = `${process.pid % 100000}`;
  const names: [string, string] = [`ferry-a-${tag}`, `ferry-b-${tag}`];
  const veth: [string, string] = [`fva${tag}`, `fvb${tag}`];
  const net = 10 + (process.pid % 200);
  const addresses: [string, string] = [`10.231.${net}.1`, `10.231.${net}.2`];
  const third = opts.third ? { name: `ferry-c-${tag}`, address: `10.232.${net}.2`, peer: `10.232.${net}.1`, veth: [`fvc${tag}`, `fvd${tag}`] as const } : undefined;
  const all = third ? [...names, third.name] : [...names];
  const pair: NetnsPair = {
    names,
    addresses,
    veths: veth,
    ...(third ? { third: { name: third.name, address: third.address } } : {}),
    remove: async () => {
      for (const ns of all) {
        const pids = await run('ip', ['netns', 'pids', ns]).then((r) => r.stdout.split(/\s+/).filter(Boolean).map(Number), () => [] as number[]);
        for (const pid of pids) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone already
          }
        }
        await run('ip', ['netns', 'del', ns]).catch(() => undefined);
      }
    },
  };
  try {
    for (const ns of names) {
      await run('ip', ['netns', 'add', ns]);
      await run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    }
    await run('ip', ['link', 'add', veth[0], 'netns', names[0], 'type', 'veth', 'peer', 'name', veth[1], 'netns', names[1]]);
    for (const i of [0, 1] as const) {
      await run('ip', ['-n', names[i], 'addr', 'add', `${addresses[i]}/30`, 'dev', veth[i]]);
      await run('ip', ['-n', names[i], 'link', 'set', veth[i], 'up']);
      // A link that is not loopback-fast, shaped both ways (tbf: this kernel has no netem).
      if (opts.rateMbit) await run('ip', ['netns', 'exec', names[i], 'tc', 'qdisc', 'add', 'dev', veth[i], 'root', 'tbf', 'rate', `${opts.rateMbit}mbit`, 'burst', '256kb', 'latency', '50ms']);
    }
    if (third) {
      await run('ip', ['netns', 'add', third.name]);
      await run('ip', ['-n', third.name, 'link', 'set', 'lo', 'up']);
      await run('ip', ['link', 'add', third.veth[1], 'netns', names[1], 'type', 'veth', 'peer', 'name', third.veth[0], 'netns', third.name]);
      await run('ip', ['-n', names[1], 'addr', 'add', `${third.peer}/30`, 'dev', third.veth[1]]);
      await run('ip', ['-n', names[1], 'link', 'set', third.veth[1], 'up']);
      await run('ip', ['-n', third.name, 'addr', 'add', `${third.address}/30`, 'dev', third.veth[0]]);
      await run('ip', ['-n', third.name, 'link', 'set', third.veth[0], 'up']);
      await run('ip', ['-n', third.name, 'route', 'add', `${addresses[0].replace(/\.1$/, '.0')}/30`, 'via', third.peer]);
    }
  } catch (err) {
    await pair.remove();
    throw err;
  }
  return pair;
}
