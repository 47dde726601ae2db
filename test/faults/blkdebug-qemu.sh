#!/bin/bash
# The fault harness's destination QEMU for `disk-io-error` cells (FERRY_QEMU points here): the real
# QEMU (FERRY_FAULT_REAL_QEMU, default the system's), its disks under blkdebug (blkdebug-argv.mjs).
# exec, so the pid the launcher records and signals is QEMU's own.
set -euo pipefail
mapfile -d '' args < <(node "$(dirname "$0")/blkdebug-argv.mjs" "$@")
exec "${FERRY_FAULT_REAL_QEMU:-qemu-system-x86_64}" "${args[@]}"
