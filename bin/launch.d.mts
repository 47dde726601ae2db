// Types of bin/launch.mjs (plain JavaScript so that it runs before anything is compiled).
export declare const repoRoot: string;
export declare function stampPath(root?: string): string;
export declare function newestInputMtime(root?: string): number;
export declare function distIsFresh(root?: string): boolean;
export declare function launch(entry: string): Promise<never>;
