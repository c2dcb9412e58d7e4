#!/usr/bin/env bash
# Worker recycling under load: 2 example workers behind clusterctl, `wrk -t2 -c50
# --latency` for DURATION seconds twice: once steady (no recycling), once with
# `--max-worker-age AGE` so the workers are replaced one slot at a time, new before old,
# all through the run. Prints wrk's requests, socket errors, non-2xx and latency for both,
# and the recycles the supervisor logged. A correct run has 0 socket errors and 0 non-2xx.
#
#   bash bench/recycle.sh [BIN_DIR] [DURATION] [AGE]      (defaults: target/release 30 3s±20%)
#
# BIN_DIR holds clusterctl and examples/worker (built if missing). 127.0.0.1 only; every
# process started here is stopped by pid; each load is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release}"
DURATION="${2:-30}"
AGE="${3:-3s±20%}"
command -v wrk >/dev/null || { echo "bench: needs wrk (apt-get install wrk)" >&2; exit 2; }
if [ ! -x "$BIN/clusterctl" ] || [ ! -x "$BIN/examples/worker" ]; then
    cargo build --release --quiet --bin clusterctl --example worker
fi
TMP="$(mktemp -d)"
SUP=""
cleanup() {
    if [ -n "$SUP" ]; then kill -TERM "$SUP" 2>/dev/null || true; wait "$SUP" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

# run NAME [clusterctl options...]: one supervisor, one wrk run, then a clean stop.
run() {
    local name="$1"
    shift
    local port
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    "$BIN/clusterctl" run --log stderr --listen "127.0.0.1:$port" --workers 2 \
        --control "$TMP/$name.sock" "$@" -- "$BIN/examples/worker" 2>"$TMP/$name.log" &
    SUP=$!
    for _ in $(seq 200); do
        grep -q "all 2 workers ready" "$TMP/$name.log" && break
        sleep 0.05
    done
    timeout $((DURATION + 30)) wrk -t2 -c50 -d"${DURATION}s" --latency \
        "http://127.0.0.1:$port/" >"$TMP/$name.wrk" 2>&1 || true
    kill -TERM "$SUP"
    wait "$SUP" || true
    SUP=""
    local recycles
    recycles="$(grep -c " recycled: pid " "$TMP/$name.log" || true)"
    echo "== $name: $recycles recycles"
    grep -E "requests in|Socket errors|Non-2xx|Latency  |  50%|  99%" "$TMP/$name.wrk" || true
    if [ "$recycles" -gt 0 ]; then
        # The supervisor's time from "recycling worker" to "recycled" (replacement ready
        # and up for --min-uptime, old one told to drain).
        grep -o "took [0-9.]*m\?s)" "$TMP/$name.log" | sed 's/took //; s/)//' | sort -n | tr '\n' ' ' \
            | sed 's/^/   recycle step durations: /'
        echo
    fi
    if grep -q "Socket errors\|Non-2xx" "$TMP/$name.wrk"; then
        echo "FAIL: requests failed ($name)"
        FAILED=1
    fi
}

FAILED=0
run steady
run recycling --max-worker-age "$AGE" --min-uptime 500ms
[ "$FAILED" -eq 0 ] && echo "OK: 0 socket errors, 0 non-2xx"
exit "$FAILED"
