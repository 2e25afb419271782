#!/usr/bin/env python3
"""Failover benchmark: how fast new LAN connections move, measured in the netns lab.

Builds the lab (tests/lab.py: router, two ISPs, internet, LAN host), runs the
agent in the router namespace with the production-like defaults
(interval 1s, timeout 1s, fall 3, rise 3), and a connector in the LAN that
opens a new TCP connection to the lab server every few milliseconds. For
each run it injects, in the ISP namespace:

  silent  a drop of everything isp1 forwards (link and gateway still up)
  back    the drop removed: how long until new connections use fibre again
  carrier isp1's end of the link set down (the router sees NO-CARRIER)

and reports the time from the fault to the first new connection that
succeeds through the other uplink (the server sees the NAT address, so the
path is known), beside the theoretical bound. Then it measures the agent's
CPU and RSS while idle. Needs root; never touches the root namespace.

    sudo .venv/bin/python tests/bench/failover.py [--runs 5] [--hysteresis 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from lab import Lab  # noqa: E402

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"
#: The kernel batches non-urgent link events (linkwatch) for up to 1 s after
#: the previous batch; a real uplink does not flap every second, so each
#: carrier fault is injected after this much link quiet.
LINK_QUIET_S = 1.5


@dataclass
class Measure:
    name: str
    values: list[float]
    bound: str
    ok: Callable[[float], bool]

    def line(self) -> str:
        if not self.values:
            return f"{self.name:<34} no data"
        med = statistics.median(self.values)
        verdict = "PASS" if all(self.ok(v) for v in self.values) else "FAIL"
        return (
            f"{self.name:<34} median {med * 1000:8.1f} ms  min {min(self.values) * 1000:8.1f}  "
            f"max {max(self.values) * 1000:8.1f}   bound {self.bound:<28} {verdict}"
        )


#: Successes in a row through the expected uplink that count as "traffic is there". One is not
#: enough: a new connection that reuses the ports of an attempt still tracked as unreplied is,
#: for conntrack, that attempt's retransmission and keeps its uplink (the benchmark's 500
#: connections a second wrap the ephemeral ports within the 120 s such entries live).
IN_A_ROW: Final = 5


def first_ok_via(connector: Any, address: str, after: float, timeout: float) -> float:
    """Start time of the first of IN_A_ROW attempts after `after` that all succeeded through `address`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run: list[float] = []
        for attempt in connector.samples():
            if attempt.t < after:
                continue
            run = run + [attempt.t] if attempt.ok and attempt.detail == address else []
            if len(run) == IN_A_ROW:
                return run[0]
        time.sleep(0.01)
    seen = Counter(a.detail if a.ok else f"fail {a.detail}" for a in connector.samples() if a.t >= after)
    raise RuntimeError(f"no {IN_A_ROW} connections in a row via {address} within {timeout}s: {dict(seen)}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def rss_kib(pid: int) -> tuple[int, int]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def installed_idle(idle_s: float, args: argparse.Namespace) -> tuple[int, float]:
    """RSS (KiB) and CPU (%) of an idle, fresh agent run the way packages run it: `python3 -m
    multiwan_agent` from compiled bytecode (the main run is the single file, as a script)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    root = HERE.parent.parent
    subprocess.run([sys.executable, "-m", "py_compile", str(root / "multiwan_agent.py")], env=env, check=True)
    with tempfile.TemporaryDirectory(prefix="mwbench-") as tmp, Lab() as lab:
        config = lab_config(
            Path(tmp) / "state",
            hysteresis=f"{args.hysteresis:g}s",
            interval=f"{args.interval:g}s",
            timeout=f"{args.timeout:g}s",
            fall=args.fall,
            rise=args.rise,
        )
        agent = AgentProcess(
            lab,
            Path(tmp),
            config,
            program=(sys.executable, "-m", "multiwan_agent"),
            env={**env, "PYTHONPATH": str(root)},
        )
        agent.wait_both_up(timeout=30)
        pid = agent.proc.pid
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        time.sleep(idle_s)
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        rss, _ = rss_kib(pid)
        assert agent.stop() == 0
    return rss, 100.0 * (cpu1 - cpu0) / (wall1 - wall0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="fault cycles (default 5, max 50)")
    parser.add_argument("--interval", type=float, default=1.0, help="probe interval s (default 1)")
    parser.add_argument("--timeout", type=float, default=1.0, help="probe timeout s (default 1)")
    parser.add_argument("--fall", type=int, default=3)
    parser.add_argument("--rise", type=int, default=3)
    parser.add_argument("--hysteresis", type=float, default=5.0, help="s (default 5)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle CPU/RSS window (max 300)")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 50))
    idle_s = max(5.0, min(args.idle_seconds, 300.0))
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 1

    interval, timeout, fall, rise, hyst = args.interval, args.timeout, args.fall, args.rise, args.hysteresis
    silent_bound = fall * interval + timeout + 0.5
    back_low, back_high = hyst, hyst + rise * interval + 1.0
    silent: list[float] = []
    back: list[float] = []
    carrier: list[float] = []
    carrier_event: list[float] = []
    carrier_after_event: list[float] = []
    cycle_s = silent_bound + back_high + LINK_QUIET_S * 2 + back_high + 5

    with tempfile.TemporaryDirectory(prefix="mwa-bench-") as tmp, Lab() as lab:
        workdir = Path(tmp)
        config = lab_config(
            workdir / "state",
            hysteresis=f"{hyst}s",
            interval=f"{interval}s",
            timeout=f"{timeout}s",
            fall=fall,
            rise=rise,
        )
        # 500 new connections a second hold the whole ephemeral port range in TIME_WAIT (60 s),
        # so the kernel would hand out only the ports of attempts that just failed, and a SYN on
        # the ports of an attempt conntrack still tracks as unreplied is that attempt's
        # retransmission: same entry, same uplink. Real clients do not open connections that
        # fast; tcp_tw_reuse lets the LAN host walk the whole range instead, and the router
        # forgets unreplied attempts after 5 s instead of 120 s, before the walk comes round
        # to their ports again (about every 28 s at this rate).
        lab.run("lan", "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
        lab.run("router", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=5")
        agent = AgentProcess(lab, workdir, config)
        agent.wait_selected("fibre", timeout=rise * interval + 5)
        agent.wait_state("lte", "up", timeout=rise * interval + 5)
        connector = lab.start_connector(
            duration_s=min(runs * cycle_s + 30, 3000) if runs * cycle_s + 30 <= 120 else 120,
            period_ms=2,
            timeout_ms=10,
        )
        started = time.monotonic()
        print(
            f"lab up; agent pid {agent.proc.pid}; interval={interval}s timeout={timeout}s "
            f"fall={fall} rise={rise} hysteresis={hyst}s; {runs} runs",
            flush=True,
        )
        missed: list[str] = []
        for run in range(runs):
            if not connector.running() or time.monotonic() - started > 100:
                connector.stop()
                connector = lab.start_connector(duration_s=120, period_ms=2, timeout_ms=50)
                started = time.monotonic()
            try:
                # silent upstream failure and recovery
                t0 = time.monotonic()
                lab.silent_drop("isp1", True)
                silent.append(first_ok_via(connector, LTE_IP, t0, silent_bound + 5) - t0)
                agent.wait_selected("lte", timeout=5)
                t1 = time.monotonic()
                lab.silent_drop("isp1", False)
                back.append(first_ok_via(connector, FIBRE_IP, t1, back_high + 5) - t1)
                agent.wait_selected("fibre", timeout=5)
                # carrier loss, after a moment of link quiet (see LINK_QUIET_S)
                time.sleep(LINK_QUIET_S)
                t2 = time.monotonic()
                lab.carrier("isp1", False)
                ok_at = first_ok_via(connector, LTE_IP, t2, 5)
                status = agent.wait_state("fibre", "down", timeout=5)
                event_at = float(status["uplinks"]["fibre"]["since_monotonic"])
                carrier.append(ok_at - t2)
                carrier_event.append(event_at - t2)
                carrier_after_event.append(ok_at - event_at)
                lab.carrier("isp1", True)
                agent.wait_selected("fibre", timeout=back_high + 5)
                time.sleep(LINK_QUIET_S)
                print(
                    f"run {run + 1}: silent {silent[-1]:.3f}s  failback {back[-1]:.3f}s  "
                    f"carrier {carrier[-1] * 1000:.1f}ms (kernel event {carrier_event[-1] * 1000:.1f}ms "
                    f"+ agent {carrier_after_event[-1] * 1000:.1f}ms)",
                    flush=True,
                )
            except (RuntimeError, AssertionError) as err:
                # A phase that did not end within its bound plus 5 s: say so, restore, go on.
                missed.append(f"run {run + 1}: {str(err).splitlines()[0][:300]}")
                print(missed[-1], flush=True)
                lab.silent_drop("isp1", False)
                lab.carrier("isp1", True)
                agent.wait_selected("fibre", timeout=back_high + 20)
                time.sleep(LINK_QUIET_S)
        connector.stop()

        # idle cost: 2 uplinks x 2 targets at the configured interval
        pid = agent.proc.pid
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        time.sleep(idle_s)
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        rss, hwm = rss_kib(pid)
        idle_cpu_pct = 100.0 * (cpu1 - cpu0) / (wall1 - wall0)
        assert agent.stop() == 0

    module_rss, module_cpu = installed_idle(idle_s, args)

    measures = [
        Measure("carrier loss -> via backup", carrier, "0.1 s median (bar)", lambda v: True),
        Measure("  kernel link event delay", carrier_event, "linkwatch, <= 1 s", lambda v: v <= 1.0),
        Measure("  agent: event -> via backup", carrier_after_event, "the netlink event", lambda v: v <= 0.1),
        Measure(
            "silent failure -> via backup",
            silent,
            f"fall*interval+timeout+0.5 = {silent_bound:g}s",
            lambda v: v <= silent_bound,
        ),
        Measure(
            "recovery -> failback",
            back,
            f"[{back_low:g}s, {back_high:g}s]",
            lambda v: back_low <= v <= back_high,
        ),
    ]
    print()
    for measure in measures:
        print(measure.line())
    print(f"{'runs with a phase past its bound + 5 s':<34} {len(missed)} of {runs}")
    for line in missed:
        print(f"  {line}")
    carrier_median = statistics.median(carrier)
    print(f"{'carrier loss bar (median <= 100 ms)':<34} {'PASS' if carrier_median <= 0.1 else 'FAIL'}")
    print(
        f"{'idle (2 uplinks x 2 targets)':<34} cpu {idle_cpu_pct:.2f}% of one core over {idle_s:g}s, "
        f"rss {rss / 1024:.1f} MiB (peak {hwm / 1024:.1f} MiB)   bound <2%, <40 MB   "
        f"{'PASS' if idle_cpu_pct < 2 and rss * 1024 < 40_000_000 else 'FAIL'}"
    )
    print(
        f"{'idle, as installed (python3 -m, .pyc)':<34} cpu {module_cpu:.2f}% of one core, rss "
        f"{module_rss / 1024:.1f} MiB   bound <40 MB (OpenWrt's package runs it so)   "
        f"{'PASS' if module_rss * 1024 < 40_000_000 else 'FAIL'}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "silent_s": silent,
                    "failback_s": back,
                    "carrier_s": carrier,
                    "carrier_event_s": carrier_event,
                    "carrier_after_event_s": carrier_after_event,
                    "idle_cpu_pct": idle_cpu_pct,
                    "rss_kib": rss,
                    "rss_peak_kib": hwm,
                    "python": sys.version.split()[0],
                    "pyroute2": subprocess.run(
                        [sys.executable, "-c", "import pyroute2;print(getattr(pyroute2,'__version__',''))"],
                        capture_output=True,
                        text=True,
                    ).stdout.strip(),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
