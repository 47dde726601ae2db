// Rewrites a QEMU argv for the fault harness's `disk-io-error` cells (blkdebug-qemu.sh runs it and
// execs the real QEMU with what it prints, NUL-separated): each disk's file node goes under QEMU's
// own blkdebug driver, which fails every write with EIO once FERRY_FAULT_EIO_AFTER writes have
// passed (a chain of blkdebug states, one per write). Anything else passes through unchanged.
const after = Math.max(0, Number(process.env.FERRY_FAULT_EIO_AFTER ?? '0') | 0);

function wrap(node) {
  const inner = { ...node, 'node-name': `${node['node-name']}-eio` };
  const setState = [];
  for (let i = 1; i <= after; i++) setState.push({ event: 'pwritev', state: i, new_state: i + 1 });
  return {
    driver: 'blkdebug',
    'node-name': node['node-name'],
    'inject-error': [{ event: 'pwritev', errno: 5, ...(after > 0 ? { state: after + 1 } : {}) }],
    ...(setState.length ? { 'set-state': setState } : {}),
    image: inner,
  };
}

const argv = process.argv.slice(2);
const out = [];
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === '-blockdev' && i + 1 < argv.length && argv[i + 1].startsWith('{')) {
    const node = JSON.parse(argv[i + 1]);
    out.push(a, JSON.stringify(node.driver === 'file' ? wrap(node) : node));
    i++;
  } else {
    out.push(a);
  }
}
process.stdout.write(out.map((a) => `${a}\0`).join(''));
