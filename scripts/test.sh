#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what the tests need on a clean Debian machine (as root), then runs
# formatting and lint checks, unit tests, and the integration tests (real processes,
# real sockets, and a real systemd booted in private namespaces; those skip with a
# message when not root, and fail in CI (CI=true) if systemd cannot boot).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v unshare >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
[ -x /usr/bin/python3 ] || need+=(python3)
[ -x /usr/bin/gunicorn ] || need+=(gunicorn)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "missing (install as root): ${need[*]}; the tests that need them will fail" >&2
    fi
fi

cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
cargo build --quiet --all-targets
# Integration tests mostly wait on processes: run more of them than there are cores.
cargo test --all-targets -- --test-threads=6
