#!/usr/bin/env bash
# The demo: builds clusterctl and the example worker, then runs 4 workers sharing
# 127.0.0.1:8080. In another terminal:
#   curl -s 127.0.0.1:8080/            # different workers answer
#   ./target/release/clusterctl status --control /tmp/clusterctl-demo.sock
#   ./target/release/clusterctl reload --wait --control /tmp/clusterctl-demo.sock
# Stop with Ctrl-C. PORT and WORKERS can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-8080}"
WORKERS="${WORKERS:-4}"
cargo build --release --quiet --bin clusterctl --example worker
echo "clusterctl demo: ${WORKERS} workers on http://127.0.0.1:${PORT}/ (Ctrl-C to stop)"
echo "  try: for i in 1 2 3 4 5 6; do curl -s 127.0.0.1:${PORT}/; done"
exec ./target/release/clusterctl run \
    --listen "127.0.0.1:${PORT}" --workers "${WORKERS}" \
    --control /tmp/clusterctl-demo.sock \
    -- ./target/release/examples/worker
