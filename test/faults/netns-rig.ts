import type { Cell } from './cells.js';
import type { CellResult } from './local-rig.js';

export class NetnsRig {
  static async create(): Promise<NetnsRig> {
    return new NetnsRig();
  }
  async runCell(_cell: Cell, _seed: number): Promise<CellResult> {
    throw new Error('netns rig: not yet');
  }
  async close(): Promise<void> {}
}
