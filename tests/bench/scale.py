#!/usr/bin/env python3
"""Scale benchmark: what the agent costs per probe with 2 to 250 uplinks, in the netns lab.

For each N in --uplinks it builds a lab (tests/lab.py) with fibre, lte and N-2 extra
uplinks through isp1 (Lab.add_extra_uplinks), puts a third probe target on inet's
loopback (198.18.1.3, beside the lab's 198.18.1.1 and .2), and runs the agent in the
router namespace with every uplink probing the 3 targets by ICMP every 500 ms (timeout
1 s, fall 3, rise 3, gateway_check on unless --no-gateway-check). Once every uplink is
up and its quality window full (the steady state), it measures over --seconds:

  cpu      the agent's utime+stime (/proc/PID/stat, all threads) as % of one core,
           split into the event loop thread and the others (the netlink worker, ...),
           VmRSS, and the CPU per probe sent (configured: N x 3 targets x 2/s; a
           healthy uplink pings its gateway only until it has answered once, and
           around failures, with gateway_check); an agent that never settles
           is measured as it is and flagged NOT SETTLED
  rate     echo requests counted where they arrive: a raw ICMP socket in inet (the
           targets) and in isp1/isp2 (the gateways), against the configured rate
  jitter   per (uplink, target) stream, how far each request's inter-arrival time
           (kernel receive timestamps in inet) deviates from the interval: p50/p99/max
  spread   how far apart one uplink's requests of one round arrive (first to last)

In every lab (`ping -I` reads every interface's addresses, so it costs more with more
uplinks): the CPU of 200 forked `ping -c1 -W1 -I wan0 TARGET` (children's CPU from
os.wait4) and of as many bare icmplib send+receive on a raw socket, both from a driver
in the router namespace while the agent runs; and the ratio of the agent's CPU per
probe to that forked ping's (the bar: the agent at least 10x cheaper).

At each N of --fault-at: a silent drop in isp1's forward path of fibre's traffic only
(`iifname "cpe"`, so the extra uplinks through isp1 stay healthy), timed from the
fault to the route event that points the default table at lte, beside the bound
fall x interval + timeout.

--profile-at N records the agent with py-spy --gil (--py-spy FILE, raw folded stacks)
during a second window of the same length, and prints each thread's share and the event
loop's top functions by self and cumulative share. --agent runs another copy of
multiwan_agent.py (e.g. a snapshot); --verbose passes -v (a log line per round) as
tests/agent_proc.py does; by default the agent runs as in production, without it.

Needs root; never touches the root namespace; every packet goes to a documentation
address (198.18.0.0/15, 203.0.113.0/24).

    sudo .venv/bin/python tests/bench/scale.py [--uplinks 2,16,64,250] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AGENT, AgentProcess  # noqa: E402
from lab import ISPS, Lab, RouteEvent, probe_targets  # noqa: E402

# Constants ###################################################################

#: The probe schedule every uplink runs by.
INTERVAL_S: Final = 0.5
TIMEOUT_S: Final = 1.0
FALL: Final = 3
RISE: Final = 3
#: Short, so that fibre is selected again soon after each fault run.
HYSTERESIS_S: Final = 1.0
#: The agent's quality window (rounds): the steady state has it full.
WINDOW_ROUNDS: Final = 20
#: The selection table; the uplinks' tables follow it (1001, 1002, ...), clear of the
#: reserved 252-255 that the agent's default (200) would reach at the 52nd uplink.
DEFAULT_TABLE: Final = 1000
#: The third probe target, added on inet's loopback (inside 198.18.0.0/15).
THIRD_TARGET: Final = "198.18.1.3"
TARGETS: Final = (*probe_targets(4), THIRD_TARGET)
#: The lab caps extra uplinks at 254; with fibre and lte that is 256.
MAX_LAB_UPLINKS: Final = 256
#: Forked pings and icmplib round trips measured once per run.
PING_FORKS: Final = 200
#: Polling step of every condition wait (each one also has a deadline).
POLL_S: Final = 0.01
#: How long a receiver may take to open its socket.
READY_TIMEOUT_S: Final = 10.0
#: How long the agent gets to stop after SIGTERM.
STOP_TIMEOUT_S: Final = 30.0
#: py-spy's sampling rate (Hz).
PY_SPY_RATE: Final = 500
#: Functions listed from a profile.
PROFILE_TOP: Final = 25
#: Linux socket options the socket module of Python 3.11 does not name (asm-generic values).
SO_RCVBUFFORCE: Final = 33
SO_TIMESTAMPNS: Final = 35
SO_RXQ_OVFL: Final = 40

#: Records every ICMP echo request that reaches this namespace: (src, dst, id, seq,
#: kernel receive time [CLOCK_REALTIME, only for differences], CLOCK_MONOTONIC at read).
#: argv: output file, longest run (s). Writes the file at SIGTERM or at the deadline.
RECEIVER: Final = f"""\
import json, select, signal, socket, struct, sys, time
out, longest = sys.argv[1], float(sys.argv[2])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, {SO_RCVBUFFORCE}, 16 << 20)
s.setsockopt(socket.SOL_SOCKET, {SO_TIMESTAMPNS}, 1)
s.setsockopt(socket.SOL_SOCKET, {SO_RXQ_OVFL}, 1)
s.setblocking(False)
rows, dropped = [], 0
print("ready", flush=True)
deadline = time.monotonic() + longest
while not stop and time.monotonic() < deadline:
    try:
        readable, _, _ = select.select([s], [], [], 0.2)
    except InterruptedError:
        continue
    for _ in range(4096 if readable else 0):
        try:
            data, ancillary, _, _ = s.recvmsg(2048, 256)
        except (BlockingIOError, InterruptedError):
            break
        mono = time.monotonic()
        ihl = (data[0] & 15) * 4
        if len(data) < ihl + 8 or data[ihl] != 8:
            continue
        kernel = None
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == {SO_TIMESTAMPNS} and len(cdata) >= 16:
                sec, nsec = struct.unpack_from("qq", cdata)
                kernel = sec + nsec * 1e-9
            elif level == socket.SOL_SOCKET and kind == {SO_RXQ_OVFL} and len(cdata) >= 4:
                dropped = struct.unpack_from("I", cdata)[0]
        ident, seq = struct.unpack_from("!HH", data, ihl + 4)
        rows.append((socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]), ident, seq,
                     kernel, mono))
with open(out, "w") as f:
    json.dump({{"rows": rows, "dropped": dropped}}, f)
"""

#: Forks `ping -c1 -W1 -I DEV TARGET` COUNT times, one after the other; the children's
#: CPU from wait4, the driver's own from getrusage. argv: count, dev, target.
PING_DRIVER: Final = """\
import json, os, resource, shutil, sys, time
count, dev, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ping = shutil.which("ping")
devnull = [(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)]
children, answered, walls = 0.0, 0, []
before = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(count):
    began = time.perf_counter()
    pid = os.posix_spawn(ping, [ping, "-c1", "-W1", "-I", dev, target], os.environ, file_actions=devnull)
    _, status, usage = os.wait4(pid, 0)
    walls.append(time.perf_counter() - began)
    children += usage.ru_utime + usage.ru_stime
    answered += os.waitstatus_to_exitcode(status) == 0
after = resource.getrusage(resource.RUSAGE_SELF)
own = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
print(json.dumps({"count": count, "answered": answered, "children_cpu_s": children,
                  "driver_cpu_s": own, "wall_s": sum(walls)}))
"""

#: The floor: icmplib's own send + receive on one raw socket bound to DEV, COUNT times.
#: argv: count, dev, source, target.
ICMPLIB_DRIVER: Final = """\
import json, socket, sys, time
from icmplib import ICMPRequest, ICMPv4Socket
count, dev, source, target = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sock = ICMPv4Socket(address=source, privileged=True)
sock._sock.setsockopt(socket.SOL_SOCKET, 25, dev.encode())
answered = 0
began = time.process_time()
for seq in range(count):
    request = ICMPRequest(destination=target, id=0x5ca1, sequence=seq, payload_size=24)
    sock.send(request)
    try:
        sock.receive(request, timeout=1)
        answered += 1
    except Exception:
        pass
cpu = time.process_time() - began
print(json.dumps({"count": count, "answered": answered, "cpu_s": cpu}))
"""

#: Runs the agent file given first, with -v taken out unless the second argument is "1";
#: exec keeps the PID (ip netns exec -> this -> the agent), so /proc/PID is the agent's.
LAUNCHER: Final = """\
import os, sys
agent, verbose, *args = sys.argv[1:]
if verbose != "1":
    args = [a for a in args if a != "-v"]
os.execv(sys.executable, [sys.executable, agent, *args])
"""

# Lab and agent ###############################################################


def config_text(state_dir: Path, extra: Sequence[tuple[str, str, str]], gateway_check: bool) -> str:
    """fibre (priority 1), lte (2) and the extra uplinks (3, 4, ...), one [check] for all."""
    targets = ", ".join(f'"{t}"' for t in TARGETS)
    text = (
        f'[agent]\nstate_dir = "{state_dir}"\nhysteresis = "{HYSTERESIS_S:g}s"\n'
        f"default_table = {DEFAULT_TABLE}\n\n"
        f'[check]\ntargets = [{targets}]\ninterval = "{INTERVAL_S * 1000:g}ms"\n'
        f'timeout = "{TIMEOUT_S:g}s"\nfall = {FALL}\nrise = {RISE}\nwindow = {WINDOW_ROUNDS}\n'
        f"gateway_check = {'true' if gateway_check else 'false'}\n\n"
        '[[uplink]]\nname = "fibre"\ninterface = "wan0"\ngateway = "auto"\npriority = 1\n\n'
        '[[uplink]]\nname = "lte"\ninterface = "wan1"\ngateway = "auto"\npriority = 2\n'
    )
    for i, (dev, _, _) in enumerate(extra):
        text += f'\n[[uplink]]\nname = "u{i + 2}"\ninterface = "{dev}"\npriority = {3 + i}\n'
    return text


def start_agent(lab: Lab, workdir: Path, config: str, agent_file: Path, verbose: bool) -> AgentProcess:
    launcher = workdir / "launch.py"
    launcher.write_text(LAUNCHER)
    program = (sys.executable, str(launcher), str(agent_file), "1" if verbose else "0")
    return AgentProcess(lab, workdir, config, program=program)


def all_up_and_full(status: dict[str, Any], count: int) -> bool:
    uplinks = status.get("uplinks", {})
    return (
        status.get("selected") == "fibre"
        and len(uplinks) == count
        and all(u["state"] == "up" and u["window_rounds"] >= WINDOW_ROUNDS for u in uplinks.values())
    )


def health_summary(status: dict[str, Any]) -> dict[str, Any]:
    """What the agent thinks of its uplinks: states, the selection, and the RTTs it measures
    (the lab's real RTT is well under 1 ms: more is the agent's own lateness in reading replies)."""
    uplinks = status.get("uplinks", {})
    rtts = [u["median_rtt_ms"] for u in uplinks.values() if u.get("median_rtt_ms") is not None]
    return {
        "selected": status.get("selected"),
        "states": dict(Counter(u["state"] for u in uplinks.values())),
        "median_rtt_ms": statistics.median(rtts) if rtts else None,
        "max_rtt_ms": max(rtts) if rtts else None,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Receiver:
    """RECEIVER in one namespace, from start() until stop()."""

    def __init__(self, lab: Lab, role: str, workdir: Path, longest_s: float) -> None:
        self.out = workdir / f"requests-{role}.json"
        self.role = role
        self.proc = lab.popen(
            role,
            [sys.executable, "-c", RECEIVER, str(self.out), str(longest_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = ""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if sel.select(timeout=READY_TIMEOUT_S):  # it prints "ready" first, or exits
                line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"receiver in {role} did not start (rc={self.proc.poll()})")

    def stop(self) -> tuple[list[tuple[Any, ...]], int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        data = json.loads(self.out.read_text())
        return [tuple(r) for r in data["rows"]], int(data["dropped"])


# Analysis ####################################################################


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def stream_figures(rows: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """Inter-arrival deviation from the interval per (source, destination) stream, pooled."""
    streams: dict[tuple[str, str], list[float]] = defaultdict(list)
    for src, dst, _ident, _seq, kernel, mono in rows:
        streams[(src, dst)].append(kernel if kernel is not None else mono)
    deviations: list[float] = []
    missed = bursts = 0
    for times in streams.values():
        times.sort()
        for a, b in zip(times, times[1:], strict=False):
            gap = b - a
            deviations.append(abs(gap - INTERVAL_S))
            missed += gap > 1.5 * INTERVAL_S
            bursts += gap < 0.5 * INTERVAL_S
    if not deviations:
        return {"streams": len(streams), "gaps": 0}
    return {
        "streams": len(streams),
        "gaps": len(deviations),
        "p50_ms": percentile(deviations, 0.5) * 1000,
        "p99_ms": percentile(deviations, 0.99) * 1000,
        "max_ms": max(deviations) * 1000,
        "missed_rounds": missed,
        "bursts": bursts,
    }


def round_spread(rows: Sequence[tuple[Any, ...]]) -> dict[str, float]:
    """First-to-last arrival of one uplink's requests of one round (same source and seq)."""
    rounds: dict[tuple[str, int], list[float]] = defaultdict(list)
    for src, _dst, _ident, seq, kernel, mono in rows:
        rounds[(src, seq)].append(kernel if kernel is not None else mono)
    spreads = [max(t) - min(t) for t in rounds.values() if len(t) > 1]
    if not spreads:
        return {}
    return {"p50_ms": percentile(spreads, 0.5) * 1000, "p99_ms": percentile(spreads, 0.99) * 1000}


def start_phases(rows: Sequence[tuple[Any, ...]]) -> float:
    """The largest share of uplinks whose rounds start within the same 10 ms (phase aligned)."""
    first: dict[str, float] = {}
    for src, _dst, _ident, _seq, kernel, mono in rows:
        t = kernel if kernel is not None else mono
        first[src] = min(first.get(src, t), t)
    if not first:
        return 0.0
    phases = Counter(int(((t % INTERVAL_S) / INTERVAL_S) * 50) for t in first.values())
    return max(phases.values()) / len(first)


# Measurements ################################################################


@dataclass
class Window:
    began: float
    ended: float
    #: CPU seconds in the window: (user, system) of the main thread (the event loop) and of
    #: the other threads together (the netlink worker, conntrack counts, executors).
    main: tuple[float, float]
    others: tuple[float, float]
    rss_kib: int

    @property
    def seconds(self) -> float:
        return self.ended - self.began

    @property
    def cpu_s(self) -> float:
        return sum(self.main) + sum(self.others)


def thread_ticks(pid: int) -> dict[int, tuple[int, int]]:
    """(utime, stime) clock ticks per thread of pid."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        ticks[int(tid)] = (int(fields[11]), int(fields[12]))
    return ticks


def measure_window(pid: int, seconds: float) -> Window:
    """The agent's CPU over `seconds`; a thread that ended in between is counted from the
    process totals (utime+stime of /proc/PID/stat cover every thread, ended ones too)."""
    hz = os.sysconf("SC_CLK_TCK")
    total_before, threads_before, began = cpu_seconds(pid), thread_ticks(pid), time.monotonic()
    # The window itself is the measurement: nothing to wait for but time.
    time.sleep(seconds)
    total_after, threads_after, ended = cpu_seconds(pid), thread_ticks(pid), time.monotonic()

    def spent(tid: int, field: int) -> float:
        return (threads_after[tid][field] - threads_before.get(tid, (0, 0))[field]) / hz

    main = (spent(pid, 0), spent(pid, 1))
    others = [sum(spent(t, f) for t in threads_after if t != pid) for f in (0, 1)]
    # Threads that ended within the window: the process total knows them, the listing not.
    others[0] += max(0.0, (total_after - total_before) - sum(main) - sum(others))
    return Window(began, ended, main, (others[0], others[1]), rss_kib(pid))


def forked_ping(lab: Lab, target: str) -> dict[str, Any]:
    """PING_FORKS forked pings and as many icmplib round trips, through fibre (wan0)."""
    out = lab.run(
        "router", sys.executable, "-c", PING_DRIVER, str(PING_FORKS), "wan0", target,
        timeout=PING_FORKS * 1.5 + 30,
    ).stdout  # fmt: skip
    ping = json.loads(out)
    out = lab.run(
        "router", sys.executable, "-c", ICMPLIB_DRIVER, str(PING_FORKS), "wan0",
        ISPS["isp1"].router_ip, target, timeout=PING_FORKS * 1.5 + 30,
    ).stdout  # fmt: skip
    raw = json.loads(out)
    return {
        "forks": ping["count"],
        "answered": ping["answered"],
        "ping_cpu_ms": ping["children_cpu_s"] / ping["count"] * 1000,
        "spawn_cpu_ms": ping["driver_cpu_s"] / ping["count"] * 1000,
        "ping_wall_ms": ping["wall_s"] / ping["count"] * 1000,
        "icmplib_cpu_ms": raw["cpu_s"] / raw["count"] * 1000,
        "icmplib_answered": raw["answered"],
    }


def drop_fibre(lab: Lab, on: bool) -> None:
    """isp1 drops what it forwards from fibre's link (`cpe`) only; the extra uplinks through
    isp1 (cpeN) keep working. Its gateway still answers: a silent upstream failure."""
    body = (
        "table inet scalefault {\n"
        "  chain forward {\n"
        "    type filter hook forward priority -10; policy accept;\n"
        '    iifname "cpe" counter drop\n'
        "  }\n"
        "}\n"
    )
    script = "add table inet scalefault\ndelete table inet scalefault\n" + (body if on else "")
    lab.nft("isp1", script)


def default_via(lab: Lab, dev: str) -> bool:
    return any(r.get("dev") == dev for r in lab.uplink_default(str(DEFAULT_TABLE)))


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(POLL_S)


def first_route_to(events: Sequence[RouteEvent], after: float, dev: str) -> RouteEvent | None:
    for event in events:
        if (
            event.t >= after
            and not event.deleted
            and event.is_default
            and event.table == str(DEFAULT_TABLE)
            and f"dev {dev}" in event.line
        ):
            return event
    return None


def wait_route_to(monitor: Any, after: float, dev: str, timeout_s: float) -> RouteEvent:
    """The first route event since `after` that points the default table at `dev`."""
    deadline = time.monotonic() + timeout_s
    while (event := first_route_to(monitor.events(), after, dev)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no default via {dev} in table {DEFAULT_TABLE} within {timeout_s:g}s")
        time.sleep(POLL_S)
    return event


def fault_to_route(lab: Lab, agent: AgentProcess, runs: int) -> dict[str, Any]:
    """Silent drop of fibre's forward path -> the default table points to lte (the backup)."""
    bound_s = FALL * INTERVAL_S + TIMEOUT_S
    recovery_s = RISE * INTERVAL_S + TIMEOUT_S + HYSTERESIS_S + 20
    monitor = lab.monitor_routes("router")
    times: list[float] = []
    others_down = 0
    nft_s = 0.0
    try:
        for _ in range(runs):
            wait_until(lambda: default_via(lab, "wan0"), 10, "the default table via wan0")
            began = time.monotonic()
            drop_fibre(lab, True)
            # The rule is in force once nft has committed it, at the end of its run.
            fault = time.monotonic()
            nft_s = max(nft_s, fault - began)
            event = wait_route_to(monitor, began, "wan1", bound_s + 10)
            if not default_via(lab, "wan1"):
                raise RuntimeError("a route event said wan1, but the default table does not")
            times.append(event.t - fault)
            status = agent.status() or {}
            others_down += sum(
                1 for name, u in status.get("uplinks", {}).items() if name != "fibre" and u["state"] != "up"
            )
            drop_fibre(lab, False)
            wait_route_to(monitor, time.monotonic(), "wan0", recovery_s)
            agent.wait_selected("fibre", timeout=30)
    finally:
        drop_fibre(lab, False)
        monitor.stop()
    return {
        "runs": len(times),
        "median_s": statistics.median(times),
        "max_s": max(times),
        "min_s": min(times),
        "bound_s": bound_s,
        "other_uplinks_down": others_down,
        "nft_s": nft_s,
    }


def py_spy(lab: Lab, pid: int, seconds: float, out: Path) -> None:
    """py-spy, from the router namespace, sampling only the thread that holds the GIL: the
    Python work itself. A thread waiting for the GIL (the event loop after each sendto while
    the netlink worker parses a dump) would otherwise show up as time in its caller, and
    system calls made without the GIL are the "system" share of the CPU split."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    lab.run(
        "router", exe, "record", "--nonblocking", "--gil", "--format", "raw", "-r", str(PY_SPY_RATE),
        "-d", str(max(1, round(seconds))), "-o", str(out), "-p", str(pid),
        timeout=seconds + 60,
    )  # fmt: skip


def thread_role(frames: Sequence[str]) -> str:
    """Which of the agent's threads a py-spy stack is from, told by its frames."""
    text = ";".join(frames)
    if "NetlinkWorker" in text:
        return "netlink worker"
    if "threading.py" in text:
        return "other threads"
    if "cmd_run (" in text:
        return "event loop"
    return "partial stacks"  # py-spy could not walk the stack to its root


def profile_table(path: Path) -> dict[str, Any]:
    """py-spy's raw (folded) output: each thread's share, and the event loop's functions by
    self and cumulative share of the event loop's samples."""
    roles: Counter[str] = Counter()
    self_counts: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Frames look like "name (file.py:line)"; the line is dropped to merge a function's samples.
        frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") and ":" in f else f for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        role = thread_role(frames)
        roles[role] += count
        if role != "event loop" or not frames:
            continue
        self_counts[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
    total, loop = sum(roles.values()), roles["event loop"]

    def top(counter: Counter[str]) -> list[tuple[str, float]]:
        # Frames in (nearly) every sample (the loop's own run_forever and callers) say nothing.
        shares = [(f, 100.0 * c / loop) for f, c in counter.most_common() if c < 0.95 * loop]
        return shares[:PROFILE_TOP]

    return {
        "samples": total,
        "threads": {role: 100.0 * c / total for role, c in roles.most_common()} if total else {},
        "self": top(self_counts),
        "cumulative": top(cumulative),
    }


def run_one(count: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"uplinks": count}
    with Lab() as lab:
        extra = lab.add_extra_uplinks(count - 2) if count > 2 else []
        lab.ip("inet", "addr", "add", f"{THIRD_TARGET}/32", "dev", "lo")
        longest = 600 + args.seconds * 3 + count
        receivers = [Receiver(lab, role, workdir, longest) for role in ("inet", "isp1", "isp2")]
        config = config_text(workdir / "state", extra, args.gateway_check)
        agent = start_agent(lab, workdir, config, args.agent, args.verbose)
        settle_s = 30 + WINDOW_ROUNDS * INTERVAL_S + count * 0.2
        try:
            agent.wait_for(lambda s: all_up_and_full(s, count), settle_s, "uplinks up, windows full")
            result["settled"] = True
        except AssertionError:
            if agent.proc.poll() is not None or agent.status() is None:
                for receiver in receivers:
                    receiver.stop()
                errors = [line for line in agent.log().splitlines() if "error" in line.lower()]
                result["error"] = (errors[-1] if errors else "the agent exited")[:300]
                result["forked_ping"] = forked_ping(lab, TARGETS[0])
                return result
            # It runs but never reached the steady state (e.g. overloaded: its uplinks
            # degraded by its own lateness): measure it as it is, and say so.
            result["settled"] = False
            result["not_settled"] = health_summary(agent.status() or {})
        pid = agent.agent_pid()
        assert pid is not None
        window = measure_window(pid, args.seconds)
        result["at_window_end"] = health_summary(agent.status() or {})
        if args.profile_at == count:
            profile_out = args.py_spy or workdir / "profile.txt"
            py_spy(lab, pid, args.seconds, profile_out)
            result["profile"] = {"file": str(profile_out), **profile_table(profile_out)}
        # In every lab: `ping -I` reads every interface's addresses (getifaddrs), so it costs
        # more with more uplinks; each N is compared with the ping of its own lab.
        result["forked_ping"] = forked_ping(lab, TARGETS[0])
        collected = [receiver.stop() for receiver in receivers]
        if count in args.fault_at and result["settled"]:
            try:
                result["fault_to_route"] = fault_to_route(lab, agent, args.fault_runs)
            except (RuntimeError, AssertionError) as err:
                result["fault_to_route"] = {"error": str(err).splitlines()[0][:300]}
        try:
            result["exit_code"] = agent.stop(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # A finding, not a crash of the bench: the lab's close kills it.
            result["exit_code"] = f"did not stop within {STOP_TIMEOUT_S:g}s of SIGTERM"

    inside = [r for rows, _ in collected for r in rows if window.began <= r[5] < window.ended]
    to_targets = [r for r in inside if r[1] in TARGETS]
    to_gateways = [r for r in inside if r[1] not in TARGETS]
    probes = len(inside)
    # A healthy uplink's regular rounds send no gateway ping (the agent pings its gateway
    # only in the rounds that decide a failure): the steady state is the targets alone.
    per_round = len(TARGETS)
    result.update(
        seconds=window.seconds,
        cpu_pct=100.0 * window.cpu_s / window.seconds,
        main_user_pct=100.0 * window.main[0] / window.seconds,
        main_system_pct=100.0 * window.main[1] / window.seconds,
        others_user_pct=100.0 * window.others[0] / window.seconds,
        others_system_pct=100.0 * window.others[1] / window.seconds,
        main_cpu_per_probe_ms=1000.0 * sum(window.main) / probes if probes else None,
        rss_mib=window.rss_kib / 1024,
        probes_per_s=probes / window.seconds,
        target_probes_per_s=len(to_targets) / window.seconds,
        gateway_probes_per_s=len(to_gateways) / window.seconds,
        configured_per_s=count * per_round / INTERVAL_S,
        cpu_per_probe_ms=1000.0 * window.cpu_s / probes if probes else None,
        receiver_drops=sum(dropped for _, dropped in collected),
        jitter=stream_figures(to_targets),
        gateway_jitter=stream_figures(to_gateways),
        round_spread=round_spread(inside),
        aligned_share=start_phases([r for rows, _ in collected for r in rows]),
    )
    return result


# Report ######################################################################


def print_report(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    gw = "on (gateway pings only around failures)" if args.gateway_check else "off"
    print(
        f"{len(TARGETS)} ICMP targets per uplink every {INTERVAL_S * 1000:g} ms, timeout {TIMEOUT_S:g} s, "
        f"fall {FALL}, rise {RISE}; gateway_check {gw}; {'-v' if args.verbose else 'no -v'}; "
        f"{args.seconds:g} s windows; agent {args.agent}"
    )
    head = (
        f"{'uplinks':>7} {'probes/s':>9} {'config/s':>9} {'CPU %':>7} {'RSS MiB':>8} {'CPU/probe':>10} "
        f"{'jitter p50':>10} {'p99':>7} {'max':>7} {'missed':>6} {'burst':>5} {'round spread p99':>16}"
    )
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['uplinks']:>7} refused or failed: {r['error']}")
            continue
        j = r["jitter"]
        print(
            f"{r['uplinks']:>7} {r['probes_per_s']:>9.1f} {r['configured_per_s']:>9.1f} {r['cpu_pct']:>7.2f} "
            f"{r['rss_mib']:>8.1f} {r['cpu_per_probe_ms']:>7.3f} ms "
            f"{j.get('p50_ms', 0):>7.2f} ms {j.get('p99_ms', 0):>7.2f} {j.get('max_ms', 0):>7.2f} "
            f"{j.get('missed_rounds', 0):>6} {j.get('bursts', 0):>5} "
            f"{r['round_spread'].get('p99_ms', 0):>13.2f} ms{'' if r['settled'] else '  NOT SETTLED'}"
        )
    print(
        "probes/s: echo requests counted at the receivers (targets in inet + gateways in the ISPs); "
        "jitter: |inter-arrival - interval| per (uplink, target) stream at inet, kernel timestamps"
    )
    for r in results:
        if "error" in r:
            continue
        print(
            f"  {r['uplinks']} uplinks: targets {r['target_probes_per_s']:.1f}/s, gateways "
            f"{r['gateway_probes_per_s']:.1f}/s, receiver drops {r['receiver_drops']}, "
            f"{r['aligned_share'] * 100:.0f}% of uplinks start their rounds in the same 10 ms"
        )
        print(
            f"    CPU: event loop thread {r['main_user_pct']:.2f}% user + {r['main_system_pct']:.2f}% "
            f"system ({r['main_cpu_per_probe_ms']:.3f} ms per probe), other threads "
            f"{r['others_user_pct']:.2f}% user + {r['others_system_pct']:.2f}% system"
        )
        if not r["settled"]:
            print(
                f"    NOT SETTLED within {30 + WINDOW_ROUNDS * INTERVAL_S + r['uplinks'] * 0.2:g}s "
                f"(all up, windows full); measured as it was: {r['not_settled']}"
            )
        if r.get("exit_code") not in (0, None):
            print(f"    exit after SIGTERM: {r['exit_code']}")
        end = r["at_window_end"]
        rtt = "-" if end["median_rtt_ms"] is None else f"{end['median_rtt_ms']:.2f} ms"
        worst = "-" if end["max_rtt_ms"] is None else f"{end['max_rtt_ms']:.2f} ms"
        print(
            f"    at the window's end: {end['states']}, selected {end['selected']}; RTT the agent "
            f"measures (median of the uplinks' window medians) {rtt}, worst {worst}"
        )
    for r in results:
        ping = r.get("forked_ping")
        if ping is None:
            continue
        print(
            f"forked `ping -c1 -W1 -I wan0`, {r['uplinks']}-uplink lab: {ping['ping_cpu_ms']:.3f} ms CPU "
            f"per probe in the child (+{ping['spawn_cpu_ms']:.3f} ms to spawn it), "
            f"{ping['ping_wall_ms']:.1f} ms wall, {ping['answered']}/{ping['forks']} answered; bare icmplib "
            f"send+receive {ping['icmplib_cpu_ms']:.3f} ms CPU ({ping['icmplib_answered']}/{ping['forks']})"
        )
        if "error" not in r and r["cpu_per_probe_ms"]:
            ratio = ping["ping_cpu_ms"] / r["cpu_per_probe_ms"]
            verdict = "PASS" if ratio >= 10 else "FAIL"
            print(
                f"  agent {r['cpu_per_probe_ms']:.3f} ms/probe = that forked ping / {ratio:.1f} "
                f"(bar: 10x cheaper) {verdict}"
            )
    for r in results:
        f = r.get("fault_to_route")
        if f and "error" in f:
            print(f"fault to route, {r['uplinks']} uplinks: failed: {f['error']}")
        elif f:
            verdict = "PASS" if f["max_s"] <= f["bound_s"] else "FAIL"
            print(
                f"fault to route, {r['uplinks']} uplinks (fibre's forward path dropped in isp1 -> table "
                f"{DEFAULT_TABLE} via lte): median {f['median_s'] * 1000:.0f} ms, "
                f"min {f['min_s'] * 1000:.0f}, max {f['max_s'] * 1000:.0f} ({f['runs']} runs; "
                f"bound fall x interval + timeout = {f['bound_s']:g} s) {verdict}; from the end of the nft "
                f"run that drops (it took at most {f['nft_s'] * 1000:.0f} ms); other uplinks not up "
                f"meanwhile: {f['other_uplinks_down']}"
            )
    for r in results:
        p = r.get("profile")
        if p:
            print(f"profile at {r['uplinks']} uplinks ({p['samples']} samples, {p['file']}):")
            print("  threads: " + ", ".join(f"{role} {share:.1f}%" for role, share in p["threads"].items()))
            for kind in ("self", "cumulative"):
                print(f"  event loop functions by {kind} (% of the event loop's samples):")
                for frame, share in p[kind]:
                    print(f"    {share:5.1f}%  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def counts(text: str) -> list[int]:
        values = [int(v) for v in text.split(",") if v.strip()]
        if not values or any(not 2 <= v <= MAX_LAB_UPLINKS for v in values):
            raise argparse.ArgumentTypeError(f"uplink counts from 2 to {MAX_LAB_UPLINKS}, e.g. 2,16,64,250")
        return values

    parser.add_argument("--uplinks", type=counts, default=[2, 16, 64, 250], help="default 2,16,64,250")
    parser.add_argument("--seconds", type=float, default=30.0, help="each measuring window (default 30)")
    parser.add_argument("--fault-at", type=counts, default=[2, 64], help="uplink counts with a fault run")
    parser.add_argument("--fault-runs", type=int, default=3, help="fault runs at each (default 3, max 20)")
    parser.add_argument("--no-gateway-check", dest="gateway_check", action="store_false")
    parser.add_argument("--verbose", action="store_true", help="run the agent with -v")
    parser.add_argument("--agent", type=Path, default=AGENT, help="the multiwan_agent.py to run")
    parser.add_argument("--profile-at", type=int, help="record py-spy at this uplink count")
    parser.add_argument("--py-spy", type=Path, help="where py-spy's raw output goes")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", type=Path, help="keep the raw files (requests, logs) in this new directory")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds: 1 to 600")
    args.fault_runs = max(1, min(args.fault_runs, 20))
    args.agent = args.agent.resolve()
    results = []
    with tempfile.TemporaryDirectory(prefix="mwscale-") as tmp:
        base = Path(tmp) if args.keep is None else args.keep
        base.mkdir(exist_ok=True)
        for i, count in enumerate(args.uplinks):
            workdir = base / f"n{count}-{i}"
            workdir.mkdir()
            try:
                results.append(run_one(count, args, workdir))
            except Exception as err:  # one N's failure is a result; the other Ns still run
                results.append({"uplinks": count, "error": f"{type(err).__name__}: {err}"[:300]})
            if not args.json:
                print(f"... {count} uplinks done", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    else:
        print_report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
