#!/usr/bin/env python3
"""Quality benchmark: loss-triggered failover, no flap under light loss, renumbering.

In the netns lab (tests/lab.py), with the agent in the router namespace:

  loss30    30 % random loss upstream on the preferred uplink: rounds from the
            onset to `degraded` and to traffic on the backup, against the bar
            window + fall rounds;
  loss5     5 % loss for --flap-seconds (default 60): switches and state
            changes counted (bar: none);
  renumber  the backup gets a new address and gateway while it carries
            traffic: time until routes and rules follow (bar: 1 s).

    sudo .venv/bin/python tests/bench/quality.py [--runs 3] [--interval 0.25]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from lab import Lab  # noqa: E402

WINDOW = 20
FALL = 3


def loss30(runs: int, interval: float) -> list[float]:
    """Rounds from the onset of 30 % loss to the switch, per run."""
    rounds: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
            workdir = Path(tmp)
            config = lab_config(workdir / "state", interval=f"{interval}s", timeout=f"{interval}s", fall=FALL)
            agent = AgentProcess(lab, workdir, config)
            agent.wait_both_up(timeout=15)
            agent.wait_for(
                lambda s: s["uplinks"]["fibre"]["window_rounds"] == WINDOW, WINDOW * interval + 10, "window"
            )
            t0 = time.monotonic()
            lab.loss("isp1", 30)
            status = agent.wait_selected("lte", timeout=(WINDOW + FALL) * interval * 4 + 10)
            switched = float(status["uplinks"]["fibre"]["since_monotonic"])
            rounds.append((switched - t0) / interval)
            print(
                f"loss30: degraded after {rounds[-1]:.1f} rounds ({status['uplinks']['fibre']['reason']})",
                flush=True,
            )
            agent.stop()
    return rounds


def loss5(seconds: float, interval: float) -> tuple[int, int]:
    """(selection switches, fibre state changes) during `seconds` of 5 % loss."""
    with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
        workdir = Path(tmp)
        agent = AgentProcess(
            lab, workdir, lab_config(workdir / "state", interval=f"{interval}s", timeout=f"{interval}s")
        )
        agent.wait_both_up(timeout=15)
        before = agent.log()
        lab.loss("isp1", 5)
        time.sleep(seconds)
        during = agent.log()[len(before) :]
        lost = during.count("=timeout")
        agent.stop()
    switches = during.count("selected=")
    changes = (
        during.count("uplink=fibre degraded")
        + during.count("uplink=fibre down")
        + during.count("uplink=fibre up")
    )
    print(
        f"loss5: {seconds:g}s, {lost} probes lost, {switches} switches, {changes} state changes", flush=True
    )
    return switches, changes


def renumber(runs: int) -> list[float]:
    """Seconds from the renumbering to routes and rules that follow it."""
    times: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
            workdir = Path(tmp)
            agent = AgentProcess(lab, workdir, lab_config(workdir / "state", hysteresis="300ms"))
            agent.wait_both_up(timeout=15)
            lab.silent_drop("isp1", True)
            agent.wait_selected("lte", timeout=5)
            done = lab.renumber_isp2("203.0.113.10", "203.0.113.9")
            deadline = done + 5
            while time.monotonic() < deadline:
                rules = lab.ip("router", "rule", "show")
                if (
                    "from 203.0.113.10 lookup 202" in rules
                    and "203.0.113.6" not in rules
                    and [r.get("gateway") for r in lab.default_routes("router", "200")] == ["203.0.113.9"]
                    and [r.get("gateway") for r in lab.uplink_default("202")] == ["203.0.113.9"]
                ):
                    break
                time.sleep(0.002)
            times.append(time.monotonic() - done)
            print(f"renumber: followed after {times[-1] * 1000:.1f} ms", flush=True)
            agent.stop()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of loss30 and renumber (max 20)")
    parser.add_argument("--interval", type=float, default=0.25, help="probe interval in s (default 0.25)")
    parser.add_argument("--flap-seconds", type=float, default=60.0, help="5 %% loss duration (max 600)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 1
    runs = max(1, min(args.runs, 20))
    interval = max(0.05, min(args.interval, 2.0))
    rounds = loss30(runs, interval)
    switches, changes = loss5(max(5.0, min(args.flap_seconds, 600.0)), interval)
    follow = renumber(runs)
    bound = WINDOW + FALL
    print()
    print(
        f"30% loss -> traffic on backup: median {statistics.median(rounds):.1f} rounds, max {max(rounds):.1f}"
        f"   bound window + fall = {bound} rounds   {'PASS' if max(rounds) <= bound else 'FAIL'}"
    )
    print(
        f"5% loss for {args.flap_seconds:g}s: {switches} switches, {changes} state changes"
        f"   bound 0   {'PASS' if switches == 0 and changes == 0 else 'FAIL'}"
    )
    print(
        f"renumbering followed: median {statistics.median(follow) * 1000:.1f} ms, "
        f"max {max(follow) * 1000:.1f} ms"
        f"   bound 1 s   {'PASS' if max(follow) <= 1.0 else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
