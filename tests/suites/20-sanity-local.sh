#!/usr/bin/env bash
# csi-sanity against the local backend (controller + node on this machine).
exec "${STOWAGE_ROOT:?}/tests/sanity/run-local.sh"
