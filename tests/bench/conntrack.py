#!/usr/bin/env python3
"""Conntrack benchmark: failover, CPU and release_flows with 100,000 tracked flows.

Builds the lab (tests/lab.py) and runs the agent in the router namespace (probes every
100 ms, fall 3, rise 3, hysteresis 500 ms; fibre has `release_flows = "on_down"`). A
LAN host opens --flows UDP flows through fibre (one datagram to each of as many ports
of the lab's server: each is one tracked, marked, masqueraded connection; the router's
UDP timeout is raised to 300 s in its own namespace so none expires during a run).
Then, per run:

  idle      the agent's CPU (% of a core) over --idle-seconds with that table, against
            the same window before the flows exist (the table is counted every 2 s
            for status: the dump of 100,000 entries is the cost measured)
  failover  fibre's carrier drops in isp1: fault -> the default table points at lte
            (route event), beside the bound (the netlink event)
  release   fault -> the agent's "uplink=fibre released N" line, N, the agent's CPU
            for the failover and the release, and the marked entries left after it
            (conntrack -L -m)

and the carrier comes back, the uplink returns, and the flows are opened again for
the next run. Needs root; never touches the root namespace; every packet goes to a
documentation address (198.18.0.0/15, 203.0.113.0/24).

    sudo .venv/bin/python tests/bench/conntrack.py [--flows 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from lab import SERVER_IP, Lab  # noqa: E402

#: fibre's fwmark/mask in the lab config (the first uplink's mark).
FIBRE_MARK: Final = "0x100/0xff00"
#: One datagram per port: a tracked flow each. Ports wrap within the unprivileged range.
FLOODER: Final = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
count = int(sys.argv[2])
for i in range(count):
    s.sendto(b"x", (sys.argv[1], 10000 + i % 55000))
"""
#: How long a run waits for the release (10,000 flows take well under a second).
RELEASE_TIMEOUT_S: Final = 120.0


def agent_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def marked_flows(lab: Lab) -> int:
    listed = lab.run("router", "conntrack", "-L", "-m", FIBRE_MARK, check=False, timeout=120)
    return sum(1 for line in listed.stdout.splitlines() if line.startswith(("udp", "tcp", "icmp")))


def open_flows(lab: Lab, count: int) -> float:
    """Open `count` flows from the LAN host (several source ports, so that more than
    55,000 flows fit one server); returns how long it took."""
    began = time.monotonic()
    senders = max(1, -(-count // 50_000))
    per_sender = -(-count // senders)
    for _ in range(senders):  # bounded: at most count / 50,000 + 1 senders
        lab.run("lan", sys.executable, "-c", FLOODER, SERVER_IP, str(per_sender), timeout=300)
    return time.monotonic() - began


def cpu_pct(pid: int, seconds: float) -> float:
    before, began = agent_cpu_s(pid), time.monotonic()
    time.sleep(seconds)  # a measuring window
    return 100.0 * (agent_cpu_s(pid) - before) / (time.monotonic() - began)


def released_count(log: str) -> int | None:
    for line in reversed(log.splitlines()):
        if "uplink=fibre released " in line:
            return int(line.split("uplink=fibre released ", 1)[1].split()[0])
    return None


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="mwt-ct-") as tmp, Lab() as lab:
        workdir = Path(tmp)
        lab.run("router", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=300")
        lab.run("router", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout_stream=300")
        config = lab_config(workdir / "state", hysteresis="500ms").replace(
            "priority = 1\n", 'priority = 1\nrelease_flows = "on_down"\n', 1
        )
        agent = AgentProcess(lab, workdir, config)
        agent.wait_both_up(timeout=20)
        pid = agent.proc.pid
        idle_empty = cpu_pct(pid, args.idle_seconds)
        results = []
        for number in range(1, args.runs + 1):  # bounded by --runs
            took = open_flows(lab, args.flows)
            marked = marked_flows(lab)
            idle_full = cpu_pct(pid, args.idle_seconds)
            monitor = lab.monitor_routes("router")
            log_before = len(agent.log())
            cpu_before = agent_cpu_s(pid)
            fault = time.monotonic()
            lab.carrier("isp1", False)
            moved = agent.wait_selected("lte", timeout=10)
            routed = [e for e in monitor.events() if e.table == "200" and e.is_default and "wan1" in e.line]
            route_s = (routed[0].t - fault) if routed else moved["updated_monotonic"] - fault
            deadline = time.monotonic() + RELEASE_TIMEOUT_S
            count = None
            while time.monotonic() < deadline:  # bounded: RELEASE_TIMEOUT_S
                count = released_count(agent.log()[log_before:])
                if count is not None:
                    break
                time.sleep(0.05)
            release_s = time.monotonic() - fault
            cpu_s = agent_cpu_s(pid) - cpu_before
            left = marked_flows(lab)
            monitor.stop()
            row = dict(
                run=number, opened_s=took, marked=marked, idle_empty=idle_empty, idle_full=idle_full,
                route_s=route_s, release_s=release_s if count is not None else None, released=count,
                cpu_s=cpu_s, left=left,
            )  # fmt: skip
            results.append(row)
            print(
                f"run {number}: {marked} marked flows (opened in {took:.1f}s); agent idle CPU "
                f"{idle_empty:.2f}% without them, {idle_full:.2f}% with them; carrier loss -> route "
                f"{route_s * 1000:.0f} ms; released {count} within "
                f"{release_s:.2f}s; agent CPU {cpu_s:.2f}s for both; {left} marked left",
                flush=True,
            )
            lab.carrier("isp1", True)
            agent.wait_both_up(timeout=20)
        code = agent.stop(timeout=30)
    print(f"\n{args.flows} flows, {args.runs} runs (agent exit code {code}):")
    for key, what, scale, unit in (
        ("route_s", "carrier loss -> route (bound: the netlink event)", 1000, "ms"),
        ("release_s", "carrier loss -> flows released", 1, "s"),
        ("cpu_s", "agent CPU for failover + release", 1, "s"),
        ("idle_full", "agent idle CPU with the flows (% of a core)", 1, ""),
    ):
        values = [r[key] * scale for r in results if r[key] is not None]
        if values:
            print(f"  {what}: median {statistics.median(values):.2f}{unit}, max {max(values):.2f}{unit}")
    print(f"  agent idle CPU without the flows: {idle_empty:.2f}% of a core")
    bad = [r for r in results if r["released"] is None or r["left"] > r["marked"] * 0.05]
    return 1 if bad or code != 0 else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flows", type=int, default=100_000, help="flows (default 100000, max 250000)")
    parser.add_argument("--runs", type=int, default=3, help="runs (default 3, max 10)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="each idle CPU window (default 10)")
    args = parser.parse_args()
    if not 1 <= args.flows <= 250_000 or not 1 <= args.runs <= 10 or not 1 <= args.idle_seconds <= 120:
        parser.error("--flows 1..250000, --runs 1..10, --idle-seconds 1..120")
    if os.geteuid() != 0:
        parser.error("needs root (the netns lab)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
