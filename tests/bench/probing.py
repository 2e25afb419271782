#!/usr/bin/env python3
"""Probing benchmark: a silent failure, detected by round counting, by confirmation bursts,
and by passive health with bursts, measured in the netns lab side by side.

Builds the lab (tests/lab.py), runs the agent in the router namespace at production
timing (interval 1 s, timeout 1 s, fall 3, rise 3), and a connector in the LAN that
opens a new TCP connection every 2 ms, in turn to 4 servers beyond the ISPs. For each
mode it silences isp1's forwarding `--runs` times and reports the time from the fault to
the first of 5 new connections in a row through lte, beside the bound:

  rounds   burst = false, adaptive_timeout = false: today's round counting; bound
           fall x interval + timeout (the fault just after a round was sent)
  bursts   the defaults, with passive = false: a failed round (at most one interval
           away, judged at its adaptive timeout) and fall - 1 confirmations
  passive  the defaults: the LAN's unanswered connections make fibre suspect first

Needs root; never touches the root namespace.

    sudo .venv/bin/python tests/bench/probing.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from failover import first_ok_via  # noqa: E402
from lab import Lab  # noqa: E402

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"
SERVERS = ("198.18.1.21", "198.18.1.22", "198.18.1.23", "198.18.1.24")
MODES = {
    "rounds": "burst = false\nadaptive_timeout = false\npassive = false\n",
    "bursts": "passive = false\n",
    "passive": "",
}


def measure(mode: str, runs: int, args: argparse.Namespace) -> tuple[list[float], list[str]]:
    times: list[float] = []
    logs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mwbench-") as tmp, Lab() as lab:
        lab.add_servers(SERVERS)
        lab.run("lan", "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1")  # see failover.py
        lab.run("router", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=5")
        # A closed connection's entry lives on in TIME_WAIT, with its uplink's mark, and a new
        # connection on the same ports (tw_reuse) takes it over: sticky to lte after a failback.
        lab.run("router", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")
        config = lab_config(
            Path(tmp) / "state",
            hysteresis="2s",
            interval=f"{args.interval:g}s",
            timeout=f"{args.timeout:g}s",
            fall=args.fall,
            rise=args.rise,
        ).replace("rise = ", f"{MODES[mode]}rise = ", 1)
        agent = AgentProcess(lab, Path(tmp), config)
        agent.wait_selected("fibre", timeout=20)
        agent.wait_state("lte", "up", timeout=20)
        for run in range(runs):
            connector = lab.start_connector(duration_s=60, period_ms=2, timeout_ms=10, hosts=SERVERS)
            first_ok_via(connector, FIBRE_IP, time.monotonic(), 10)  # traffic is on fibre
            time.sleep(0.5 + (run * 0.37) % 1.0)  # the fault at a different point of the interval
            fault_at = time.monotonic()
            lab.silent_drop("isp1", True)
            via_lte = first_ok_via(connector, LTE_IP, fault_at, 15)
            times.append(via_lte - fault_at)
            lab.silent_drop("isp1", False)
            agent.wait_selected("fibre", timeout=20)
            connector.stop()
            print(f"  {mode} run {run + 1}: {times[-1] * 1000:.0f} ms", flush=True)
        logs = [line for line in agent.log().splitlines() if "uplink=fibre down" in line]
        assert agent.stop() == 0
    return times, logs


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="faults per mode (default 5, max 20)")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--fall", type=int, default=3)
    parser.add_argument("--rise", type=int, default=3)
    parser.add_argument("--modes", default="rounds,bursts,passive")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 1
    runs = max(1, min(args.runs, 20))
    bound = args.fall * args.interval + args.timeout
    bars = {"rounds": bound, "bursts": 1.5, "passive": 1.0}
    results: dict[str, list[float]] = {}
    for mode in args.modes.split(","):
        times, logs = measure(mode, runs, args)
        results[mode] = times
        if logs:
            print(f"  {mode}: {logs[-1].split('uplink=fibre ', 1)[-1][:160]}")
    print()
    print(f"silent failure -> new connections via the backup (interval {args.interval:g}s, fall {args.fall})")
    for mode, times in results.items():
        median = statistics.median(times)
        verdict = "PASS" if median <= bars[mode] else "FAIL"
        print(
            f"  {mode:<8} median {median * 1000:7.0f} ms  min {min(times) * 1000:6.0f}  max "
            f"{max(times) * 1000:6.0f}   round-counting bound {bound * 1000:.0f} ms, bar {bars[mode]:g} s "
            f"(median)  {verdict}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "bound_s": bound}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
