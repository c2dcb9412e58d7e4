#!/usr/bin/env bash
# The Debian 13 (trixie) root filesystem with systemd 257 that the tests boot beside the
# host's systemd 252 (tests/support/systemd.rs, `Version::V257`), with the servers the
# server tests run (tests/servers.rs) installed in it.
#
#   sd257-rootfs.sh path     prints where the rootfs for the current recipe lives (built or not)
#   sd257-rootfs.sh build    builds it there unless it is already built (needs root, network
#                            to the host's Debian mirror, ~20 s and ~400 MB; cached)
#
# The recipe is ../shared/systemd-257/build-rootfs.sh next to the clone (or next to the main
# clone of a git worktree; override the folder with CLUSTERCTL_SHARED=DIR). The cache directory is named by a hash of that script and of
# the package list below, so changing either builds a fresh rootfs beside the old one.
# Cache root: $CLUSTERCTL_TEST_CACHE (default /var/cache/clusterctl-tests).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${CLUSTERCTL_SHARED:-$repo/../shared}
# A git worktree elsewhere: the folder next to the main clone.
if [ -z "${CLUSTERCTL_SHARED:-}" ] && [ ! -d "$shared" ]; then
    common=$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
    [ -n "$common" ] && shared=$(dirname "$common")/../shared
fi
recipe=$shared/systemd-257/build-rootfs.sh
cache=${CLUSTERCTL_TEST_CACHE:-/var/cache/clusterctl-tests}
# systemd + dbus boot it; procps gives the tests pgrep; the rest are the servers under test.
PKGS=systemd,dbus,python3,procps,gunicorn,python3-uvicorn,nodejs,puma,unicorn

[ -f "$recipe" ] || { echo "sd257-rootfs.sh: $recipe not found (set CLUSTERCTL_SHARED to the folder holding systemd-257/)" >&2; exit 1; }
hash=$( { cat "$recipe"; echo "$PKGS"; } | sha256sum | cut -c1-16)
rootfs=$cache/sd257-$hash

case ${1:-} in
path) echo "$rootfs" ;;
build)
    mkdir -p "$cache"
    SD257_PKGS=$PKGS SD257_CACHE=$cache/debcache bash "$recipe" "$rootfs" >&2
    [ -x "$rootfs/usr/lib/systemd/systemd" ] || { echo "sd257-rootfs.sh: no systemd in $rootfs after the build" >&2; exit 1; }
    echo "$rootfs" ;;
*) echo "usage: sd257-rootfs.sh path|build" >&2; exit 2 ;;
esac
