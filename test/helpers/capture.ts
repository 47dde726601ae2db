/**
 * A packet capture on one of a test's own veth ends (tcpdump inside the test's namespace), and
 * a search of what it caught for a byte pattern: the guest's record magic in plain NBD traffic.
 * `stop` ends tcpdump by its PID; the capture file lives in the caller's temp folder.
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';

export interface Capture {
  /** Stops tcpdump and returns the bytes of every captured packet (the pcap file whole). */
  stop(): Promise<Buffer>;
}

export async function startCapture(ns: string, dev: string, file: string, filter: string): Promise<Capture> {
  const child = spawn('ip', ['netns', 'exec', ns, 'tcpdump', '-i', dev, '-U', '-s', '0', '-w', file, filter], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`tcpdump in ${ns} did not start: ${err}`)), 10_000);
    child.stderr.on('data', (d: Buffer) => {
      err += d.toString();
      if (/listening on/.test(err)) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`tcpdump in ${ns} exited (${code}): ${err}`));
    });
  });
  return {
    stop: async () => {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGINT');
      await exited;
      return readFile(file);
    },
  };
}

/** How often `pattern` occurs in `bytes`. */
export function occurrences(bytes: Buffer, pattern: Buffer): number {
  let n = 0;
  for (let i = bytes.indexOf(pattern); i >= 0; i = bytes.indexOf(pattern, i + 1)) n++;
  return n;
}
