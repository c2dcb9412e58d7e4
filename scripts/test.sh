#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what the tests need on a clean Debian machine (as root: apt packages, the servers
# of tests/servers.rs, and a cached Debian 13 rootfs with systemd 257), then runs
# formatting and lint checks, unit tests, and the integration tests (real processes,
# real sockets, and real systemd 252 and 257 booted in private namespaces; those print
# SKIPPED when they cannot run, and with CI=true any missing prerequisite is an error).
set -euo pipefail
cd "$(dirname "$0")/.."

in_ci() { case ${CI:-} in ""|0|false|FALSE|False) return 1 ;; *) return 0 ;; esac; }
fail_or_warn() {
    if in_ci; then echo "ERROR (CI): $*" >&2; exit 1; fi
    echo "WARNING: $*; the tests that need it print SKIPPED" >&2
}

need=()
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v unshare >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
[ -x /usr/bin/python3 ] || need+=(python3)
command -v curl >/dev/null || need+=(curl)
# The servers of tests/servers.rs (the 257 rootfs gets its own, see scripts/sd257-rootfs.sh),
# Go to build tests/servers/main.go, mmdebstrap to build the 257 rootfs.
[ -x /usr/bin/gunicorn ] || need+=(gunicorn)
[ -e /usr/lib/python3/dist-packages/uvicorn/__main__.py ] || need+=(python3-uvicorn)
[ -x /usr/bin/puma ] || need+=(puma)
[ -x /usr/bin/unicorn ] || need+=(unicorn)
[ -x /usr/bin/node ] || need+=(nodejs)
[ -x /usr/bin/go ] || need+=(golang-go)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing: ${need[*]}"
        apt-get update -qq || fail_or_warn "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
            fail_or_warn "apt-get install ${need[*]} failed"
    else
        fail_or_warn "missing (install as root): ${need[*]}"
    fi
fi

# systemd 257 (Debian 13 rootfs, cached under /var/cache/clusterctl-tests) for the tests'
# second systemd version; built here, before the tests, so they never race to build it.
if [ "$(id -u)" = 0 ]; then
    bash scripts/sd257-rootfs.sh build >/dev/null || fail_or_warn "could not build the systemd 257 rootfs"
else
    fail_or_warn "not root: no systemd 257 rootfs"
fi

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
cargo build --quiet --all-targets
# The Debian package for tests/package.rs (cargo-deb is installed on first use; later runs
# only re-package), built here so that the test itself never pays a cold build.
bash scripts/build-deb.sh >/dev/null || fail_or_warn "could not build the Debian package"
# Integration tests mostly wait on processes: run more of them than there are cores.
# Tests that cannot run print "SKIPPED: …" straight to stderr; count them at the end, so a
# green run that skipped something says so.
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets -- --test-threads=6 2>&1 | tee "$log" || status=$?
skipped=$(grep -c 'SKIPPED:' "$log" || true)
echo "tests took $(($(date +%s) - start)) s; ${skipped} SKIPPED (see the SKIPPED: lines above)"
exit "$status"
