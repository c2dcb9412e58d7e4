#!/usr/bin/env bash
# One command for the clusterctl benchmarks: installs what is missing (wrk, gunicorn,
# node/npm, pm2, strace), builds the release binaries, runs every section on 127.0.0.1
# only, each load bounded in time, and prints markdown tables (about 8 minutes; --quick
# for a short trial). Arguments go to bench/bench.py (--only 1,3 --quick --no-profile).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
command -v wrk >/dev/null || missing+=(wrk)
[ -x /usr/bin/gunicorn ] || missing+=(gunicorn)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v strace >/dev/null || missing+=(strace)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: installing ${missing[*]} (apt-get)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi
if ! command -v pm2 >/dev/null; then
    echo "bench: installing pm2 (npm install -g pm2@7)" >&2
    $SUDO npm install -g --no-fund --no-audit pm2@7 >&2
fi

echo "bench: cargo build --release --example worker; scripts/build-dist.sh (the supervisor as installed)" >&2
cargo build --release --quiet --bin clusterctl --example worker
CLUSTERCTL="$(bash scripts/build-dist.sh)"
export CLUSTERCTL

# The fork/exec floor of section 4 (optional: skipped without a C compiler).
mkdir -p target/bench
if command -v cc >/dev/null; then
    cc -O2 -Wall -Wextra -o target/bench/spawn_cost bench/spawn_cost.c
fi

# Debian's python3 (the one gunicorn uses) runs the harness; it needs only the stdlib.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
exec "$PY" bench/bench.py "$@"
