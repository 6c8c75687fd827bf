#!/usr/bin/env python3
"""Benchmarks side by side with what an operator would otherwise use.

One command runs every comparison on this machine and writes BENCHMARKS.md:

    tests/bench/run.py [--runs N] [--only fetch,policy,launch,ready,stop,footprint,agent]

Absolute times on shared machines drift from run to run; the ratio measured
side by side in the same run is the figure that counts, so the executor and
its alternative always run alternately, on the same server and the same file.
"""

import argparse
import datetime
import hashlib
import http.server
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
EXECUTOR = TARGET / "release" / "qemu-executor"
SCRATCH = Path(os.environ.get("QE_BENCH_DIR", "/var/tmp/qemu-executor-bench"))
GiB = 1 << 30


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


# ---------------------------------------------------------------- reporting


class Table:
    """One comparison: rows of samples, a ratio, the command to reproduce."""

    def __init__(self, title, command, note=""):
        self.title, self.command, self.note = title, command, note
        self.rows = []  # (label, samples, unit)
        self.extra = []  # (label, text)

    def add(self, label, samples, unit="s"):
        self.rows.append((label, list(samples), unit))

    def median(self, label):
        return statistics.median(next(s for l, s, _ in self.rows if l == label))

    def text(self, label, value):
        self.extra.append((label, value))

    def markdown(self):
        out = [f"## {self.title}", ""]
        if self.note:
            out += [self.note, ""]
        out += ["| | median | min | max | runs |", "|---|---|---|---|---|"]
        for label, samples, unit in self.rows:
            fmt = fmt_value(unit)
            out.append(
                f"| {label} | {fmt(statistics.median(samples))} | {fmt(min(samples))} "
                f"| {fmt(max(samples))} | {len(samples)} |"
            )
        out.append("")
        for label, value in self.extra:
            out.append(f"- {label}: {value}")
        out += ["", f"Reproduce: `{self.command}`", ""]
        return "\n".join(out)


def fmt_value(unit):
    if unit == "s":
        return lambda v: f"{v:.3f} s" if v >= 0.1 else f"{v * 1000:.1f} ms"
    if unit == "MiB":
        return lambda v: f"{v:.1f} MiB"
    if unit == "%":
        return lambda v: f"{v:.2f} %"
    return lambda v: f"{v} {unit}"


def machine():
    model = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        platform.processor(),
    )
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    qemu = sh(["qemu-system-x86_64", "-version"]).splitlines()[0]
    return (
        f"{os.cpu_count()} × {model}, {mem // 1024} MiB RAM, Linux {platform.release()}, "
        f"{qemu}, load average at start {os.getloadavg()[0]:.2f}"
    )


# ---------------------------------------------------------------- helpers


class CountingServer:
    """A loopback HTTP file server that counts requests and body bytes."""

    def __init__(self, root):
        counts = self.counts = {"requests": 0, "body_bytes": 0}

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def log_message(self, *a):
                pass

            def copyfile(self, source, outputfile):
                counts["requests"] += 1
                while True:
                    buf = source.read(1 << 20)
                    if not buf:
                        break
                    outputfile.write(buf)
                    counts["body_bytes"] += len(buf)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self):
        self.httpd.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def md5_file(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def http_answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(5) == b"HTTP/"
    except OSError:
        return False


def proc_stat(pid):
    """(rss MiB, cpu seconds) of a process from /proc."""
    status = open(f"/proc/{pid}/status").read()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return rss_kb / 1024, ticks / os.sysconf("SC_CLK_TCK")


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start(cmd, **kw):
    return subprocess.Popen(cmd, start_new_session=True, **kw)


# ---------------------------------------------------------------- the benches


def bench_fetch(runs, tables):
    image = SCRATCH / "img1g"
    if not image.exists() or image.stat().st_size != GiB:
        log("writing a 1 GiB random image (once)")
        with open(image, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
    digest = md5_file(image)
    server = CountingServer(SCRATCH)
    url = server.url("img1g")
    cmd_exec = f"qemu-executor fetch {url} --checksum md5:{digest} --cache-dir DIR"
    cmd_curl = f"curl -s {url} | tee FILE | md5sum"
    t = Table(
        "Fetch: 1 GiB from a loopback HTTP server",
        f"{cmd_exec}   vs   {cmd_curl}",
        "Same server (Python's threading HTTP server), same file, run alternately; "
        "the executor also fsyncs and renames into its cache, curl does not.",
    )
    execs, curls = [], []
    for i in range(runs):
        for which in ("exec", "curl"):
            work = Path(tempfile.mkdtemp(dir=SCRATCH))
            sh(["sync"])
            t0 = time.perf_counter()
            if which == "exec":
                subprocess.run(
                    [EXECUTOR, "fetch", url, "--checksum", f"md5:{digest}", "--cache-dir", work],
                    check=True, capture_output=True,
                )
                execs.append(time.perf_counter() - t0)
            else:
                out = subprocess.run(
                    f"curl -s {url} | tee {work}/file | md5sum", shell=True, check=True,
                    capture_output=True, text=True,
                ).stdout
                curls.append(time.perf_counter() - t0)
                assert out.split()[0] == digest
            shutil.rmtree(work)
    t.add("qemu-executor fetch", execs)
    t.add("curl \\| tee \\| md5sum", curls)
    ratio = statistics.median(execs) / statistics.median(curls)
    t.text("ratio executor / curl (medians)", f"**{ratio:.2f}** (goal ≤ 1.0)")
    tables.append(t)

    # Warm cache: the second fetch of the same checksum.
    work = Path(tempfile.mkdtemp(dir=SCRATCH))
    fetch = [EXECUTOR, "fetch", url, "--checksum", f"md5:{digest}", "--cache-dir", work]
    subprocess.run(fetch, check=True, capture_output=True)
    before = dict(server.counts)
    warm = []
    for _ in range(max(runs, 5)):
        t0 = time.perf_counter()
        subprocess.run(fetch, check=True, capture_output=True)
        warm.append(time.perf_counter() - t0)
    w = Table("Fetch, warm cache", cmd_exec + "   (a second time)")
    w.add("qemu-executor fetch, image cached", warm)
    w.text("requests sent to the server", server.counts["requests"] - before["requests"])
    w.text("body bytes transferred", f"**{server.counts['body_bytes'] - before['body_bytes']}** (goal 0, ≤ 20 ms)")
    tables.append(w)
    shutil.rmtree(work)
    server.close()


def bench_policy(tables):
    log("cargo bench --bench policy (release)")
    out = sh(["cargo", "bench", "-q", "-p", "qemu-executor", "--bench", "policy"], cwd=ROOT)
    t = Table(
        "Policies: compile, load from the precompiled cache, evaluate in a fresh instance",
        "scripts/build-policies.sh && cargo bench -p qemu-executor --bench policy",
        "Measured by the policy benchmark (wasmtime 48, pooling allocator, a fresh "
        "instance per evaluation), next to the same logic as native Rust. Goals: "
        "≤ 100 µs per policy per evaluation (median), ≤ 5 ms per policy to load.",
    )
    t.raw = out
    tables.append(t)


def guest_iso():
    out = sh([str(ROOT / "tests/guest/build-guest.sh")])
    lines = out.split()
    return Path(lines[0]), Path(lines[1])


def task_file(work, name, url, checksum, port, extra=""):
    path = work / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\nimage_source = "{url}"\nchecksum = "md5:{checksum}"\n'
        f"accelerator = \"tcg\"\nhost_port = {port}\nguest_port = 8080\nmemory_mb = 256\n{extra}"
    )
    return path


def policy_config(work):
    policy_dir = Path(os.environ.get("QE_POLICY_DIR", TARGET / "wasm32-wasip2" / "release"))
    config = work / "executor.toml"
    config.write_text(
        f'[[policy]]\nmodule = "{policy_dir}/accel_fallback.wasm"\n\n'
        f'[[policy]]\nmodule = "{policy_dir}/port_range.wasm"\n'
        'settings = { min = 1024, max = 65535, mode = "clamp" }\n\n'
        f'[[policy]]\nmodule = "{policy_dir}/resource_caps.wasm"\n'
        'settings = { max_memory_mb = 4096, max_cpus = 2, mode = "clamp" }\n\n'
        f'[[policy]]\nmodule = "{policy_dir}/image_allowlist.wasm"\n'
        'settings = { schemes = ["http"], hosts = ["127.0.0.1"], algorithms = ["md5"] }\n'
    )
    return config


class ExecutorRun:
    """`qemu-executor run` with JSON logs, its stdout lines timestamped."""

    def __init__(self, work, config, task):
        self.t0 = time.time()
        self.proc = start(
            [EXECUTOR, "--log-format", "json", "--config", config, "--state-dir", work / "state",
             "--cache-dir", work / "cache", "run", task],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines, self.logs = [], []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.logs), daemon=True).start()

    @staticmethod
    def _read(stream, into):
        for line in stream:
            into.append((time.time(), line.rstrip("\n")))

    def wait_line(self, prefix, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for ts, line in self.lines:
                if line.startswith(prefix):
                    return ts, line
            if self.proc.poll() is not None:
                raise RuntimeError(f"executor ended: {self.lines} {self.logs[-5:]}")
            time.sleep(0.005)
        raise RuntimeError(f"no {prefix!r} within {timeout}s: {self.lines}")

    def log_time(self, message):
        """When the executor logged `message`, by its own clock."""
        for _, line in self.logs:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == message:
                return datetime.datetime.fromisoformat(entry["timestamp"]).timestamp()
        raise RuntimeError(f"no log line {message!r}: {self.logs[-5:]}")

    def stop(self, sig=signal.SIGTERM, timeout=120):
        t0 = time.perf_counter()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return time.perf_counter() - t0, code


def bench_launch(runs, tables, iso, server, work):
    config = policy_config(work)
    digest = md5_file(iso)
    # Warm the image cache and the policy artifacts first.
    task = task_file(work, "warm", server.url(iso.name), digest, free_port())
    r = ExecutorRun(work, config, task)
    r.wait_line("started:")
    kill_group(r.proc)
    overheads = []
    for i in range(max(runs, 5)):
        task = task_file(work, f"launch{i}", server.url(iso.name), digest, free_port())
        r = ExecutorRun(work, config, task)
        r.wait_line("started:")
        started = r.log_time("qemu started")
        overheads.append(started - r.t0)
        kill_group(r.proc)
    t = Table(
        "Launch overhead: from `qemu-executor run` to the qemu process started",
        "qemu-executor --config executor.toml run task.toml   (image cached, four policies, artifacts cached)",
        "From just before the executor is spawned to its `qemu started` log line (the "
        "spawn of qemu): process start, configuration, host facts, loading the four "
        "policies from the precompiled cache, evaluating them, the cache lookup, the "
        "task directory and the qemu command line.",
    )
    t.add("run → qemu spawned", overheads)
    t.text("goal", "≤ 50 ms")
    tables.append(t)


def hand_written_qemu(iso, work, port):
    """The same options as the executor's, by hand, and a shell loop polling HTTP."""
    args = [
        "qemu-system-x86_64", "-name", "guest=hand", "-machine", "pc", "-accel", "tcg",
        "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-drive", f"file={iso},if=ide,index=1,media=cdrom,readonly=on,format=raw",
        "-boot", "order=d", "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:8080",
        "-device", "e1000,netdev=net0", "-serial", f"file:{work}/hand-serial.log",
        "-qmp", f"unix:{work}/hand-qmp.sock,server=on,wait=off",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]
    return args


def bench_ready_and_stop(runs, tables, iso, stubborn, server, work):
    config = policy_config(work)
    digest = md5_file(iso)
    ex, hand, stops = [], [], []
    footprint = None
    for i in range(runs):
        port = free_port()
        task = task_file(work, f"ready{i}", server.url(iso.name), digest, port)
        r = ExecutorRun(work, config, task)
        ts, _ = r.wait_line("ready: tcp")
        ex.append(ts - r.t0)
        assert http_answers(port)
        if footprint is None:
            footprint = measure_footprint(r.proc.pid)
        took, code = r.stop()
        assert code == 0, code
        stops.append(took)

        port = free_port()
        loop = f"until curl -s -m 2 -o /dev/null http://127.0.0.1:{port}/; do sleep 0.2; done"
        t0 = time.time()
        q = start(hand_written_qemu(iso, work, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["sh", "-c", loop], check=True)
        hand.append(time.time() - t0)
        kill_group(q)
    t = Table(
        "Time to ready: the test guest answering HTTP through the forwarded port",
        "qemu-executor run task.toml (until its ready line)   vs   qemu-system-x86_64 <same options> & "
        "until curl -s -m 2 http://127.0.0.1:PORT/; do sleep 0.2; done",
        "The hand-written command uses the executor's options (tcg, 256 MiB, 1 cpu, the ISO "
        "as a read-only cdrom, e1000 with one hostfwd, serial to a file, QMP, -sandbox); both "
        "from spawn to the first real HTTP answer. Run alternately.",
    )
    t.add("qemu-executor run", ex)
    t.add("hand-written qemu + curl loop", hand)
    ratio = statistics.median(ex) / statistics.median(hand)
    t.text("ratio executor / hand-written (medians)", f"**{ratio:.3f}** (goal ≤ 1.05)")
    tables.append(t)

    # A stubborn guest, killed at its kill_timeout_s.
    kills = []
    for i in range(max(1, runs // 2)):
        port = free_port()
        task = task_file(work, f"stubborn{i}", server.url(stubborn.name), md5_file(stubborn), port,
                         "kill_timeout_s = 3\n")
        r = ExecutorRun(work, config, task)
        r.wait_line("ready: tcp")
        took, code = r.stop()
        assert code == 6, code
        kills.append(took)
    s = Table(
        "Stop",
        "kill -TERM <qemu-executor run>",
        "SIGTERM to exit of `qemu-executor run`: the ACPI power button, the guest's power-off "
        "and qemu's exit; for the stubborn guest, the 3 s kill timeout, then `quit`.",
    )
    s.add("graceful stop, cooperative guest", stops)
    s.add("stubborn guest, kill_timeout_s = 3", kills)
    s.text("goal", "graceful stop ≤ 2 s")
    tables.append(s)

    if footprint:
        rss, cpu = footprint
        f = Table(
            "Footprint: `qemu-executor run` supervising one ready VM",
            "qemu-executor run task.toml; then VmRSS and utime+stime of the executor over 30 s idle",
        )
        f.add("executor resident memory", [rss], "MiB")
        f.add("executor CPU while idle", [cpu], "%")
        tables.append(f)


def measure_footprint(pid, seconds=30):
    rss0, cpu0 = proc_stat(pid)
    time.sleep(seconds)
    rss1, cpu1 = proc_stat(pid)
    return max(rss0, rss1), 100 * (cpu1 - cpu0) / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="fetch,policy,launch,ready,agent")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    SCRATCH.mkdir(parents=True, exist_ok=True)

    log("building release binaries, policies and the guest")
    subprocess.run(["scripts/setup.sh"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "qemu-executor"], cwd=ROOT, check=True)
    os.environ.setdefault("QE_POLICY_DIR", sh(["scripts/build-policies.sh"], cwd=ROOT).strip())
    iso, stubborn = guest_iso()

    host = machine()
    tables = []
    if "fetch" in only:
        bench_fetch(args.runs, tables)
    if "policy" in only:
        bench_policy(tables)
    work = Path(tempfile.mkdtemp(dir=SCRATCH))
    server = CountingServer(iso.parent)
    try:
        if "launch" in only:
            bench_launch(args.runs, tables, iso, server, work)
        if "ready" in only:
            bench_ready_and_stop(args.runs, tables, iso, stubborn, server, work)
        if "agent" in only:
            agent = ROOT / "tests/bench/agent.sh"
            if agent.exists():
                out = sh([str(agent), "10"], cwd=ROOT)
                t = Table("Agent: 10 VMs", "tests/bench/agent.sh 10")
                t.md = out.strip()
                tables.append(t)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    write_report(args, host, tables)


def write_report(args, host, tables):
    out = [
        "# Benchmarks",
        "",
        f"Machine: {host}.",
        "",
        f"Written by `tests/bench/run.py --runs {args.runs}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Absolute times drift on shared "
        "machines; the ratios, measured side by side in the same run, are the figures that count.",
        "",
    ]
    for t in tables:
        if hasattr(t, "md"):
            out += [t.md, ""]
        elif hasattr(t, "raw"):
            out += [f"## {t.title}", "", t.note, "", "```", t.raw.rstrip(), "```", "",
                    f"Reproduce: `{t.command}`", ""]
        else:
            out.append(t.markdown())
    history = ROOT / "tests/bench/HISTORY.md"
    if history.exists():
        out += [history.read_text()]
    Path(args.out).write_text("\n".join(out))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
