#!/usr/bin/env bash
# Benchmark of agent mode (issue 4's goals): the agent's resident memory
# and CPU use while it supervises N idle VMs (default 10), and the time
# from agent start to all N tasks recovered after a SIGKILL of the agent.
#
#   tests/bench/agent.sh [N]        # as root; builds the release binary
#
# Goals: under 30 MB resident, no measurable CPU when idle, recovery of 10
# tasks in under a second. The test guest boots for real under TCG (about
# 11 s of one core each), so the VMs are idle but not paused: the agent
# holds each VM's QMP connection, and its CPU is measured alone, from
# /proc/PID/stat, not the VMs'.
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${1:-10}
IDLE_SECS=${IDLE_SECS:-30}
RECOVERIES=${RECOVERIES:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

cargo build --release -p qemu-executor >&2
BIN=$CARGO_TARGET_DIR/release/qemu-executor
GUEST_DIR=$(dirname "$(tests/guest/build-guest.sh | head -1)")
MD5=$(md5sum "$GUEST_DIR/guest.iso" | cut -d' ' -f1)

WORK=$(mktemp -d /tmp/qe-bench-agent-XXXXXX)
SOCK=$WORK/agent.sock
AGENT_PID=
HTTP_PID=
cleanup() {
    [ -n "$AGENT_PID" ] && kill -9 "$AGENT_PID" 2>/dev/null || true
    [ -n "$HTTP_PID" ] && kill "$HTTP_PID" 2>/dev/null || true
    # The VMs outlive the agent by design: end them and their shims.
    for pid in $(pgrep -f -- "$WORK" || true); do kill -9 "$pid" 2>/dev/null || true; done
    for h in memory cpu; do
        for d in /sys/fs/cgroup/$h/qe-bench-$$/*/; do rmdir "$d" 2>/dev/null || true; done
        rmdir /sys/fs/cgroup/$h/qe-bench-$$ 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

HTTP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$HTTP_PORT" --bind 127.0.0.1 --directory "$GUEST_DIR" >/dev/null 2>&1 &
HTTP_PID=$!

cat >"$WORK/executor.toml" <<EOF
[agent]
cgroup_parent = "qe-bench-$$"
EOF

start_agent() {
    "$BIN" --state-dir "$WORK/state" --cache-dir "$WORK/cache" --config "$WORK/executor.toml" \
        agent --socket "$SOCK" "$@" >>"$WORK/agent.log" 2>&1 &
    AGENT_PID=$!
}
api() { curl -sf --unix-socket "$SOCK" "http://agent$1"; }
now() { date +%s.%N; }
ticks() { awk '{ s = $0; sub(/^.*\) /, "", s); split(s, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
clk=$(getconf CLK_TCK)

start_agent
until api /v1/health >/dev/null 2>&1; do sleep 0.05; done
echo "submitting $N tasks" >&2
for i in $(seq 1 "$N"); do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$WORK/task-$i.toml" <<EOF
name = "bench-$i"
image_source = "http://127.0.0.1:$HTTP_PORT/guest.iso"
checksum = "md5:$MD5"
host_port = $port
guest_port = 8080
memory_mb = 128
accelerator = "tcg"
ready_timeout_s = 600
kill_timeout_s = 30
EOF
    QEMU_EXECUTOR_SOCKET=$SOCK "$BIN" submit "$WORK/task-$i.toml" >/dev/null
done
echo "waiting until all $N guests answer on their ports" >&2
until [ "$(api /v1/tasks | grep -c '"state": "ready"')" = "$N" ]; do sleep 1; done
sleep 5

t0=$(ticks "$AGENT_PID")
sleep "$IDLE_SECS"
t1=$(ticks "$AGENT_PID")
idle_ticks=$((t1 - t0))
agent_rss=$(rss_kb "$AGENT_PID")
shim_rss=0
for pid in $(pgrep -f -- "shim --exit-record $WORK" || true); do
    shim_rss=$((shim_rss + $(rss_kb "$pid")))
done

recoveries=()
for r in $(seq 1 "$RECOVERIES"); do
    kill -9 "$AGENT_PID"
    wait "$AGENT_PID" 2>/dev/null || true
    start=$(now)
    start_agent
    until out=$(api /v1/health 2>/dev/null) && echo "$out" | grep -q '"recovering": 0' \
        && echo "$out" | grep -q "\"tasks\": $N"; do
        sleep 0.005
    done
    end=$(now)
    recoveries+=("$(echo "($end - $start) * 1000" | bc -l)")
    ready=$(api /v1/tasks | grep -c '"state": "ready"')
    [ "$ready" = "$N" ] || { echo "only $ready of $N tasks ready after recovery $r" >&2; exit 1; }
done
sleep 2
after_rss=$(rss_kb "$AGENT_PID")

sorted=$(printf '%s\n' "${recoveries[@]}" | sort -n)
median=$(echo "$sorted" | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
min=$(echo "$sorted" | head -1)
max=$(echo "$sorted" | tail -1)

printf '\n## Agent with %s idle VMs (%s)\n\n' "$N" "$(uname -r), $(nproc) cpus, qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}')"
printf '| measure | value | goal |\n|---|---|---|\n'
printf '| agent resident memory, %s VMs ready | %.1f MB | < 30 MB |\n' "$N" "$(echo "$agent_rss / 1024" | bc -l)"
printf '| agent resident memory after %s recoveries | %.1f MB | < 30 MB |\n' "$RECOVERIES" "$(echo "$after_rss / 1024" | bc -l)"
printf '| agent CPU over %ss idle | %s ticks = %.3f%% of one cpu | ~0 |\n' "$IDLE_SECS" "$idle_ticks" "$(echo "$idle_ticks * 100 / ($clk * $IDLE_SECS)" | bc -l)"
printf '| shims, %s of them, resident in total | %.1f MB | - |\n' "$N" "$(echo "$shim_rss / 1024" | bc -l)"
printf '| agent start to %s tasks recovered (median, min, max of %s) | %.0f ms, %.0f ms, %.0f ms | < 1000 ms |\n' "$N" "$RECOVERIES" "$median" "$min" "$max"
printf '\nCommand: tests/bench/agent.sh %s (IDLE_SECS=%s RECOVERIES=%s)\n' "$N" "$IDLE_SECS" "$RECOVERIES"

# Stop every VM gracefully through the last agent.
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
start_agent --stop-tasks-on-exit
until out=$(api /v1/health 2>/dev/null) && echo "$out" | grep -q '"recovering": 0'; do sleep 0.05; done
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" 2>/dev/null || true
AGENT_PID=
