// Prints `N passed, N failed, N skipped` from vitest's JSON reporter output and exits non-zero
// when anything failed or a run produced no results (a crash before the reporter wrote).
// Arguments: one `results.json exit-code` pair per vitest run (the 7.2 run, then the QEMU 10.0
// leg); with several, one line per run comes first and the closing line sums them all.
import { existsSync, readFileSync } from 'node:fs';

const args = process.argv.slice(2);
const runs = [];
for (let i = 0; i < args.length; i += 2) runs.push({ file: args[i], rc: Number(args[i + 1] ?? '1') });
if (runs.length === 0) runs.push({ file: undefined, rc: 1 });

const total = { passed: 0, failed: 0, skipped: 0 };
let bad = false;
for (const { file, rc } of runs) {
  const counts = countsOf(file, rc);
  if (runs.length > 1) console.log(`${file}: ${counts.passed} ok, ${counts.failed} failing, ${counts.skipped} skipped (exit ${rc})`);
  for (const k of Object.keys(total)) total[k] += counts[k];
  if (counts.failed > 0 || rc !== 0) bad = true;
}
console.log(`${total.passed} passed, ${total.failed} failed, ${total.skipped} skipped`);
process.exit(bad ? 1 : 0);

function countsOf(file, rc) {
  if (!file || !existsSync(file)) {
    console.log(`vitest wrote no results${file ? ` to ${file}` : ''} (exit ${rc})`);
    return { passed: 0, failed: 1, skipped: 0 };
  }
  const r = JSON.parse(readFileSync(file, 'utf8'));
  // A file that fails to load has no tests but counts as a failure of its own.
  const brokenFiles = (r.testResults ?? []).filter((f) => f.status === 'failed' && (f.assertionResults ?? []).length === 0).length;
  let failed = (r.numFailedTests ?? 0) + brokenFiles;
  // Checks outside any test fail the run by its exit code alone: the global teardown's temp-dir
  // check (test/global-setup.ts) runs after the JSON was written. Such a run counts one failure.
  if (rc !== 0 && failed === 0) {
    console.log(`vitest exited ${rc} with no failed test: a check outside the tests failed (see above, e.g. files left in the temp dir)`);
    failed = 1;
  }
  return { passed: r.numPassedTests ?? 0, failed, skipped: (r.numPendingTests ?? 0) + (r.numTodoTests ?? 0) };
}
