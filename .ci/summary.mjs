// Prints `N passed, N failed, N skipped` from vitest's JSON reporter output and exits non-zero
// when anything failed or the run produced no results (a crash before the reporter wrote).
import { existsSync, readFileSync } from 'node:fs';

const [file, rcText] = process.argv.slice(2);
const rc = Number(rcText ?? '1');
if (!file || !existsSync(file)) {
  console.log(`vitest wrote no results (exit ${rc})`);
  console.log('0 passed, 1 failed');
  process.exit(1);
}
const r = JSON.parse(readFileSync(file, 'utf8'));
const passed = r.numPassedTests ?? 0;
const skipped = (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0);
// A file that fails to load has no tests but counts as a failure of its own.
const brokenFiles = (r.testResults ?? []).filter(
  (f) => f.status === 'failed' && (f.assertionResults ?? []).length === 0,
).length;
let failed = (r.numFailedTests ?? 0) + brokenFiles;
// Checks outside any test fail the run by its exit code alone: the global teardown's temp-dir
// check (test/global-setup.ts) runs after the JSON was written. Such a run counts one failure.
if (rc !== 0 && failed === 0) {
  console.log(`vitest exited ${rc} with no failed test: a check outside the tests failed (see above, e.g. files left in the temp dir)`);
  failed = 1;
}
console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
process.exit(failed > 0 || rc !== 0 ? 1 : 0);
