#!/usr/bin/env bash
# Builds port-range.js into a WebAssembly policy component with
# componentize-js (from npm, the version pinned in ../package.json and its
# lock file) and prints the path of the .wasm.
#
#   policies/js/port-range/build.sh [OUT_DIR]
#
# OUT_DIR defaults to $CARGO_TARGET_DIR/foreign-policies (target/ without
# it). The npm tools are installed once into $QE_POLICY_TOOLS_DIR (default
# $CARGO_TARGET_DIR/policy-tools) and reused; nothing is written into the
# source tree. An unchanged source is not rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
js=$(dirname "$here")
root=$(cd "$js/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
out_dir=${1:-$target_dir/foreign-policies}
tools=${QE_POLICY_TOOLS_DIR:-$target_dir/policy-tools}/js
out=$out_dir/port_range_js.wasm
componentize_js_version=0.23.0

log() { printf 'port-range (js): %s\n' "$*" >&2; }

command -v node >/dev/null || { log "needs Node.js (node) and npm"; exit 1; }
mkdir -p "$out_dir" "$tools"
# Absolute: the build runs from the tools directory.
out_dir=$(cd "$out_dir" && pwd)
tools=$(cd "$tools" && pwd)
out=$out_dir/port_range_js.wasm

# The tools: npm ci from the lock file whenever it changed.
if ! cmp -s "$js/package-lock.json" "$tools/package-lock.json" \
    || [ ! -d "$tools/node_modules/@bytecodealliance/componentize-js" ]; then
    log "installing componentize-js $componentize_js_version with npm"
    cp "$js/package.json" "$js/package-lock.json" "$tools/"
    (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
installed=$(node -p "require('$tools/node_modules/@bytecodealliance/componentize-js/package.json').version")
[ "$installed" = "$componentize_js_version" ] || {
    log "componentize-js $installed is installed, $componentize_js_version is pinned: fix package.json"
    exit 1
}
cp "$js/componentize.mjs" "$tools/"

# Rebuild only when the source, the contract or the tools changed.
stamp=$(cat "$here/port-range.js" "$root/policy-sdk/wit/"*.wit "$js/componentize.mjs" \
    "$js/package-lock.json" | sha256sum | cut -d' ' -f1)
if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
    log "up to date"
else
    log "building with componentize-js $componentize_js_version"
    (cd "$tools" && node componentize.mjs "$here/port-range.js" "$root/policy-sdk/wit" "$out.tmp")
    mv "$out.tmp" "$out"
    echo "$stamp" > "$out.stamp"
fi
echo "$out"
