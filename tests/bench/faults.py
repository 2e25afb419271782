#!/usr/bin/env python3
"""Fault benchmark: failover and failback while the agent's own edges misbehave.

Builds the lab (tests/lab.py) and runs the agent in the router namespace with the
shipped defaults (interval 1s, timeout 1s, fall 3, rise 3) and a policy that moves
with fibre's health, so that every switch also rewrites the nft table's steering.
For each case it injects a silent failure of isp1, then mends it, and reports the
detection time (fault -> fibre down, on the agent's own clock) and the failback
time (fibre up -> fibre selected), beside the bounds:

  baseline   the real nft
  nft-hang   a fake `nft` first on the agent's PATH that never returns
  hup-storm  the real nft, and 50 SIGHUPs in 5 s around each fault

and how long SIGTERM takes to stop the agent with the hanging nft. Needs root;
never touches the root namespace.

    sudo .venv/bin/python tests/bench/faults.py [--runs 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AgentProcess, fake_tool_dir, lab_config  # noqa: E402
from lab import Lab  # noqa: E402

POLICY = (
    '\n[[policy]]\nname = "web"\nmatch = { protocol = "tcp", dst_port = 443 }\nuplinks = ["fibre", "lte"]\n'
)


def storm(agent: AgentProcess, stop: threading.Event) -> None:
    for _ in range(50):
        if stop.wait(0.1):
            return
        agent.signal(signal.SIGHUP)


def cycle(lab: Lab, agent: AgentProcess, hup: bool) -> tuple[float, float]:
    """One silent failure and recovery: (detection s, failback s)."""
    stop = threading.Event()
    sender = threading.Thread(target=storm, args=(agent, stop), daemon=True) if hup else None
    if sender is not None:
        sender.start()
        time.sleep(1.0)
    fault = time.monotonic()
    lab.silent_drop("isp1", True)
    moved = agent.wait_selected("lte", timeout=20)
    stop.set()
    if sender is not None:
        sender.join(timeout=10)
    detected = moved["uplinks"]["fibre"]["since_monotonic"] - fault
    lab.silent_drop("isp1", False)
    up = agent.wait_state("fibre", "up", timeout=20)
    back = agent.wait_selected("fibre", timeout=30)
    failback = back["updated_monotonic"] - up["uplinks"]["fibre"]["since_monotonic"]
    agent.wait_state("lte", "up", timeout=20)
    return detected, failback


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="fault cycles per case (default 3, max 20)")
    parser.add_argument("--hysteresis", type=float, default=5.0, help="s (default 5)")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 20))
    interval, timeout, fall, rise = 1.0, 1.0, 3, 3
    bound = fall * interval + timeout + 0.5
    print(
        f"interval={interval:g}s timeout={timeout:g}s fall={fall} rise={rise} "
        f"hysteresis={args.hysteresis:g}s; "
        f"{runs} runs per case; silent-failure bound {bound:g}s, failback bar "
        f"[{args.hysteresis:g}, {args.hysteresis + rise * interval + 1:g}] s"
    )
    with tempfile.TemporaryDirectory(prefix="mwbench-") as tmp:
        for case in ("baseline", "nft-hang", "hup-storm"):
            workdir = Path(tmp) / case
            workdir.mkdir()
            env = fake_tool_dir(workdir, "nft", "exec sleep 1000") if case == "nft-hang" else None
            with Lab() as lab:
                config = lab_config(
                    workdir / "state",
                    hysteresis=f"{args.hysteresis:g}s",
                    interval="1s",
                    timeout="1s",
                    extra=POLICY,
                )
                agent = AgentProcess(lab, workdir, config, env=env)
                agent.wait_both_up(timeout=30)
                figures = [cycle(lab, agent, hup=case == "hup-storm") for _ in range(runs)]
                detections = [d for d, _ in figures]
                failbacks = [f for _, f in figures]
                print(
                    f"{case:>9}: detection median {statistics.median(detections):.3f}s"
                    f" max {max(detections):.3f}s"
                    f" (bound {bound:g}s); failback median {statistics.median(failbacks):.3f}s"
                    f" range {min(failbacks):.3f}-{max(failbacks):.3f}s"
                )
                if case == "hup-storm":
                    print(f"{'':>9}  reloads applied: {agent.log().count('reloaded ')}")
                began = time.monotonic()
                agent.signal(signal.SIGTERM)
                code = agent.proc.wait(timeout=30)
                print(f"{'':>9}  SIGTERM -> exit {code} in {time.monotonic() - began:.3f}s")
                if case == "nft-hang":
                    problem = (agent.status() or {}).get("nft", {}).get("problem")
                    print(f"{'':>9}  status said of nft: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
