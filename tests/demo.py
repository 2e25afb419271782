#!/usr/bin/env python3
"""A live failover demo in throw-away network namespaces.

Builds the lab (router, two ISPs, an internet with a server, a LAN host),
starts the agent inside the router namespace, and shows, as it happens,
which uplink new connections from the LAN host leave through while it
breaks and mends the preferred ISP: a silent upstream failure, its
recovery (fail back after the hysteresis), a carrier loss. The host's own
network is never touched; everything is deleted at the end, also on Ctrl-C.

    sudo .venv/bin/python tests/demo.py [--hysteresis 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_proc import AGENT, AgentProcess, lab_config  # noqa: E402
from lab import Lab  # noqa: E402

VIA = {"203.0.113.2": "fibre (isp1)", "203.0.113.6": "lte (isp2)"}


def follow_log(path: Path, stop: threading.Event) -> None:
    """Print the agent's decisions (not every probe round) as they are logged."""
    with open(path) as handle:
        while not stop.is_set():
            line = handle.readline()
            if not line:
                time.sleep(0.05)
                continue
            if " DEBUG " not in line:
                print("    agent | " + line.rstrip().split(" ", 2)[-1], flush=True)


def watch_lan(lab: Lab, seconds: float, label: str) -> None:
    """Open a new connection from the LAN host every 250 ms and show its path."""
    print(f"\n== {label}", flush=True)
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        source = lab.connect_once(timeout=0.2)
        shown = VIA.get(source or "", "FAILED" if source is None else source)
        if shown != last:
            print(f"    lan   | new connections leave via {shown}", flush=True)
            last = shown
        time.sleep(0.25)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hysteresis", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo builds network namespaces: run it as root (sudo)", file=sys.stderr)
        return 1
    hyst = max(1.0, min(args.hysteresis, 60.0))
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="mwa-demo-") as tmp, Lab() as lab:
        workdir = Path(tmp)
        print(f"lab namespaces: {', '.join(lab.ns.values())}")
        print(f"probes: ICMP to 198.18.1.1 and 198.18.1.2 every 250 ms, fall 3, rise 3, hysteresis {hyst:g}s")
        agent = AgentProcess(
            lab,
            workdir,
            lab_config(workdir / "state", hysteresis=f"{hyst}s", interval="250ms", timeout="250ms"),
        )
        threading.Thread(target=follow_log, args=(agent.log_path, stop), daemon=True).start()
        try:
            agent.wait_selected("fibre", timeout=10)
            watch_lan(lab, 2, "both ISPs healthy")
            print("\n>> isp1 silently drops everything it forwards (link and gateway stay up)")
            lab.silent_drop("isp1", True)
            watch_lan(lab, 3, "silent upstream failure on fibre")
            print("\n>> isp1 recovers")
            lab.silent_drop("isp1", False)
            watch_lan(lab, hyst + 3, f"fibre must prove itself for {hyst:g}s before traffic moves back")
            print("\n>> isp1's cable is pulled (carrier loss)")
            lab.carrier("isp1", False)
            watch_lan(lab, 2, "carrier loss on fibre")
            lab.carrier("isp1", True)
            watch_lan(lab, hyst + 2, "cable back")
            print("\n>> multiwan-agent status:")
            subprocess.run(
                [sys.executable, str(AGENT), "status", "--state-dir", str(agent.state_dir)], timeout=10
            )
        finally:
            stop.set()
            agent.stop()
    print("\nlab deleted; the host network was never touched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
