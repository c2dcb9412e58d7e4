#!/usr/bin/env bash
# Reproducer for the worker's drain race (a connection taken by an accept thread that was
# still blocked in accept() when the process exited was reset). Sparse new connections
# make it likely: every request opens a new connection (`Connection: close`) to
# /sleep/1, from 2 connections only, while reloads run back to back for DURATION seconds.
# A correct worker gives 0 socket errors.
#
#   bash bench/drain_race.sh [BIN_DIR] [DURATION]
#
# BIN_DIR holds clusterctl and examples/worker (default: target/release, built if
# missing). 127.0.0.1 only; every process started here is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release}"
DURATION="${2:-40}"
if [ ! -x "$BIN/clusterctl" ] || [ ! -x "$BIN/examples/worker" ]; then
    cargo build --release --quiet --bin clusterctl --example worker
fi
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
TMP="$(mktemp -d)"
SUP=""
WRK=""
cleanup() {
    for pid in $WRK $SUP; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in $WRK $SUP; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

"$BIN/clusterctl" run --log stderr --listen "127.0.0.1:$PORT" --workers 2 \
    --control "$TMP/control.sock" -- "$BIN/examples/worker" 2>"$TMP/supervisor.log" &
SUP=$!
for _ in $(seq 100); do
    # bash's /dev/tcp: connected means the supervisor is listening.
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
sleep 0.2 # the workers' READY=1
timeout $((DURATION + 30)) wrk -t1 -c2 -d"${DURATION}s" -H "Connection: close" \
    "http://127.0.0.1:$PORT/sleep/1" >"$TMP/wrk.txt" 2>&1 &
WRK=$!
sleep 0.5
ok=0
failed=0
start=$(date +%s)
while [ $(($(date +%s) - start)) -lt $((DURATION - 2)) ]; do
    if "$BIN/clusterctl" reload --wait --control "$TMP/control.sock" >/dev/null 2>&1; then
        ok=$((ok + 1))
    else
        failed=$((failed + 1))
    fi
done
wait "$WRK" || true
WRK=""
echo "reloads: $ok ok, $failed failed"
grep -E "requests in|Socket errors|Non-2xx" "$TMP/wrk.txt" || true
if grep -q "Socket errors\|Non-2xx" "$TMP/wrk.txt"; then
    echo "FAIL: requests failed during reloads"
    exit 1
fi
echo "OK: 0 socket errors, 0 non-2xx"
