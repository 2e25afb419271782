#!/usr/bin/env python3
"""HA pair benchmark: two routers, keepalived's VRRP (advert_int 1 s), the agent on each
(interval 1 s, timeout 1 s, fall 3). Router A's only uplink fails silently; measured: the
fault -> the VIP on router B, and -> the LAN's first new connection through B; then A
recovers and (with preempt) takes the VIP back. With keepalived's track_file weight -100
(preempt) and weight 0 (FAULT; nopreempt). Needs root and keepalived unpacked
(.ci/run does it, or KEEPALIVED_ROOT); never touches the root namespace.

    sudo .venv/bin/python tests/bench/ha.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lab_ha import HaLab  # noqa: E402
from test_lab_ha import A_IP, B_IP, connect_via, start_pair  # noqa: E402

BOUND_S = 3 * 1.0 + 1.0 + 0.5  # the agent's silent-failure bound at 1 s / fall 3 / timeout 1 s


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="fault cycles per mode (max 10)")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 10))
    for preempt in (True, False):
        vip, lan, back = [], [], []
        with tempfile.TemporaryDirectory(prefix="mwbench-") as tmp, HaLab() as lab:
            start_pair(lab, Path(tmp), preempt, interval="1s")
            for _ in range(runs):
                connect_via(lab, A_IP if lab.vip_holder() == "ra" else B_IP, 10)
                holder = lab.vip_holder()
                if holder != "ra":
                    break  # nopreempt: B keeps it after the first cycle
                fault = time.monotonic()
                lab.silent_drop("ispa", True)
                vip.append(lab.wait_vip("rb", timeout_s=30) - fault)
                lan.append(connect_via(lab, B_IP, 30) - fault)
                lab.silent_drop("ispa", False)
                if preempt:
                    mended = time.monotonic()
                    back.append(lab.wait_vip("ra", timeout_s=60) - mended)
                else:
                    time.sleep(5)
        mode = "preempt, weight -100" if preempt else "nopreempt, weight 0 (FAULT)"
        print(
            f"{mode}: fault -> VIP on B median {statistics.median(vip):.2f} s (max {max(vip):.2f}); "
            f"-> LAN connection via B median {statistics.median(lan):.2f} s (max {max(lan):.2f}); "
            f"bound: the agent's {BOUND_S:g} s + "
            + (
                "B's master-down timer (3 adverts + skew, about 3.6 s: A goes on advertising, 100 lower)"
                if preempt
                else "B's skew (under 1 s: A's FAULT sends priority 0, and B takes over at once)"
            )
            + " + one connection attempt; "
            f"{len(vip)} runs"
            + (f"; A recovered -> VIP back on A median {statistics.median(back):.2f} s" if back else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
