#!/usr/bin/env bash
# Builds the policies written in other languages than Rust, each the twin of
# a Rust policy and held to its CASES.toml:
#   policies/python/accel-fallback  (componentize-py)  accel_fallback_py.wasm
#   policies/js/port-range          (componentize-js)  port_range_js.wasm
# and prints the directory holding them. The tests and the benchmark find
# them there through QE_FOREIGN_POLICY_DIR, or in the same default place
# ($CARGO_TARGET_DIR/foreign-policies, target/ without it).
#
# Needs python3 (with venv) and Node.js with npm; the tools come from PyPI
# and npm at the versions the build scripts pin.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
out_dir=${QE_FOREIGN_POLICY_DIR:-$target_dir/foreign-policies}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
policies/python/accel-fallback/build.sh "$out_dir" >/dev/null
policies/js/port-range/build.sh "$out_dir" >/dev/null
echo "$out_dir"
