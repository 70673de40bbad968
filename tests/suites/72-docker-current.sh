#!/usr/bin/env bash
# The Docker suite (70-docker.sh) again on a current engine: Docker 28.5.2 built from the Go
# module proxy (tests/infra/moby.sh, cached: ~2 min warm, longer cold), so neither Debian's 20.10
# nor a current engine regresses; plus Swarm cluster volumes through Stowage's CSI plugin
# package (tests/it/docker_cluster.rs and tests/it/docker_cluster/: local, S3 and GlusterFS
# volumes, a MariaDB stack, availability pause/drain/active, topology, groups), which only
# Docker >= 23 has. Prints N passed, N failed.
STOWAGE_DOCKER_ENGINE=current exec bash "$(dirname "$0")/70-docker.sh"
