#!/usr/bin/env bash
# `clusterctl upgrade` under load: 4 example workers behind clusterctl, `wrk -t2 -c50` for
# DURATION seconds while the supervisor is upgraded COUNT times, alternating between two
# different builds: target/release (version V) and target/variant (built with
# CLUSTERCTL_VERSION_SUFFIX=+variant, so `status` and the answer report V+variant).
# Prints one row per upgrade: the client's wall time for `upgrade --wait`, the
# supervisor's own "resumed in" figure (request received → new image answering), the
# version now reported, whether the supervisor and worker pids stayed the same; then wrk's
# totals. A correct run has the same pids throughout, 0 socket errors and 0 non-2xx.
#
#   bash bench/upgrade.sh [DURATION] [COUNT]          (defaults: 20 10)
#
# Builds what is missing (the variant build takes as long as a release build). 127.0.0.1
# only; every process started here is stopped by pid; the load is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-20}"
COUNT="${2:-10}"
command -v wrk >/dev/null || { echo "bench: needs wrk (apt-get install wrk)" >&2; exit 2; }
A=target/release/clusterctl
B=target/variant/release/clusterctl
WORKER=target/release/examples/worker
if [ ! -x "$A" ] || [ ! -x "$WORKER" ]; then
    cargo build --release --quiet --bin clusterctl --example worker
fi
if [ ! -x "$B" ]; then
    CLUSTERCTL_VERSION_SUFFIX=+variant cargo build --release --quiet --target-dir target/variant --bin clusterctl
fi
A="$(realpath "$A")"
B="$(realpath "$B")"
TMP="$(mktemp -d)"
SUP=""
WRK=""
cleanup() {
    if [ -n "$WRK" ]; then kill -TERM "$WRK" 2>/dev/null || true; wait "$WRK" 2>/dev/null || true; fi
    if [ -n "$SUP" ]; then kill -TERM "$SUP" 2>/dev/null || true; wait "$SUP" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
CTL="$TMP/control.sock"
"$A" run --log stderr --listen "127.0.0.1:$port" --workers 4 --control "$CTL" \
    -- "$(realpath "$WORKER")" 2>"$TMP/sup.log" &
SUP=$!
for _ in $(seq 400); do
    grep -q "all 4 workers ready" "$TMP/sup.log" && break
    sleep 0.05
done
grep -q "all 4 workers ready" "$TMP/sup.log" || { cat "$TMP/sup.log"; echo "FAIL: not ready" >&2; exit 1; }
pids() { "$A" status --json --control "$CTL" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["supervisor"]["pid"], " ".join(str(w["pid"]) for w in sorted(s["workers"], key=lambda w: w["slot"])))'; }
version() { "$A" status --json --control "$CTL" | python3 -c 'import json,sys; print(json.load(sys.stdin)["supervisor"]["version"])'; }
BEFORE="$(pids)"

timeout $((DURATION + 30)) wrk -t2 -c50 -d"${DURATION}s" "http://127.0.0.1:$port/" >"$TMP/wrk.txt" 2>&1 &
WRK=$!
sleep 2   # wrk warms up: the first upgrade happens under full load
# Spread the upgrades over the middle of the run.
GAP="$(python3 -c "print(max(0.2, ($DURATION - 4) / $COUNT))")"
FAILED=0
printf '| # | to binary | version reported | client ms | resumed ms | same pids |\n'
printf '|---|---|---|---|---|---|\n'
for i in $(seq "$COUNT"); do
    if [ $((i % 2)) -eq 1 ]; then bin="$B"; else bin="$A"; fi
    t0="$(date +%s%N)"
    answer="$("$A" upgrade --wait --binary "$bin" --control "$CTL")" || { echo "FAIL: upgrade $i: $answer"; FAILED=1; }
    t1="$(date +%s%N)"
    resumed="$(sed -n 's/.* in \([0-9]*\)ms;.*/\1/p' <<<"$answer")"
    same=yes
    [ "$(pids)" = "$BEFORE" ] || { same=NO; FAILED=1; }
    printf '| %d | %s | %s | %d | %s | %s |\n' "$i" "${bin#"$PWD"/}" "$(version)" $(((t1 - t0) / 1000000)) "$resumed" "$same"
    sleep "$GAP"
done
wait "$WRK" || true
WRK=""
echo
grep -E "requests in|Socket errors|Non-2xx|Latency|Requests/sec" "$TMP/wrk.txt" || true
if grep -q "Socket errors\|Non-2xx" "$TMP/wrk.txt"; then
    echo "FAIL: requests failed"
    FAILED=1
fi
echo "supervisor + worker pids before and after: $BEFORE / $(pids)"
[ "$FAILED" -eq 0 ] && echo "OK: $COUNT upgrades, same pids, 0 socket errors, 0 non-2xx"
exit "$FAILED"
