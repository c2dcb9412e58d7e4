#!/usr/bin/env bash
# Builds the clusterctl binary to install: the `dist` profile (size-optimised, fat LTO,
# stripped) with glibc linked statically, which keeps the supervisor's resident memory
# near 2 MiB (a dynamic build maps ~1.3 MiB of shared glibc/ld.so pages on top).
# Prints the path of the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
host="$(rustc -vV | sed -n 's/^host: //p')"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --profile dist --target "$host" --bin clusterctl >&2
echo "$PWD/target/$host/dist/clusterctl"
