#!/usr/bin/env bash
# Builds app.py into a WebAssembly policy component with componentize-py
# (from PyPI, the version pinned below, in a virtual environment) and prints
# the path of the .wasm.
#
#   policies/python/accel-fallback/build.sh [OUT_DIR]
#
# OUT_DIR defaults to $CARGO_TARGET_DIR/foreign-policies (target/ without
# it). componentize-py is installed once into a venv under
# $QE_POLICY_TOOLS_DIR (default $CARGO_TARGET_DIR/policy-tools) and reused;
# nothing is written into the source tree. An unchanged source is not
# rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
out_dir=${1:-$target_dir/foreign-policies}
venv=${QE_POLICY_TOOLS_DIR:-$target_dir/policy-tools}/python-venv
out=$out_dir/accel_fallback_py.wasm
componentize_py_version=0.25.1

log() { printf 'accel-fallback (python): %s\n' "$*" >&2; }

mkdir -p "$out_dir" "$(dirname "$venv")"
# Absolute: the build runs from a scratch directory.
out_dir=$(cd "$out_dir" && pwd)
venv=$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")
out=$out_dir/accel_fallback_py.wasm
if [ "$("$venv/bin/componentize-py" --version 2>/dev/null)" != "componentize-py $componentize_py_version" ]; then
    log "installing componentize-py $componentize_py_version into $venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==$componentize_py_version" >&2
fi

# Rebuild only when the source, the contract or the tool changed.
stamp=$( (cat "$here/app.py" "$root/policy-sdk/wit/"*.wit; echo "$componentize_py_version") \
    | sha256sum | cut -d' ' -f1)
if [ -f "$out" ] && [ "$(cat "$out.stamp" 2>/dev/null)" = "$stamp" ]; then
    log "up to date"
else
    log "building with componentize-py $componentize_py_version"
    # The bindings (the wit_world package) are generated into a scratch
    # directory, not next to app.py.
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # The source is built from a copy there as well: componentize-py
    # leaves a __pycache__ beside the module it compiles.
    mkdir "$work/src"
    cp "$here/app.py" "$work/src/"
    (cd "$work" && "$venv/bin/componentize-py" -d "$root/policy-sdk/wit" -w policy \
        componentize app -p "$work/src" -o "$out.tmp" >&2)
    mv "$out.tmp" "$out"
    echo "$stamp" > "$out.stamp"
fi
echo "$out"
