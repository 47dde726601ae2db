// Types of scripts/qemu10.mjs (plain Node, so it runs before node_modules exists) for the tests.
export declare const QEMU10_PACKAGES: string[];
export declare function qemu10Paths(root: string): { dir: string; wrapper: string; stamp: string };
export declare function ensureQemu10(root: string, log: (msg: string) => void): string | undefined;
export declare function systemMirror(codename: string, etc?: string): { uri: string; signedBy: string | undefined; from: string };
