#!/bin/sh
# Builds the shipped policies and the hostile test policies as WebAssembly
# components (wasm32-wasip2, release) and prints the directory that holds
# the .wasm files. The tests and the benchmark find them there through
# QE_POLICY_DIR, or in the same default place this script builds to.
set -eu
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 \
    || rustup target add wasm32-wasip2 >&2
cargo build --release --target wasm32-wasip2 \
    -p port-range -p accel-fallback -p resource-caps -p image-allowlist \
    -p hostile -p hostile-liar -p future-contract -p greedy-imports \
    -p rewriter -p wrong-signature >&2
target_dir="${CARGO_TARGET_DIR:-$(pwd)/target}"
echo "$target_dir/wasm32-wasip2/release"
