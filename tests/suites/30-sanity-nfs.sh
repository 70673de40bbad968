#!/usr/bin/env bash
# csi-sanity against the NFS backend: controller on the host, node in the QEMU node VM, real
# kernel NFSv3 mounts in the guest against nfs-ganesha on the host. Twice: the single-backend
# controller, then one controller serving local and NFS from one `backends:` configuration
# (csi-sanity on its NFS socket). Prints the sum of both runs' `N passed, N failed`.
set -uo pipefail
run=${STOWAGE_ROOT:?}/tests/sanity/run-nfs.sh
passed=0 failed=0 rc=0
for multi in 0 1; do
  out=$(SANITY_MULTI=$multi "$run" 2>&1) || rc=1
  printf '%s\n' "$out"
  line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n1)
  if [ -z "$line" ]; then failed=$((failed + 1)); rc=1; continue; fi
  passed=$((passed + $(echo "$line" | awk '{print $1}')))
  failed=$((failed + $(echo "$line" | awk '{print $3}')))
done
echo "$passed passed, $failed failed"
exit "$rc"
