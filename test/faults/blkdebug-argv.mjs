// Rewrites a QEMU argv for the fault harness's `disk-io-error` cells (blkdebug-qemu.sh runs it and
// execs the real QEMU with what it prints, NUL-separated): each disk's file node goes under QEMU's
// own blkdebug driver, which fails every write with EIO once FERRY_FAULT_EIO_AFTER writes have
// passed (a chain of blkdebug states, one per write). Anything else passes through unchanged.
const after = Math.max(0, Number(process.env.FERRY_FAULT_EIO_AFTER ?? '0') | 0);

/** `driver=file,node-name=X,...` (QEMU's dotted key=value form) → the same under a blkdebug node X. */
function wrap(arg) {
  // Values never hold a comma here (escaped ones would be doubled: ",,"); keep those together.
  const parts = arg.split(/,(?!,)/);
  const name = parts.find((p) => p.startsWith('node-name='))?.slice('node-name='.length);
  const inner = parts.map((p) => (p.startsWith('node-name=') ? `image.node-name=${name}-eio` : `image.${p}`));
  const rules = [`inject-error.0.event=pwritev`, `inject-error.0.errno=5`];
  if (after > 0) rules.push(`inject-error.0.state=${after + 1}`);
  for (let i = 1; i <= after; i++) rules.push(`set-state.${i - 1}.event=pwritev`, `set-state.${i - 1}.state=${i}`, `set-state.${i - 1}.new_state=${i + 1}`);
  return ['driver=blkdebug', `node-name=${name}`, ...rules, ...inner].join(',');
}

const argv = process.argv.slice(2);
const out = [];
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === '-blockdev' && i + 1 < argv.length && argv[i + 1].startsWith('driver=file,')) {
    out.push(a, wrap(argv[i + 1]));
    i++;
  } else {
    out.push(a);
  }
}
process.stdout.write(out.map((a) => `${a}\0`).join(''));
