#!/usr/bin/env bash
# csi-sanity against the NFS backend: controller on the host, node in the QEMU node VM, real
# kernel NFSv3 mounts in the guest against nfs-ganesha on the host.
exec "${STOWAGE_ROOT:?}/tests/sanity/run-nfs.sh"
