#!/usr/bin/env bash
# Runs every test: style, unit tests, the policies as wasm, and the
# end-to-end tests with real qemu, a real HTTP server and the test guest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

step() { printf '\n==> %s\n' "$*" >&2; }

step "style"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "test guest"
tests/guest/build-guest.sh >/dev/null

step "policies as wasm"
if [ -x scripts/build-policies.sh ]; then
    export QE_POLICY_DIR
    QE_POLICY_DIR=$(scripts/build-policies.sh)
fi

step "policies in Python and JavaScript"
# componentize-py and componentize-js at pinned versions, from PyPI and npm;
# tests/tests/policy_langs.rs holds them to their Rust twins' CASES.toml.
export QE_FOREIGN_POLICY_DIR
QE_FOREIGN_POLICY_DIR=$(scripts/build-foreign-policies.sh)

step "tests"
cargo build --workspace --locked
cargo test --workspace --locked -- --test-threads "${QE_TEST_THREADS:-2}"

step "no qemu left behind"
if pgrep -a -f 'qemu-system-x86_64.*qe-test-' ; then
    echo "qemu processes outlived the tests" >&2
    exit 1
fi
echo "all tests passed" >&2
