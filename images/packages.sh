#!/bin/sh
# Prints the image's package lists from images/packages.txt, one name a line:
#   packages.sh install   packages to install
#   packages.sh purge     names or patterns to purge afterwards (dpkg --force-depends)
# The one parser of packages.txt: images/build.sh and images/Dockerfile both call it, so the
# script-built and the Dockerfile-built images install the same packages.
set -eu
list="${PACKAGES_TXT:-$(dirname "$0")/packages.txt}"
strip() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$list" | grep -v '^$'; }
case "${1:-}" in
  install) strip | grep -v '^-' ;;
  purge) strip | grep '^-' | cut -c2- ;;
  *) echo "usage: $0 install|purge" >&2; exit 2 ;;
esac
