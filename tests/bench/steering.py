#!/usr/bin/env python3
"""Steering benchmark: balance shares, a balanced member's failure, a released UDP flow.

In the netns lab (tests/lab.py), with the agent in the router namespace:

  shares    new-connection shares over --connections per weight pair (1:1, 2:1,
            3:1), against the target; the bar is +-10 points;
  leave     a balanced member fails silently: time from the fault until every
            new connection succeeds again (through the member left), against
            fall x interval + timeout, and connections lost meanwhile;
  release   a UDP flow with a 1 s keepalive on an uplink that fails silently,
            release_flows = "on_down": time from the failover to the first
            keepalive answered through the backup (bar: one keepalive, 1 s).

    sudo .venv/bin/python tests/bench/steering.py [--runs 3] [--connections 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from lab import Lab  # noqa: E402

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"
INTERVAL_S = 0.1
FALL = 3


def balanced(state: Path, fibre_weight: int, lte_weight: int) -> str:
    return (
        lab_config(state, hysteresis="300ms", fall=FALL)
        .replace("priority = 1\n", f"priority = 1\nweight = {fibre_weight}\n", 1)
        .replace("priority = 2\n", f"priority = 1\nweight = {lte_weight}\n", 1)
    )


def shares(connections: int) -> list[tuple[str, float, float]]:
    results: list[tuple[str, float, float]] = []
    for fibre_weight, lte_weight in ((1, 1), (2, 1), (3, 1)):
        with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
            agent = AgentProcess(lab, Path(tmp), balanced(Path(tmp) / "state", fibre_weight, lte_weight))
            agent.wait_for(lambda s: len(s["families"]["ipv4"]["balance"]) == 2, 15, "balanced")
            seen = Counter(lab.connect_many(connections))
            target = 100 * fibre_weight / (fibre_weight + lte_weight)
            share = 100 * seen[FIBRE_IP] / connections
            results.append((f"{fibre_weight}:{lte_weight}", target, share))
            print(
                f"shares {fibre_weight}:{lte_weight}: fibre {share:.1f}% (target {target:.1f}%), "
                f"lte {100 * seen[LTE_IP] / connections:.1f}%, failed {seen[None]}",
                flush=True,
            )
            agent.stop()
    return results


def leave(runs: int) -> list[tuple[float, int]]:
    results: list[tuple[float, int]] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
            agent = AgentProcess(lab, Path(tmp), balanced(Path(tmp) / "state", 1, 1))
            agent.wait_for(lambda s: len(s["families"]["ipv4"]["balance"]) == 2, 15, "balanced")
            connector = lab.start_connector(duration_s=15, period_ms=5, timeout_ms=50)
            time.sleep(0.5)
            fault = time.monotonic()
            lab.silent_drop("isp2", True)
            agent.wait_for(lambda s: s["families"]["ipv4"]["balance"] == {}, 10, "lte left")
            time.sleep(0.5)
            attempts = [a for a in connector.stop() if a.t >= fault]
            failed = [a for a in attempts if not a.ok]
            healed = max((a.t for a in failed), default=fault) - fault
            results.append((healed, len(failed)))
            print(
                f"leave: last failed new connection {healed:.3f}s after the fault; lost {len(failed)}",
                flush=True,
            )
            agent.stop()
    return results


def release(runs: int) -> list[float]:
    delays: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
            config = lab_config(Path(tmp) / "state", hysteresis="300ms", fall=FALL).replace(
                "priority = 1\n", 'priority = 1\nrelease_flows = "on_down"\n', 1
            )
            agent = AgentProcess(lab, Path(tmp), config)
            agent.wait_both_up(timeout=15)
            flow = lab.start_udp_keepalive(period_ms=1000, duration_s=15)
            assert flow.stdout is not None
            flow.stdout.readline()
            lab.silent_drop("isp1", True)
            status = agent.wait_selected("lte", timeout=10)
            switched = float(status["uplinks"]["fibre"]["since_monotonic"])
            resumed = None
            deadline = time.monotonic() + 5
            while resumed is None and time.monotonic() < deadline:
                words = flow.stdout.readline().split()
                if len(words) == 3 and words[1:] == ["ok", LTE_IP]:
                    resumed = float(words[0])
            flow.terminate()
            flow.wait(timeout=5)
            if resumed is None:
                print("release: the flow did not resume within 5 s", flush=True)
                continue
            delays.append(resumed - switched)
            print(f"release: first keepalive through lte {delays[-1]:.3f}s after the failover", flush=True)
            agent.stop()
    return delays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    runs = max(1, min(args.runs, 20))
    connections = max(100, min(args.connections, 5000))
    share_results = shares(connections)
    leave_results = leave(runs)
    release_results = release(runs)
    print()
    print(f"balance shares over {connections} new connections each (bar: +-10 points):")
    for pair, target, share in share_results:
        print(f"  {pair}: fibre {share:.1f}% against {target:.1f}% ({share - target:+.1f} points)")
    bound = FALL * INTERVAL_S + INTERVAL_S
    healed = [h for h, _ in leave_results]
    lost = statistics.median([n for _, n in leave_results])
    print(
        "balanced member fails silently: new connections whole again after median "
        f"{statistics.median(healed):.3f}s, max {max(healed):.3f}s "
        f"(bound fall x interval + timeout = {bound:.2f}s); failed attempts median {lost:.0f}"
    )
    if release_results:
        print(
            f"release_flows on_down, 1 s keepalive: resumed through the backup median "
            f"{statistics.median(release_results):.3f}s, max {max(release_results):.3f}s after the failover "
            f"(bar: one keepalive, 1 s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
