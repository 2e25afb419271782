#!/usr/bin/env python3
"""Flap benchmark: a blackhole storm at production timing, against the flap damping.

Builds the lab (tests/lab.py) and runs the agent in the router namespace with production
timing (interval 500 ms, timeout 1 s, fall 3, rise 3; --hysteresis, default the shipped
30 s; the shipped flap damping unless --flap-penalty etc.). Per run, once both uplinks
are up, isp1 black-holes fibre's upstream and lets it through again every fall x
interval = 1.5 s for --storm seconds (60), then stops. From the router's route events
(ip monitor) it reports:

  switches      new defaults of the selection table, to lte and back to fibre
  re-selected   fibre selected again while the storm still ran (the bar: never)
  owed          the hysteresis status says fibre owes when the storm ends (the damping)
  flaps         fibre's failures that status counted

and mends the fault; the next run starts once fibre is selected again (bounded by
--settle seconds; a fibre that owes more than that is reported, not waited for, and the
agent is restarted clean). Needs root; never touches the root namespace.

    sudo .venv/bin/python tests/bench/flap.py [--runs 3] [--storm 60] [--hysteresis 30s]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from lab import Lab, RouteEvent  # noqa: E402

INTERVAL_S: Final = 0.5
FALL: Final = 3
TOGGLE_S: Final = FALL * INTERVAL_S


def selects(event: RouteEvent, device: str) -> bool:
    """A new default of the selection table through `device`."""
    return not event.deleted and event.is_default and event.table == "200" and f" dev {device} " in event.line


def storm_run(lab: Lab, workdir: Path, number: int, args: argparse.Namespace) -> dict[str, float | int]:
    damping = "".join(
        f'{key} = "{value}"\n'
        for key, value in (
            ("flap_penalty", args.flap_penalty),
            ("flap_half_life", args.flap_half_life),
            ("flap_max_hysteresis", args.flap_max_hysteresis),
        )
        if value is not None
    )
    # A state directory of its own per run: no run inherits what another owed.
    workdir = workdir / f"run{number}"
    workdir.mkdir()
    config = lab_config(
        workdir / "state", hysteresis=args.hysteresis, interval="500ms", timeout="1s", fall=FALL
    ).replace(f'hysteresis = "{args.hysteresis}"\n', f'hysteresis = "{args.hysteresis}"\n{damping}', 1)
    agent = AgentProcess(lab, workdir, config)
    try:
        agent.wait_both_up(timeout=30)
        monitor = lab.monitor_routes("router")
        began = time.monotonic()
        blackholed = False
        flaps = 0
        for toggle in range(int(args.storm / TOGGLE_S)):  # bounded: storm / 1.5 s toggles
            blackholed = not blackholed
            lab.silent_drop("isp1", blackholed)
            status = agent.status() or {}
            flaps = max(flaps, int(status.get("uplinks", {}).get("fibre", {}).get("flaps", 0)))
            # Paced by the clock: toggle k happens at k x TOGGLE_S.
            time.sleep(max(began + (toggle + 1) * TOGGLE_S - time.monotonic(), 0.0))
        ended = time.monotonic()
        owed = float((agent.status() or {}).get("uplinks", {}).get("fibre", {}).get("hysteresis_owed_s", 0.0))
        lab.silent_drop("isp1", False)
        try:
            agent.wait_selected("fibre", timeout=args.settle)
            back_s = time.monotonic() - ended
        except AssertionError:
            back_s = float("nan")
        events = monitor.stop()
        to_lte = [e for e in events if selects(e, "wan1") and e.t <= ended]
        during = [e for e in events if selects(e, "wan0") and to_lte and to_lte[0].t < e.t <= ended]
        return dict(
            run=number, to_lte=len(to_lte), reselected=len(during), owed_s=owed, flaps=flaps, back_s=back_s
        )
    finally:
        agent.stop(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs (default 3, max 10)")
    parser.add_argument("--storm", type=float, default=60.0, help="storm length, s (default 60, max 600)")
    parser.add_argument("--hysteresis", default="30s", help='the agent\'s hysteresis (default "30s")')
    parser.add_argument("--flap-penalty", help="flap_penalty (default: the agent's)")
    parser.add_argument("--flap-half-life", help="flap_half_life (default: the agent's)")
    parser.add_argument("--flap-max-hysteresis", help="flap_max_hysteresis (default: the agent's)")
    parser.add_argument("--settle", type=float, default=60.0, help="wait for fibre's return, s (default 60)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 10 or not 3 <= args.storm <= 600 or not 1 <= args.settle <= 900:
        parser.error("--runs 1..10, --storm 3..600, --settle 1..900")
    if os.geteuid() != 0:
        parser.error("needs root (the netns lab)")
    print(
        f"blackhole on/off every {TOGGLE_S:g}s for {args.storm:g}s; interval 500ms, timeout 1s, fall {FALL}, "
        f"rise 3, hysteresis {args.hysteresis}, flap_penalty {args.flap_penalty or 'default'}, "
        f"flap_half_life {args.flap_half_life or 'default'}, "
        f"flap_max_hysteresis {args.flap_max_hysteresis or 'default'}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="mwt-flap-") as tmp, Lab() as lab:
        for number in range(1, args.runs + 1):  # bounded by --runs
            row = storm_run(lab, Path(tmp), number, args)
            results.append(row)
            print(
                f"run {number}: {row['to_lte']} switch(es) to lte, fibre re-selected during the storm "
                f"{row['reselected']} time(s); {row['flaps']} flaps counted; fibre owed "
                f"{row['owed_s']:.1f}s of hysteresis at the storm's end; "
                + (
                    f"selected again {row['back_s']:.1f}s after it"
                    if not math.isnan(row["back_s"])
                    else f"not selected again within --settle {args.settle:g}s"
                ),
                flush=True,
            )
    reselected = sum(int(r["reselected"]) for r in results)
    print(f"fibre re-selected during a storm: {reselected} time(s) in {args.runs} run(s) (bar: 0)")
    return 1 if reselected else 0


if __name__ == "__main__":
    sys.exit(main())
