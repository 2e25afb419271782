#!/usr/bin/env python3
"""multiwan-agent beside a typical shell failover loop, in one run, in the same netns lab.

Both contenders run in turn in one lab (tests/lab.py: router, fibre via isp1, lte via
isp2) with the same interval, fall and rise (default 1 s, 3, 3; the agent with its
default engine: bursts and adaptive timeout, probe timeout 1 s, hysteresis 1 s, the
lab's smallest). The shell loop is tests/bench/shell_loop.sh: `ping -c1 -W1 -I wan0`
every interval, `ip route replace default` after fall failures / rise successes.

For each of --runs cycles it injects, in isp1's namespace, a silent failure (isp1
drops everything it forwards) and its removal, then a carrier loss (isp1's end of the
link down) and its return, and times from the injection to (a) the first default
route event pointing at the other uplink (`ip monitor route` in the router; the
agent's table 1000, the loop's main table) and (b) IN_A_ROW new LAN connections in a
row through the other uplink (failover.py's connector and first_ok_via). Then the
CPU (of the loop: sh plus its reaped children, ping, sleep, ip) and RSS over a steady
window, and what the loop's `ping -I wan0` does once the default points at wan1.
Last, unless --no-scale, tests/bench/scale.py at 2, 16 and 64 uplinks, its table
verbatim. Needs root; never touches the root namespace.

    sudo .venv/bin/python tests/bench/side_by_side.py [--runs 5] [--no-scale]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from failover import FIBRE_IP, LINK_QUIET_S, LTE_IP, cpu_seconds, first_ok_via, rss_kib  # noqa: E402
from lab import ISPS, PROBE_TARGETS, Lab, RouteEvent  # noqa: E402

SHELL_LOOP: Final = HERE / "shell_loop.sh"
#: The lab config's default_table (agent_proc.lab_config).
AGENT_TABLE: Final = "200"
#: How long a failback may take before it counts as "never" (and the contender is reset).
FAILBACK_GIVE_UP_S: Final = 15.0
POLL_S: Final = 0.02


@dataclass
class Figures:
    """One contender's times, seconds from the injection; None where it never happened."""

    silent_route: list[float | None] = field(default_factory=list)
    silent_conn: list[float | None] = field(default_factory=list)
    silent_back: list[float | None] = field(default_factory=list)
    carrier_route: list[float | None] = field(default_factory=list)
    carrier_conn: list[float | None] = field(default_factory=list)
    carrier_back: list[float | None] = field(default_factory=list)
    cpu_pct: float = 0.0
    rss_kib: int = 0
    notes: list[str] = field(default_factory=list)


def first_route_to(events: list[RouteEvent], after: float, dev: str, table: str) -> float | None:
    for event in events:
        if event.t >= after and not event.deleted and event.is_default and event.table == table:
            if f"dev {dev}" in event.line and event.family == 4:
                return event.t
    return None


def wait_route(monitor: Any, after: float, dev: str, table: str, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (t := first_route_to(monitor.events(), after, dev, table)) is not None:
            return t - after
        time.sleep(POLL_S)
    return None


def conn_after(connector: Any, address: str, after: float, timeout_s: float) -> float | None:
    try:
        return first_ok_via(connector, address, after, timeout_s) - after
    except RuntimeError:
        return None


class ShellLoop:
    """shell_loop.sh in the router namespace; restart() puts the default back on wan0."""

    def __init__(self, lab: Lab, interval: float, fall: int, rise: int, log: Path) -> None:
        self.lab, self.log = lab, log
        isp1, isp2 = ISPS["isp1"], ISPS["isp2"]
        self.argv = [
            "sh", str(SHELL_LOOP), isp1.router_dev, isp1.gateway, isp2.router_dev, isp2.gateway,
            PROBE_TARGETS[0], f"{interval:g}", str(fall), str(rise),
        ]  # fmt: skip
        self.proc: subprocess.Popen[Any] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = self.lab.popen("router", self.argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not any(r.get("dev") == "wan0" for r in self.lab.default_routes("router", "main")):
            if time.monotonic() > deadline:
                raise RuntimeError("shell loop did not set its default route")
            time.sleep(POLL_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def children_cpu_seconds(pid: int) -> float:
    """utime+stime+cutime+cstime: a shell's own CPU plus that of the children it reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_cycles(
    lab: Lab,
    runs: int,
    table: str,
    figures: Figures,
    reset: Callable[[], None],
    bound_s: float,
) -> None:
    monitor = lab.monitor_routes("router")
    for run in range(runs):
        # connector.py runs at most 120 s: one per cycle (a cycle takes under 60 s).
        connector = lab.start_connector(duration_s=90, period_ms=5, timeout_ms=20)
        # A silent failure, then a carrier loss: each timed to the route and new connections
        # via lte, and its repair to the route back (a loop that never fails back is reset).
        faults = (
            (
                functools.partial(lab.silent_drop, "isp1"),
                True,
                False,
                figures.silent_route,
                figures.silent_conn,
                figures.silent_back,
            ),
            (
                functools.partial(lab.carrier, "isp1"),
                False,
                True,
                figures.carrier_route,
                figures.carrier_conn,
                figures.carrier_back,
            ),
        )
        for index, (set_fault, broken, repaired, routes, conns, backs) in enumerate(faults):
            if index:
                time.sleep(LINK_QUIET_S)
            started = time.monotonic()
            set_fault(broken)
            routes.append(wait_route(monitor, started, "wan1", table, bound_s + 10))
            conns.append(conn_after(connector, LTE_IP, started, 5))
            repaired_at = time.monotonic()
            set_fault(repaired)
            back = wait_route(monitor, repaired_at, "wan0", table, FAILBACK_GIVE_UP_S)
            backs.append(back)
            if back is None:
                reset()
        conn_after(connector, FIBRE_IP, time.monotonic(), 10)  # traffic on fibre again before the next run
        time.sleep(LINK_QUIET_S)
        connector.stop()
        print(f"  run {run + 1}: " + "  ".join(
            f"{name} {fmt(values[-1])}"
            for name, values in (
                ("silent", figures.silent_route), ("back", figures.silent_back),
                ("carrier", figures.carrier_route), ("back", figures.carrier_back),
            )
        ), flush=True)  # fmt: skip
    monitor.stop()


def fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}s"


def med(values: list[float | None]) -> str:
    seen = [v for v in values if v is not None]
    missing = len(values) - len(seen)
    text = f"{statistics.median(seen):6.2f}s" if seen else "  never"
    return text + (f" ({missing}/{len(values)} never)" if missing else "")


def steady(pid: int, seconds: float, cpu: Callable[[int], float]) -> float:
    c0, w0 = cpu(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu(pid) - c0) / (time.monotonic() - w0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="fault cycles per contender (default 5, max 30)")
    parser.add_argument("--interval", type=float, default=1.0, help="probe interval s (default 1)")
    parser.add_argument("--fall", type=int, default=3)
    parser.add_argument("--rise", type=int, default=3)
    parser.add_argument("--steady-seconds", type=float, default=60.0, help="CPU window (default 60)")
    parser.add_argument("--scale-seconds", type=float, default=20.0, help="scale.py window (default 20)")
    parser.add_argument("--no-scale", action="store_true", help="skip scale.py")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 1
    runs = max(1, min(args.runs, 30))
    interval, fall, rise = args.interval, args.fall, args.rise
    timeout = 1.0
    silent_bound = fall * interval + timeout
    agent_fig, shell_fig = Figures(), Figures()
    route_get = ""
    with tempfile.TemporaryDirectory(prefix="mwa-sbs-") as tmp, Lab(dhcp_defaults=False) as lab:
        workdir = Path(tmp)
        lab.run("lan", "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")
        lab.run("router", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=5")
        print(f"interval {interval:g}s fall {fall} rise {rise}; {runs} runs each", flush=True)

        print("shell loop:", flush=True)
        shell = ShellLoop(lab, interval, fall, rise, workdir / "shell.log")
        run_cycles(lab, runs, "main", shell_fig, shell.restart, silent_bound)
        assert shell.proc is not None
        # What `ping -I wan0` does while the default points at wan1: no route has dev wan0,
        # so the kernel assumes the target is on-link (ip_route_output: "routing tables
        # are wrong") and the probe ARPs for it on wan0 instead of going via fibre's gateway.
        lab.run("router", "ip", "route", "replace", "default", "via", ISPS["isp2"].gateway, "dev", "wan1")
        probe_route = lab.ip("router", "route", "get", PROBE_TARGETS[0], "oif", "wan0", check=False)
        route_get = " ".join(probe_route.split())
        shell.restart()
        assert shell.proc is not None
        shell_fig.cpu_pct = steady(shell.proc.pid, args.steady_seconds, children_cpu_seconds)
        shell_fig.rss_kib = rss_kib(shell.proc.pid)[0]
        shell.stop()
        lab.run("router", "ip", "route", "del", "default", check=False)
        # What a DHCP client leaves (the lab's dhcp_defaults): the agent takes its gateways from these.
        for isp in (ISPS["isp1"], ISPS["isp2"]):
            lab.ip("router", "route", "add", "default", "via", isp.gateway, "dev", isp.router_dev,
                   "proto", "dhcp", "metric", str(isp.dhcp_metric))  # fmt: skip

        print("multiwan-agent:", flush=True)
        config = lab_config(
            workdir / "state", hysteresis="1s", interval=f"{interval:g}s", timeout=f"{timeout:g}s",
            fall=fall, rise=rise,
        )  # fmt: skip
        agent = AgentProcess(lab, workdir, config)
        agent.wait_selected("fibre", timeout=rise * interval + 10)
        agent.wait_state("lte", "up", timeout=rise * interval + 10)

        def agent_reset() -> None:
            agent.wait_selected("fibre", timeout=30)

        run_cycles(lab, runs, AGENT_TABLE, agent_fig, agent_reset, silent_bound)
        agent_fig.cpu_pct = steady(agent.proc.pid, args.steady_seconds, cpu_seconds)
        agent_fig.rss_kib = rss_kib(agent.proc.pid)[0]
        assert agent.stop() == 0

    back_bound = f"rise x interval = {rise * interval:g}s (agent +1s hysteresis)"
    rows = [
        (
            "silent failure -> route",
            "silent_route",
            f"fall x interval + timeout = {silent_bound:g}s; a loop that sleeps after its"
            f" ping: fall x (interval + timeout) = {fall * (interval + timeout):g}s",
        ),
        ("silent failure -> new conns", "silent_conn", "same"),
        ("silent recovery -> route back", "silent_back", back_bound),
        ("carrier loss -> route", "carrier_route", "agent: the netlink event (~0); loop: as silent"),
        ("carrier loss -> new conns", "carrier_conn", "same"),
        ("carrier back -> route back", "carrier_back", back_bound),
    ]
    print()
    print(f"{'median of ' + str(runs) + ' runs':<32} {'multiwan-agent':<22} {'shell loop':<22} bound")
    for label, attr, bound in rows:
        print(f"{label:<32} {med(getattr(agent_fig, attr)):<22} {med(getattr(shell_fig, attr)):<22} {bound}")
    print(
        f"{'CPU, steady ' + format(args.steady_seconds, 'g') + 's (shared 2 cores)':<32} "
        f"{agent_fig.cpu_pct:5.2f}% of a core{'':<6} {shell_fig.cpu_pct:5.2f}% (sh + pings)"
    )
    print(
        f"{'RSS':<32} {agent_fig.rss_kib / 1024:5.1f} MiB{'':<12} "
        f"{shell_fig.rss_kib / 1024:5.1f} MiB (sh only)"
    )
    print(f"loop's probe with default via wan1: ip route get {PROBE_TARGETS[0]} oif wan0 -> {route_get}")
    print("  (no 'via': no route has dev wan0, so `ping -I wan0` ARPs for the target on wan0, never")
    print("   reaches fibre's gateway, and the loop never sees the primary come back)")

    if not args.no_scale:
        print("\nscale.py --uplinks 2,16,64 (agent CPU/RSS, per-probe cost beside a forked ping;")
        print("shared 2 cores):")
        result = subprocess.run(
            [sys.executable, str(HERE / "scale.py"), "--uplinks", "2,16,64", "--seconds",
             f"{args.scale_seconds:g}", "--fault-at", "2", "--fault-runs", "1"],
            capture_output=True, text=True, check=False, timeout=1800,
        )  # fmt: skip
        print(result.stdout, end="")
        if result.returncode:
            print(f"scale.py exited {result.returncode}: {result.stderr[-2000:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
