import { readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { FerryError } from '../errors.js';

/** Where the guest's kernel and initrd live: an agent serving test guests lists it in bootRoots. */
export const IMAGE_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'images', 'out');
const manifestPath = join(IMAGE_DIR, 'manifest.json');

export interface GuestImage {
  kernel: string;
  initrd: string;
  kernelVersion: string;
}

/** The tiny guest built by images/build.mjs. */
export async function loadGuestImage(): Promise<GuestImage> {
  let raw: string;
  try {
    raw = await readFile(manifestPath, 'utf8');
  } catch {
    throw new FerryError('GUEST_IMAGE_MISSING', `the guest image is not built (${manifestPath} missing): run \`npm run image\``, { userError: true });
  }
  const m = JSON.parse(raw) as Partial<GuestImage>;
  if (typeof m.kernel !== 'string' || typeof m.initrd !== 'string' || typeof m.kernelVersion !== 'string') {
    throw new FerryError('GUEST_IMAGE_INVALID', `${manifestPath} is not a guest image manifest: run \`npm run image\``, { userError: true });
  }
  return { kernel: m.kernel, initrd: m.initrd, kernelVersion: m.kernelVersion };
}
