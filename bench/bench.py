#!/usr/bin/env python3
"""clusterctl benchmarks (run through bench/run.sh, which installs the tools and builds).

Everything runs on 127.0.0.1 only, every load is bounded in time, and every process this
script starts is tracked by pid and stopped by pid at the end (also on Ctrl-C).

Sections (pick with --only 1,2,...):
  1 data-path overhead: clusterctl ×2 on one shared socket vs 2 workers with SO_REUSEPORT
  2 reload under load: 20 reloads during a wrk run vs a steady-state run of the same length
  3 footprint: supervisor RSS and idle wakeups/s with 4 and 256 workers
  4 scale: start-up time to "all N workers ready", respawn latency, where the time goes
  5 peers: gunicorn (kill -HUP) and PM2 cluster mode (pm2 reload) vs clusterctl

Ratios are taken within one run; absolute numbers depend on the machine.
Markdown goes to stdout; raw results (JSON) and logs go to target/bench/.
"""

import argparse
import atexit
import datetime as dt
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# The supervisor as installed (bench/run.sh sets it to the scripts/build-dist.sh binary).
CLUSTERCTL = os.environ.get("CLUSTERCTL") or os.path.join(ROOT, "target/release/clusterctl")
WORKER = os.path.join(ROOT, "target/release/examples/worker")
STATS_LUA = os.path.join(BENCH, "stats.lua")
OUT = os.path.join(ROOT, "target/bench")
LOGS = os.path.join(OUT, "logs")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# --------------------------------------------------------------------------------------
# process bookkeeping: everything started here is stopped here, by pid


class Tracked:
    """Processes (Popen) started by this script, stopped by pid at exit."""

    procs = []
    extra_pids = set()  # grandchildren we learned about (PM2's daemon and apps, ...)
    cleanups = []  # callables (e.g. `pm2 kill` for our PM2_HOME)

    @classmethod
    def popen(cls, cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        cls.procs.append(p)
        return p

    @classmethod
    def stop_all(cls):
        for f in list(cls.cleanups):
            try:
                f()
            except Exception as e:  # noqa: BLE001 - best effort at exit
                print(f"cleanup: {e}", file=sys.stderr)
        cls.cleanups.clear()
        for p in cls.procs:
            if p.poll() is None:
                stop_pid(p.pid, signal.SIGTERM, 10, popen=p)
        cls.procs = [p for p in cls.procs if p.poll() is None]
        for pid in list(cls.extra_pids):
            if alive(pid):
                stop_pid(pid, signal.SIGTERM, 5)
        cls.extra_pids.clear()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_pid(pid, sig=signal.SIGTERM, timeout=10.0, popen=None):
    """Sends `sig` to `pid`, waits up to `timeout` s, then SIGKILLs it. Returns seconds."""
    t0 = time.monotonic()
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return 0.0
    while time.monotonic() - t0 < timeout:
        if popen is not None:
            if popen.poll() is not None:
                return time.monotonic() - t0
        elif not alive(pid):
            return time.monotonic() - t0
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if popen is not None:
        popen.wait(5)
    return time.monotonic() - t0


atexit.register(Tracked.stop_all)


def on_signal(signum, _frame):
    Tracked.stop_all()
    sys.exit(128 + signum)


signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

# --------------------------------------------------------------------------------------
# /proc helpers


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def rss_kib(pid):
    return int(proc_status(pid)["VmRSS"].split()[0])


def hwm_kib(pid):
    return int(proc_status(pid)["VmHWM"].split()[0])


def mem_detail(pid):
    """RssAnon, RssFile (KiB, from status) and Pss (KiB, from smaps_rollup)."""
    st = proc_status(pid)
    out = {"anon_kib": int(st["RssAnon"].split()[0]), "file_kib": int(st["RssFile"].split()[0])}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss_kib"] = int(line.split()[1])
    except OSError:
        out["pss_kib"] = -1
    return out


def ctx_switches(pid):
    """voluntary + nonvoluntary context switches, summed over all threads of `pid`."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = proc_status(f"{pid}/task/{tid}")
        except FileNotFoundError:
            continue
        total += int(st["voluntary_ctxt_switches"]) + int(st["nonvoluntary_ctxt_switches"])
    return total


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def cpu_seconds(pid):
    """utime + stime of all threads of `pid` (not of its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(d))
    return sorted(out)


def idle_wakeups(pid, seconds):
    """Context switches of `pid` per second over `seconds` of doing nothing to it."""
    c0, cpu0 = ctx_switches(pid), cpu_seconds(pid)
    time.sleep(seconds)
    c1, cpu1 = ctx_switches(pid), cpu_seconds(pid)
    return (c1 - c0) / seconds, cpu1 - cpu0


# --------------------------------------------------------------------------------------
# network helpers (loopback only)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(port, path="/"):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64)
            return data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def wait_until(what, timeout, check, every=0.01):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = check()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------------------
# wrk


def wrk_cmd(port, duration, conns, threads=2, path="/"):
    return [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency",
        "-s", STATS_LUA, f"http://127.0.0.1:{port}{path}",
    ]


def wrk_parse(text):
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            r = json.loads(line[len("BENCH_JSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["socket_errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
            r["failed"] = r["socket_errors"] + r["status"]
            return r
    raise RuntimeError(f"no BENCH_JSON line in wrk output:\n{text}")


def wrk_run(port, duration, conns, log_name=None, spread=False):
    """One wrk run; with `spread`, also how the server side of its connections is spread
    over processes (sampled with `ss` half-way through): sorted counts per pid."""
    p = wrk_start(port, duration, conns)
    counts = None
    if spread:
        time.sleep(duration / 2)
        counts = conn_spread(port)
    r = wrk_finish(p, duration, log_name)
    if spread:
        r["spread"] = counts
    return r


def conn_spread(port):
    try:
        out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    per = {}
    for m in re.finditer(r"pid=(\d+)", out):
        per[m.group(1)] = per.get(m.group(1), 0) + 1
    return sorted(per.values(), reverse=True)


def wrk_start(port, duration, conns):
    return Tracked.popen(
        wrk_cmd(port, duration, conns),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wrk_finish(p, duration, log_name=None):
    out, _ = p.communicate(timeout=duration + 60)
    if log_name:
        with open(os.path.join(LOGS, log_name), "w") as f:
            f.write(out)
    return wrk_parse(out)


# --------------------------------------------------------------------------------------
# clusterctl


TS_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+(\w+)\s+(.*)$")


def log_ts(stamp):
    # tracing-subscriber prints UTC with 6 (sometimes up to 9) fractional digits.
    base, frac = stamp.split(".")
    t = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
    return t.timestamp() + float("0." + frac)


class Supervisor:
    """A `clusterctl run` with a private control socket and its log in a file."""

    def __init__(self, name, workers, cmd, port=None, ready="notify", extra=(), env=None,
                 wrap=()):
        self.name = name
        self.workers = workers
        self.port = port if port is not None else free_port()
        self.tmp = tempfile.mkdtemp(prefix=f"clusterctl-bench-{name}-")
        self.control = os.path.join(self.tmp, "control.sock")
        self.log_path = os.path.join(LOGS, f"{name}.log")
        args = [
            CLUSTERCTL, "run", "--log", "stderr",
            "--listen", f"127.0.0.1:{self.port}",
            "--workers", str(workers), "--ready", ready,
            "--stop-timeout", "10s", "--control", self.control, *extra, "--", *cmd,
        ]
        full_env = dict(os.environ)
        for k in ("WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET", "LISTEN_FDS",
                  "LISTEN_PID", "LISTEN_FDNAMES", "JOURNAL_STREAM"):
            full_env.pop(k, None)
        full_env.update(env or {})
        self.logf = open(self.log_path, "w")
        self.t_start = time.time()
        self.proc = Tracked.popen([*wrap, *args], stdout=self.logf, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=full_env)
        self._pid = None if wrap else self.proc.pid

    @property
    def pid(self):
        """The supervisor's pid (not a wrapper's, such as strace)."""
        if self._pid is None:
            line = wait_until("the supervisor's first log line", 30,
                              lambda: self.find(r"supervisor pid (\d+) starting"))
            self._pid = int(line[1].group(1))
        return self._pid

    def lines(self):
        with open(self.log_path, errors="replace") as f:
            for raw in f:
                m = TS_RE.match(raw.rstrip("\n"))
                if m:
                    yield log_ts(m.group(1)), m.group(3)

    def find(self, pattern, after=0.0):
        rx = re.compile(pattern)
        for ts, msg in self.lines():
            if ts >= after:
                m = rx.search(msg)
                if m:
                    return ts, m
        return None

    def wait_ready(self, timeout=120):
        """Seconds from the supervisor's start to its `all N workers ready` line."""
        # The log's own timestamp is used, so polling slowly costs no precision (and
        # leaves the CPU to the supervisor).
        ts, _ = wait_until(f"all {self.workers} workers ready", timeout,
                           lambda: self.find(rf"all {self.workers} workers ready"), every=0.05)
        if self.proc.poll() is not None:
            raise RuntimeError(f"supervisor exited, see {self.log_path}")
        return ts - self.t_start

    def ctl(self, *args, timeout=120):
        t0 = time.monotonic()
        r = subprocess.run([CLUSTERCTL, *args, "--control", self.control], capture_output=True,
                           text=True, timeout=timeout)
        return r, time.monotonic() - t0

    def status(self):
        r, _ = self.ctl("status", "--json")
        if r.returncode != 0:
            raise RuntimeError(f"status failed: {r.stdout}{r.stderr}")
        return json.loads(r.stdout)

    def stop(self, timeout=20):
        secs = stop_pid(self.pid, signal.SIGTERM, timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_pid(self.proc.pid, signal.SIGKILL, 5, popen=self.proc)
        self.logf.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return secs


def reload_timed(sup, wanted):
    """`reload --wait`; then waits (reading the log, not polling the supervisor) until the
    old generation has exited. Times come from the supervisor's log timestamps, relative
    to the moment the client was started:

    - `start`: `reload: starting generation G` (request received, first new worker forked)
    - `serving`: `generation G serving` (every new worker ready, old ones told to drain)
    - `gone`: the last `exited … GENERATION=G-1` line (old generation drained and reaped)
    - `client`: wall time of the `clusterctl reload --wait` process
    """
    t0 = time.time()
    r, client = sup.ctl("reload", "--wait")
    ok = r.returncode == 0
    m = re.search(r"generation (\d+) serving", r.stdout)
    if not ok or not m:
        return {"ok": False, "client": client}
    gen = int(m.group(1))
    start = sup.find(rf"reload: starting generation {gen}\b", t0 - 1)
    serving = sup.find(rf"generation {gen} serving", t0 - 1)

    def old_gone():
        exits = [ts for ts, msg in sup.lines()
                 if ts >= t0 - 1 and " exited " in msg and f"GENERATION={gen - 1} " in msg + " "]
        return max(exits) if len(exits) >= wanted else None

    gone = wait_until("the old generation to exit", 60, old_gone, every=0.01)
    return {"ok": True, "client": client, "start": start[0] - t0,
            "serving": serving[0] - t0, "gone": gone - t0}


# --------------------------------------------------------------------------------------
# formatting


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def ms(us):
    return f"{us / 1000:.2f}"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


class Report:
    def __init__(self):
        self.parts = []
        self.data = {}

    def h(self, text):
        self.emit(f"\n## {text}\n")

    def emit(self, text):
        print(text, flush=True)
        self.parts.append(text)

    def note(self, text):
        print(f"  .. {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# sections


def section_machine(rep):
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"

    with open("/proc/meminfo") as f:
        memtotal = f.readline().split()[1]
    info = {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "memory": f"{int(memtotal) // 1024} MiB",
        "os": ver(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "rustc": ver(["rustc", "--version"]),
        "clusterctl": ver([CLUSTERCTL, "--version"]),
        "wrk": ver(["wrk", "--version"]),
        "gunicorn": ver(["/usr/bin/gunicorn", "--version"]),
        "python (gunicorn)": ver(["/usr/bin/python3", "--version"]),
        "node": ver(["node", "--version"]),
        # `pm2 --version` would start a PM2 daemon: read the installed package instead.
        "pm2": ver(["sh", "-c", "node -p \"require(require('path').join("
                    "require('child_process').execSync('npm root -g').toString().trim(),"
                    "'pm2/package.json')).version\" 2>/dev/null || echo 'not installed'"]),
    }
    rep.data["machine"] = info
    rep.h("Machine")
    rep.emit(table(["what", "value"], [[k, v] for k, v in info.items()]))


def section_datapath(rep, a):
    rep.h("1. Data-path overhead: shared socket under clusterctl vs SO_REUSEPORT")
    rounds, dur, conns = a.rounds, a.duration, 64
    res = {"clusterctl": [], "reuseport": []}
    extra = {"sup_cpu": [], "sup_ctx": []}
    for rnd in range(rounds):
        # A: clusterctl, 2 workers on one inherited socket
        sup = Supervisor(f"datapath-clusterctl-{rnd}", 2, [WORKER])
        sup.wait_ready()
        wrk_run(sup.port, 1, conns)  # warm-up
        c0, cpu0 = ctx_switches(sup.pid), cpu_seconds(sup.pid)
        r = wrk_run(sup.port, dur, conns, f"datapath-clusterctl-{rnd}.wrk", spread=True)
        extra["sup_ctx"].append(ctx_switches(sup.pid) - c0)
        extra["sup_cpu"].append(cpu_seconds(sup.pid) - cpu0)
        sup.stop()
        res["clusterctl"].append(r)
        rep.note(f"round {rnd} clusterctl: {r['rps']:.0f} req/s, failed {r['failed']}")
        # B: the same 2 workers binding the port themselves with SO_REUSEPORT
        port = free_port()
        logf = open(os.path.join(LOGS, f"datapath-reuseport-{rnd}.log"), "w")
        ws = [Tracked.popen([WORKER, "--bind", f"127.0.0.1:{port}", "--reuse-port"],
                            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
              for _ in range(2)]
        wait_until("the reuse-port workers", 30, lambda: http_ok(port, "/health"))
        time.sleep(0.05)  # both bound (a single one can already answer)
        wrk_run(port, 1, conns)
        r = wrk_run(port, dur, conns, f"datapath-reuseport-{rnd}.wrk", spread=True)
        for w in ws:
            stop_pid(w.pid, signal.SIGTERM, 10, popen=w)
        logf.close()
        res["reuseport"].append(r)
        rep.note(f"round {rnd} reuseport: {r['rps']:.0f} req/s, failed {r['failed']}")
    rows = []
    summary = {}
    for name, rs in res.items():
        s = {
            "rps": med([r["rps"] for r in rs]),
            "p50": med([r["p50_us"] for r in rs]),
            "p99": med([r["p99_us"] for r in rs]),
            "failed": sum(r["failed"] for r in rs),
            "rounds": [round(r["rps"]) for r in rs],
            "spread": ["/".join(map(str, r.get("spread") or [])) or "n/a" for r in rs],
        }
        summary[name] = s
        label = ("clusterctl run --workers 2 (one shared socket)" if name == "clusterctl"
                 else "2 × worker --bind --reuse-port")
        rows.append([label, f"{s['rps']:.0f}", ", ".join(map(str, s["rounds"])),
                     ms(s["p50"]), ms(s["p99"]), s["failed"], ", ".join(s["spread"])])
    ratio = summary["clusterctl"]["rps"] / summary["reuseport"]["rps"]
    rows.append(["**ratio clusterctl / reuseport**", f"**{ratio:.3f}**", "",
                 f"{summary['clusterctl']['p50'] / summary['reuseport']['p50']:.2f}",
                 f"{summary['clusterctl']['p99'] / summary['reuseport']['p99']:.2f}", "", ""])
    rep.emit(f"wrk -t2 -c{conns} -d{dur}s, {rounds} alternating rounds (A B A B …), medians; "
             "the example worker in both setups.\n")
    rep.emit(table(["setup", "req/s (median)", "req/s per round", "p50 ms", "p99 ms",
                    "failed", "connections per worker, per round"], rows))
    rep.emit(f"\nSupervisor during the measured load ({dur} s per round): CPU "
             f"{', '.join(f'{c:.2f}' for c in extra['sup_cpu'])} s, context switches "
             f"{', '.join(map(str, extra['sup_ctx']))}.")
    rep.data["datapath"] = {"runs": res, "summary": summary, "ratio": ratio, **extra}


def section_reload(rep, a):
    rep.h("2. Reload under load")
    dur, conns, n_reloads, rounds = a.reload_duration, 50, a.reloads, a.reload_rounds
    sup = Supervisor("reload", 2, [WORKER])
    sup.wait_ready()
    wrk_run(sup.port, 1, conns)
    every = (dur - 4.0) / n_reloads
    steadies, loadeds, results = [], [], []
    for rnd in range(rounds):
        steady = wrk_run(sup.port, dur, conns, f"reload-steady-{rnd}.wrk")
        rep.note(f"steady {rnd}: {steady['rps']:.0f} req/s, failed {steady['failed']}")
        steadies.append(steady)
        p = wrk_start(sup.port, dur, conns)
        t0 = time.monotonic()
        time.sleep(1.5)
        for i in range(n_reloads):
            results.append(reload_timed(sup, 2))
            time.sleep(max(0.0, 1.5 + (i + 1) * every - (time.monotonic() - t0)))
        loaded = wrk_finish(p, dur, f"reload-under-load-{rnd}.wrk")
        loadeds.append(loaded)
        rep.note(f"reloads {rnd}: failed requests {loaded['failed']}")
    gens = sup.status()["supervisor"]["generation"]
    sup.stop()
    ok = sum(1 for r in results if r["ok"])
    good = [r for r in results if r["ok"]]
    rep.emit(f"clusterctl ×2 example workers, wrk -t2 -c{conns} -d{dur}s (closed loop, as fast "
             f"as it goes), {rounds} rounds of: one steady run, one run with {n_reloads} "
             f"`reload --wait` spread over it (one every {every:.2f} s). Final generation "
             f"{gens}.\n")
    rows = []
    runs = [(f"steady state, round {i + 1}", r) for i, r in enumerate(steadies)]
    runs += [(f"{n_reloads} reloads, round {i + 1}", r) for i, r in enumerate(loadeds)]
    runs.sort(key=lambda x: x[0].split(", ")[1])
    for name, r in runs:
        rows.append([name, r["requests"], f"{r['rps']:.0f}",
                     f"{r['connect']}/{r['read']}/{r['write']}/{r['timeout']}", r["status"],
                     f"**{r['failed']}**", ms(r["p50_us"]), ms(r["p99_us"]), ms(r["p999_us"]),
                     ms(r["max_us"])])
    rep.emit(table(["run", "requests", "req/s", "socket errors c/r/w/t", "status ≥ 400",
                    "failed", "p50 ms", "p99 ms", "p99.9 ms", "max ms"], rows))
    rep.emit("")

    def line(label, key):
        xs = [r[key] * 1000 for r in good]
        return [label, f"{med(xs):.1f}", f"{pct(xs, 90):.1f}", f"{max(xs):.1f}"]

    rep.emit(table(
        ["reload timing, ms after the client was started", "median", "p90", "max"],
        [line("supervisor starts generation G (`reload: starting generation G`)", "start"),
         line("every new worker ready, old ones told to drain (`generation G serving`)",
              "serving"),
         line("`clusterctl reload --wait` returned", "client"),
         line("old generation drained and reaped (last `exited` of G-1)", "gone")]))
    rep.emit(f"\nReloads that reported success: {ok}/{len(results)}. Times from the supervisor's "
             "log timestamps; the client's own start-up (fork+exec of `clusterctl`) is "
             "included.")
    rep.data["reload"] = {"steady": steadies, "loaded": loadeds, "ok": ok, "timings": results}


def footprint_one(name, n, kind, idle, env=None):
    if kind == "sleep":
        sup = Supervisor(name, n, ["sleep", "infinity"], ready="exec", env=env)
    else:
        sup = Supervisor(name, n, [WORKER], env=env)
    sup.wait_ready()
    time.sleep(1.0)
    wake, cpu = idle_wakeups(sup.pid, idle)
    out = {"rss_kib": rss_kib(sup.pid), "hwm_kib": hwm_kib(sup.pid), "wakeups": wake,
           "cpu": cpu, "threads": threads(sup.pid), **mem_detail(sup.pid)}
    if kind == "worker":
        w = sup.status()["workers"][0]["pid"]
        out["worker_rss_kib"] = rss_kib(w)
    else:
        out["worker_rss_kib"] = rss_kib(children(sup.pid)[0])
    sup.stop()
    return out


def section_footprint(rep, a):
    rep.h("3. Footprint: supervisor RSS and idle wakeups")
    idle = a.idle
    cases = [
        ("4 × `sleep infinity` (`--ready exec`)", 4, "sleep", None),
        ("256 × `sleep infinity` (`--ready exec`)", 256, "sleep", None),
        ("4 × example worker (notify)", 4, "worker", None),
        ("256 × example worker (notify)", 256, "worker", None),
        ("4 × `sleep infinity`, WATCHDOG_USEC=1s (pings every 0.5 s)", 4, "sleep",
         {"WATCHDOG_USEC": "1000000"}),
    ]
    rows, data = [], []
    for label, n, kind, env in cases:
        r = footprint_one(f"footprint-{kind}-{n}{'-wd' if env else ''}", n, kind, idle, env)
        rep.note(f"{label}: {r}")
        data.append({"case": label, **r})
        rows.append([label, f"{r['rss_kib'] / 1024:.2f}", f"{r['hwm_kib'] / 1024:.2f}",
                     f"{r['anon_kib'] / 1024:.2f}", f"{r['file_kib'] / 1024:.2f}",
                     f"{r['pss_kib'] / 1024:.2f}", f"{r['worker_rss_kib'] / 1024:.2f}",
                     f"{r['wakeups']:.1f}", f"{r['cpu']:.2f}", r["threads"]])
    rep.emit(f"Supervisor process only (workers not counted). Wakeups = voluntary + "
             f"nonvoluntary context switches of all its threads over {idle:.0f} s idle, per "
             "second.\n")
    rep.emit(table(["workers", "VmRSS MiB", "VmHWM MiB", "RssAnon MiB", "RssFile MiB",
                    "Pss MiB", "one worker's VmRSS MiB", "idle wakeups/s",
                    f"CPU s in {idle:.0f} s", "threads"], rows))
    rep.data["footprint"] = data


def section_scale(rep, a):
    rep.h("4. Scale: start-up and respawn")
    sizes = [1, 16, 64, 256]
    kinds = ("sleep", "worker")
    runs = {(k, n): {"ready_ms": [], "first_spawn_ms": [], "stop_ms": [], "sup_cpu_ms": []}
            for k in kinds for n in sizes}
    # Interleaved (every configuration once per round), so that slow phases of the machine
    # hit every configuration alike.
    for rep_i in range(a.scale_reps):
        for kind in kinds:
            for n in sizes:
                name = f"scale-{kind}-{n}-{rep_i}"
                if kind == "sleep":
                    sup = Supervisor(name, n, ["sleep", "infinity"], ready="exec")
                else:
                    sup = Supervisor(name, n, [WORKER])
                d = runs[(kind, n)]
                d["ready_ms"].append(sup.wait_ready() * 1000)
                first = sup.find(r"worker 0 started")
                d["first_spawn_ms"].append((first[0] - sup.t_start) * 1000)
                d["sup_cpu_ms"].append(cpu_seconds(sup.pid) * 1000)
                d["stop_ms"].append(sup.stop() * 1000)
    rows, data = [], []
    for (kind, n), d in runs.items():
        data.append({"kind": kind, "n": n, **d})
        label = ("`sleep infinity`, `--ready exec`" if kind == "sleep"
                 else "example worker, `--ready notify`")
        r, f = med(d["ready_ms"]), med(d["first_spawn_ms"])
        rows.append([label, n, f"{f:.1f}", f"{r:.1f}",
                     ", ".join(f"{x:.0f}" for x in d["ready_ms"]),
                     f"{(r - f) / max(1, n - 1):.3f}" if n > 1 else "–",
                     f"{med(d['sup_cpu_ms']):.0f}", f"{med(d['stop_ms']):.1f}"])
        rep.note(f"{kind} N={n}: ready {d['ready_ms']}, stop {d['stop_ms']}")
    rep.emit(f"{a.scale_reps} interleaved rounds, medians. *first spawn*: supervisor exec → "
             "`worker 0 started`; *all ready*: supervisor exec → `all N workers ready` (log "
             "timestamps); *ms per extra worker*: (all ready − first spawn) / (N − 1); "
             "*supervisor CPU*: its utime+stime at that point (10 ms ticks); *stop*: SIGTERM → "
             "supervisor exited (all workers reaped).\n")
    rep.emit(table(["worker", "N", "first spawn ms", "all ready ms", "rounds ms",
                    "ms per extra worker", "supervisor CPU ms", "stop ms"], rows))
    rep.data["scale"] = data

    # respawn latency
    rows, rdata = [], []
    for n in (4, 256):
        sup = Supervisor(f"respawn-{n}", n, [WORKER], extra=["--restart-delay", "0..1ms"])
        sup.wait_ready()
        lat_exit, lat_start, lat_ready = [], [], []
        for i in range(a.kills):
            st = sup.status()
            w = st["workers"][i % n]
            slot, pid = w["slot"], w["pid"]
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            exited = wait_until(
                "the exit", 10,
                lambda s=slot: sup.find(rf"worker {s} exited unexpectedly", t_kill))
            started = wait_until(
                "the replacement", 10,
                lambda s=slot, p=pid: sup.find(rf"worker {s} started \(pid (?!{p}\b)\d+", t_kill))
            ready = wait_until(
                "the replacement ready", 10,
                lambda s=slot: sup.find(rf"worker {s} ready after", started[0]))
            lat_exit.append((exited[0] - t_kill) * 1000)
            lat_start.append((started[0] - t_kill) * 1000)
            lat_ready.append((ready[0] - t_kill) * 1000)
            time.sleep(0.2)
        sup.stop()
        rdata.append({"n": n, "exit_ms": lat_exit, "start_ms": lat_start,
                      "ready_ms": lat_ready})
        rows.append([n, a.kills, f"{med(lat_exit):.2f}", f"{med(lat_start):.2f}",
                     f"{max(lat_start):.2f}", f"{med(lat_ready):.2f}", f"{max(lat_ready):.2f}"])
    rep.emit("\nRespawn latency (`--restart-delay 0..1ms`, example worker): SIGKILL of one worker "
             "→ `worker S exited unexpectedly` (reaped) → `worker S started (pid …)` "
             "(fork+exec of the replacement done) → its `ready` line.\n")
    rep.emit(table(["N", "kills", "→ exit seen, median ms", "→ started, median ms", "max ms",
                    "→ ready, median ms", "max ms"], rows))
    rep.data["respawn"] = rdata

    section_control_probe(rep, a)
    section_spawn_floor(rep, a)
    if a.profile:
        section_profile(rep)


def control_request(sup, line):
    """One request on the control socket, spoken directly (no client process); seconds."""
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(sup.control)
        c.sendall(line.encode() + b"\n")
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"ok "), data[:200]
    return time.monotonic() - t0


def respawn_once(sup, slot, pid):
    """SIGKILLs `pid` (slot `slot`); ms until the supervisor logs the replacement started."""
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    started = wait_until(
        "the replacement", 300,
        lambda: sup.find(rf"worker {slot} started \(pid (?!{pid}\b)\d+", t_kill))
    return (started[0] - t_kill) * 1000


def section_control_probe(rep, a):
    """The control socket is served inside the single-threaded event loop: what a slow
    control client costs everything else (respawns, reloads, notify), and what a status
    request costs with many workers."""
    rows = []
    data = {}
    for n in (4, 256):
        sup = Supervisor(f"status-{n}", n, ["sleep", "infinity"], ready="exec")
        sup.wait_ready()
        xs = [control_request(sup, "status --json") * 1000 for _ in range(20)]
        data[f"status_ms_{n}"] = xs
        rows.append([f"`status --json` answered, N={n} (direct socket client)",
                     f"{med(xs):.2f}", f"{max(xs):.2f}"])
        sup.stop()
    sup = Supervisor("control-probe", 4, ["sleep", "infinity"], ready="exec",
                     extra=["--restart-delay", "0..1ms"])
    sup.wait_ready()

    def slot_pid(i):
        w = sup.status()["workers"][i]
        return w["slot"], w["pid"]

    base = [respawn_once(sup, *slot_pid(i % 4)) for i in range(5)]
    rows.append(["respawn (SIGKILL → replacement started), no control client",
                 f"{med(base):.2f}", f"{max(base):.2f}"])
    silent = []
    for i in range(3):
        slot, pid = slot_pid(i)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(sup.control)
            time.sleep(0.05)  # the supervisor has accepted it and waits for a line
            silent.append(respawn_once(sup, slot, pid))
        time.sleep(0.6)
    rows.append(["respawn while one control client is connected and silent",
                 f"{med(silent):.2f}", f"{max(silent):.2f}"])
    slot, pid = slot_pid(0)
    trickle_for = a.trickle
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(sup.control)
        t_end = time.monotonic() + trickle_for
        time.sleep(0.05)
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        while time.monotonic() < t_end:
            c.sendall(b"x")  # one byte every 0.4 s: each read() of it resets the timeout
            time.sleep(0.4)
    started = wait_until("the replacement", 300, lambda: sup.find(
        rf"worker {slot} started \(pid (?!{pid}\b)\d+", t_kill))
    trickle = (started[0] - t_kill) * 1000
    rows.append([f"respawn while one control client sends a byte every 0.4 s (for "
                 f"{trickle_for:.0f} s, no newline)", f"{trickle:.0f}", f"{trickle:.0f}"])
    sup.stop()
    stalled = log_sink_probe()
    rows.append(["respawn while the supervisor's stderr is a full pipe (reader stalled; "
                 "waited 3 s)", stalled["frozen"], stalled["frozen"]])
    rows.append(["… respawn once the pipe is read again", f"{stalled['after_ms']:.0f}",
                 f"{stalled['after_ms']:.0f}"])
    data.update({"respawn_ms": base, "respawn_silent_ms": silent,
                 "respawn_trickle_ms": trickle, "log_sink": stalled})
    rep.emit("\nThe control socket is served, and the log written, inside the supervisor's "
             "only thread: what a status request costs, and what a slow control client or a "
             "stalled log reader costs everything else (4 × `sleep infinity`, "
             "`--restart-delay 0..1ms`; the log probe 16 workers).\n")
    rep.emit(table(["probe", "median ms", "max ms"], rows))
    rep.data["control_probe"] = data


def log_sink_probe(n=16, wait=3.0):
    """The supervisor logs synchronously from its only thread: with its stderr a pipe that
    nobody reads (a stalled log reader), does it still reap and respawn?"""
    tmp = tempfile.mkdtemp(prefix="clusterctl-bench-sink-")
    control = os.path.join(tmp, "control.sock")
    p = Tracked.popen([CLUSTERCTL, "run", "--log", "stderr", "--listen",
                       f"127.0.0.1:{free_port()}", "--workers", str(n), "--ready", "exec",
                       "--restart-delay", "0..1ms", "--stop-timeout", "5s", "--control", control,
                       "--", "sleep", "infinity"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      stdin=subprocess.DEVNULL)
    wait_until("the workers", 30, lambda: len(children(p.pid)) == n)
    # SIGUSR1 writes the status table to the log: enough of them fill the 64 KiB pipe.
    for _ in range(40):
        os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.02)
    time.sleep(0.3)
    victim = children(p.pid)[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        kids = children(p.pid)
        return victim not in kids and len(kids) == n

    t0 = time.monotonic()
    frozen = "no"
    try:
        wait_until("a respawn", wait, replaced)
        frozen = f"respawned after {(time.monotonic() - t0) * 1000:.0f} ms"
    except TimeoutError:
        frozen = f"**none within {wait:.0f} s** (worker left a zombie)"
    os.set_blocking(p.stderr.fileno(), False)
    t1 = time.monotonic()

    def drain_and_check():
        try:
            p.stderr.read()
        except (OSError, TypeError):
            pass
        return replaced()

    wait_until("a respawn after the pipe is read", 30, drain_and_check)
    after = (time.monotonic() - t1) * 1000
    os.kill(p.pid, signal.SIGTERM)
    t2 = time.monotonic()
    while p.poll() is None and time.monotonic() - t2 < 15:
        drain_and_check()
        time.sleep(0.02)
    if p.poll() is None:
        stop_pid(p.pid, signal.SIGKILL, 5, popen=p)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"frozen": frozen, "after_ms": after}


def section_spawn_floor(rep, a):
    """What fork+exec costs on this machine without clusterctl (bench/spawn_cost.c)."""
    exe = os.path.join(OUT, "spawn_cost")
    if not os.access(exe, os.X_OK):
        rep.emit("\n(no C compiler: spawn floor not measured)")
        return
    sleep = shutil.which("sleep")
    n = 256
    res = {"clusterctl": [], "fork": [], "fork-overlap": [], "spawn": []}
    for i in range(a.scale_reps):
        sup = Supervisor(f"floor-clusterctl-{i}", n, [sleep, "infinity"], ready="exec")
        res["clusterctl"].append(sup.wait_ready() * 1000)
        sup.stop()
        for mode in ("fork", "fork-overlap", "spawn"):
            out = subprocess.run([exe, mode, str(n), "--", sleep, "infinity"],
                                 capture_output=True, text=True, timeout=120, check=True)
            res[mode].append(float(out.stdout.split()[2]))
    labels = {
        "clusterctl": "clusterctl run, `--ready exec` (exec → `all 256 workers ready`)",
        "fork": "C: fork + wait for exec on a CLOEXEC pipe, one by one (clusterctl's method)",
        "fork-overlap": "C: fork all, then wait for all execs (execs overlap on other CPUs)",
        "spawn": "C: posix_spawn one by one (vfork-style, no address-space copy)",
    }
    rows = [[labels[k], f"{med(v):.0f}", f"{med(v) * 1000 / n:.0f}",
             ", ".join(f"{x:.0f}" for x in v)] for k, v in res.items()]
    rep.emit(f"\nThe floor: starting {n} × `{sleep} infinity` without clusterctl "
             f"(bench/spawn_cost.c), {a.scale_reps} alternating rounds, median.\n")
    rep.emit(table(["method", "total ms", "µs per child", "rounds ms"], rows))
    rep.data["spawn_floor"] = res


def section_profile(rep):
    """Where the time goes at N=256: strace -c (syscalls of the supervisor only)."""
    if not shutil.which("strace"):
        rep.emit("\n(strace not installed: no syscall profile)")
        return
    out = os.path.join(LOGS, "strace-256.txt")
    sup = Supervisor("strace-256", 256, ["sleep", "infinity"], ready="exec",
                     wrap=["strace", "-c", "-o", out, "--"])
    sup.wait_ready()
    sup.stop()
    sup.proc.wait(30)
    with open(out) as f:
        text = f.read()
    lines = [l for l in text.splitlines() if re.match(r"\s*\d", l)]
    top = []
    for l in lines[:12]:
        parts = l.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        top.append([parts[-1], parts[3], parts[0], parts[1]])
    rep.emit("\nSyscalls of the supervisor process itself (not its children), `strace -c`, "
             "start of 256 × `sleep infinity` until all ready, then stop:\n")
    rep.emit(table(["syscall", "calls", "% time", "seconds"], top))
    rep.data["strace_256"] = text


# --------------------------------------------------------------------------------------
# peers


def master_idle(pid, idle):
    time.sleep(1.0)
    wake, cpu = idle_wakeups(pid, idle)
    return {"rss_kib": rss_kib(pid), "wakeups": wake, "idle_cpu": cpu, "threads": threads(pid)}


def reload_load_run(port, n_reloads, do_reload, master_pid, dur, conns):
    p = wrk_start(port, dur, conns)
    t0 = time.monotonic()
    cpu0 = cpu_seconds(master_pid)
    time.sleep(1.5)
    every = (dur - 4.0) / n_reloads
    times, oks = [], 0
    for i in range(n_reloads):
        ok, secs = do_reload()
        oks += ok
        times.append(secs * 1000)
        time.sleep(max(0.0, 1.5 + (i + 1) * every - (time.monotonic() - t0)))
    r = wrk_finish(p, dur)
    r["master_cpu"] = cpu_seconds(master_pid) - cpu0
    r["reload_ms"] = times
    r["reloads_ok"] = oks
    return r


def peer_clusterctl(a, port):
    sup = Supervisor("peer-clusterctl", 2, [WORKER], port=port)
    sup.wait_ready()
    idle = master_idle(sup.pid, a.idle)

    def do_reload():
        r = reload_timed(sup, 2)
        return r["ok"], r.get("gone", float("nan"))

    load = reload_load_run(port, a.peer_reloads, do_reload, sup.pid, a.peer_duration, 50)
    sup.stop()
    return {"idle": idle, "load": load}


def peer_gunicorn(a, port):
    logf = open(os.path.join(LOGS, "peer-gunicorn.log"), "w")
    p = Tracked.popen(
        ["/usr/bin/gunicorn", "--workers", "2", "--worker-class", "sync",
         "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "10",
         "--chdir", os.path.join(BENCH, "apps"), "wsgi_app:app"],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    master = p.pid
    wait_until("gunicorn", 30, lambda: http_ok(port) and len(children(master)) == 2)
    idle = master_idle(master, a.idle)

    def do_reload():
        old = set(children(master))
        t0 = time.monotonic()
        os.kill(master, signal.SIGHUP)

        def done():
            kids = set(children(master))
            return len(kids) == 2 and not (kids & old)

        try:
            wait_until("gunicorn's reload", 60, done, every=0.002)
        except TimeoutError:
            return False, time.monotonic() - t0
        return True, time.monotonic() - t0

    load = reload_load_run(port, a.peer_reloads, do_reload, master, a.peer_duration, 50)
    kids = children(master)
    stop_pid(master, signal.SIGTERM, 20, popen=p)
    for k in kids:
        if alive(k):
            stop_pid(k, signal.SIGKILL, 5)
    logf.close()
    return {"idle": idle, "load": load}


def peer_pm2(a, port):
    home = tempfile.mkdtemp(prefix="clusterctl-bench-pm2-")
    env = dict(os.environ, PM2_HOME=home, PORT=str(port))

    def pm2(*args, timeout=120):
        return subprocess.run(["pm2", *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    def kill_pm2():
        pm2("kill", timeout=60)
        shutil.rmtree(home, ignore_errors=True)

    Tracked.cleanups.append(kill_pm2)
    r = pm2("start", os.path.join(BENCH, "apps/node_app.js"), "-i", "2", "--name", "bench")
    with open(os.path.join(LOGS, "peer-pm2-start.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    with open(os.path.join(home, "pm2.pid")) as f:
        daemon = int(f.read().strip())
    Tracked.extra_pids.add(daemon)

    def app_pids():
        procs = []
        for line in pm2("jlist").stdout.splitlines():
            if line.startswith("[{") or line.strip() == "[]":
                procs = json.loads(line)
        return [x["pid"] for x in procs if x.get("pm2_env", {}).get("status") == "online"]

    wait_until("pm2 apps", 60, lambda: http_ok(port) and len(app_pids()) == 2, every=0.1)
    for pid in app_pids():
        Tracked.extra_pids.add(pid)
    idle = master_idle(daemon, a.idle)

    def do_reload():
        t0 = time.monotonic()
        r = pm2("reload", "bench")
        secs = time.monotonic() - t0
        for pid in children(daemon):
            Tracked.extra_pids.add(pid)
        return r.returncode == 0, secs

    load = reload_load_run(port, a.peer_reloads, do_reload, daemon, a.peer_duration, 50)
    kill_pm2()
    Tracked.cleanups.remove(kill_pm2)
    return {"idle": idle, "load": load}


def section_peers(rep, a):
    rep.h("5. Peers: clusterctl vs gunicorn vs PM2 cluster mode")
    results = {}
    for name, fn in (("clusterctl", peer_clusterctl), ("gunicorn", peer_gunicorn),
                     ("pm2", peer_pm2)):
        if name == "pm2" and not shutil.which("pm2"):
            rep.note("pm2 not installed, skipped")
            continue
        if name == "gunicorn" and not os.path.exists("/usr/bin/gunicorn"):
            rep.note("gunicorn not installed, skipped")
            continue
        results[name] = fn(a, free_port())
        rep.note(f"{name}: {results[name]}")
    labels = {
        "clusterctl": "clusterctl ×2 example worker (Rust), `reload --wait`",
        "gunicorn": "gunicorn ×2 sync workers (Python WSGI), `kill -HUP` master",
        "pm2": "PM2 cluster mode ×2 (node http), `pm2 reload`",
    }
    rows = []
    for name, r in results.items():
        i, l = r["idle"], r["load"]
        rows.append([labels[name], f"{i['rss_kib'] / 1024:.1f}", f"{i['wakeups']:.1f}",
                     i["threads"], f"{l['rps']:.0f}",
                     f"{l['master_cpu']:.2f}",
                     f"{l['reloads_ok']}/{len(l['reload_ms'])}",
                     f"**{l['failed']}** ({l['socket_errors']} socket, {l['status']} status)",
                     ms(l["p99_us"]), ms(l["max_us"]), f"{med(l['reload_ms']):.0f}"])
    rep.emit(f"Master = clusterctl's supervisor, gunicorn's arbiter, PM2's God daemon. Idle "
             f"figures over {a.idle:.0f} s; then wrk -t2 -c50 -d{a.peer_duration}s with "
             f"{a.peer_reloads} reloads spread over the run. *reload ms*: until the old "
             "workers are gone (clusterctl: last `exited` of the old generation in its log; "
             "gunicorn: both children replaced by new pids; PM2: `pm2 reload` returned, which "
             "is after its last old instance stopped).\n")
    rep.emit(table(["setup", "master RSS MiB", "master idle wakeups/s", "master threads",
                    "req/s (during reloads)", "master CPU s under load",
                    "reloads ok", "failed requests", "p99 ms", "max ms", "reload ms (median)"],
                   rows))
    rep.data["peers"] = results


# --------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="1,2,3,4,5", help="sections to run, e.g. 1,3")
    ap.add_argument("--quick", action="store_true", help="short runs, to try the scripts")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the strace syscall profile in section 4")
    a = ap.parse_args()
    a.rounds, a.duration = 5, 10
    a.reload_duration, a.reloads, a.reload_rounds = 30, 20, 2
    a.idle = 10.0
    a.scale_reps, a.kills = 3, 10
    a.peer_duration, a.peer_reloads = 16, 5
    a.trickle = 5.0
    if a.quick:
        a.rounds, a.duration = 1, 3
        a.reload_duration, a.reloads, a.reload_rounds = 10, 5, 1
        a.idle = 2.0
        a.scale_reps, a.kills = 1, 3
        a.peer_duration, a.peer_reloads = 8, 2
        a.trickle = 2.0
    for exe in (CLUSTERCTL, WORKER):
        if not os.access(exe, os.X_OK):
            sys.exit(f"{exe} is missing: run bash bench/run.sh (it builds it)")
    os.makedirs(LOGS, exist_ok=True)
    only = {int(x) for x in a.only.split(",") if x}
    rep = Report()
    started = time.time()
    rep.emit(f"# clusterctl benchmark run, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    section_machine(rep)
    sections = {1: section_datapath, 2: section_reload, 3: section_footprint,
                4: section_scale, 5: section_peers}
    for k in sorted(only):
        sections[k](rep, a)
    rep.emit(f"\n_Total benchmark time: {time.time() - started:.0f} s._")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(OUT, f"results-{stamp}.json"), "w") as f:
        json.dump(rep.data, f, indent=1, default=str)
    with open(os.path.join(OUT, f"report-{stamp}.md"), "w") as f:
        f.write("\n".join(rep.parts) + "\n")
    print(f"\n(raw results: target/bench/results-{stamp}.json, logs: target/bench/logs/)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
