#!/usr/bin/env bash
# The main job, end to end, on a built-in demo: build the test guest, serve
# it over HTTP on loopback, run qemu-executor on examples/web.toml, show the
# guest answering through the forwarded port, and stop it gracefully.
set -euo pipefail
cd "$(dirname "$0")"

scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

# The first build compiles wasmtime and the rest from source: about 9
# minutes on two cores (cargo shows its progress); later runs take seconds.
say "building qemu-executor and the shipped policies (the first time: about 9 minutes on 2 cores)"
cargo build -p qemu-executor
bin=$CARGO_TARGET_DIR/debug/qemu-executor
policy_dir=$(scripts/build-policies.sh)

say "building the demo guest (cached after the first time)"
guest_iso=$(tests/guest/build-guest.sh | head -n1)

work=$(mktemp -d -t qemu-executor-demo.XXXXXX)
server_pid= executor_pid=
cleanup() {
    [ -n "$executor_pid" ] && kill -TERM "$executor_pid" 2>/dev/null && wait "$executor_pid" 2>/dev/null
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

say "serving $(basename "$guest_iso") on http://127.0.0.1:8000/"
python3 -m http.server --bind 127.0.0.1 --directory "$(dirname "$guest_iso")" 8000 >"$work/http.log" 2>&1 &
server_pid=$!

sum=$(md5sum "$guest_iso" | cut -d' ' -f1)
sed "s/^checksum = .*/checksum = \"md5:$sum\"/" examples/web.toml >"$work/web.toml"
cat >"$work/executor.toml" <<TOML
[[policy]]
module = "$policy_dir/accel_fallback.wasm"

[[policy]]
module = "$policy_dir/port_range.wasm"
settings = { min = 10000, max = 20000, mode = "clamp" }
TOML

say "qemu-executor run examples/web.toml (state and cache under $work)"
"$bin" --config "$work/executor.toml" --state-dir "$work/state" --cache-dir "$work/cache" \
    run "$work/web.toml" > >(tee "$work/run.out") &
executor_pid=$!

for _ in $(seq 1 240); do
    grep -q '^ready: tcp' "$work/run.out" 2>/dev/null && break
    kill -0 "$executor_pid" 2>/dev/null || { echo "qemu-executor ended early" >&2; exit 1; }
    sleep 0.5
done
grep -q '^ready: tcp' "$work/run.out" || { echo "the guest never became ready" >&2; exit 1; }

say "curl http://127.0.0.1:18080/  (through qemu's port forward)"
curl -s http://127.0.0.1:18080/

say "stopping gracefully (SIGTERM: ACPI power button, then quit, then kill)"
kill -TERM "$executor_pid"
status=0
wait "$executor_pid" || status=$?
executor_pid=
say "qemu-executor exited with status $status"
exit "$status"
