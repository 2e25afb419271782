"""Flap damping in the netns lab: a blackhole toggled every fall x interval never brings
traffic back to the flapping uplink while it flaps, and it is selected again once it is
steady (after its hysteresis and flap penalty, bounded by flap_max_hysteresis).

Issue 12 measured the bar at production timing (interval 500 ms, toggles every 1.5 s for
60 s); here the storm is scaled to the lab's short intervals: interval 150 ms, fall 3, a
toggle every 450 ms for 15 s."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agent_proc import AgentProcess, lab_config
from lab import Lab, RouteEvent

pytestmark = pytest.mark.lab

INTERVAL_S = 0.15
FALL = 3
TOGGLE_S = FALL * INTERVAL_S
STORM_S = 15.0
DAMPING = """\
flap_penalty = "1s"
flap_half_life = "10s"
flap_max_hysteresis = "4s"
"""


def selects(event: RouteEvent, device: str) -> bool:
    """A new default of the selection table through `device`."""
    return not event.deleted and event.is_default and event.table == "200" and f" dev {device} " in event.line


def test_a_blackhole_storm_never_brings_traffic_back_to_the_flapping_uplink(lab: Lab, tmp_path: Path) -> None:
    config = lab_config(
        tmp_path / "state", hysteresis="1s", interval=f"{INTERVAL_S * 1000:g}ms", timeout="150ms", fall=FALL
    ).replace('hysteresis = "1s"\n', 'hysteresis = "1s"\n' + DAMPING, 1)
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up(timeout=15)
    monitor = lab.monitor_routes("router")
    storm_began = time.monotonic()
    blackholed = False
    most_flaps = 0
    for toggle in range(int(STORM_S / TOGGLE_S)):  # bounded: ~33 toggles, 15 s
        blackholed = not blackholed
        lab.silent_drop("isp1", blackholed)
        status = agent.status() or {}
        most_flaps = max(most_flaps, int(status.get("uplinks", {}).get("fibre", {}).get("flaps", 0)))
        # Paced by the clock, not by sleeps that add up: toggle k happens at k x TOGGLE_S.
        time.sleep(max(storm_began + (toggle + 1) * TOGGLE_S - time.monotonic(), 0.0))
    lab.silent_drop("isp1", False)
    storm_ended = time.monotonic()
    # After the storm: up after `rise` rounds, then at most flap_max_hysteresis (4 s) of proof.
    back = agent.wait_selected("fibre", timeout=15)
    back_at = time.monotonic()
    events = monitor.stop()
    left = [e for e in events if selects(e, "wan1")]
    assert left, f"the storm never moved traffic off fibre: {events}"
    during = [e for e in events if selects(e, "wan0") and left[0].t < e.t <= storm_ended]
    assert during == [], f"fibre was selected again during the storm: {during}\n{agent.log()}"
    after = [e for e in events if selects(e, "wan0") and e.t > storm_ended]
    assert after, f"fibre's return is not among the route events: {events}"
    took = after[0].t - storm_ended
    assert took <= 4.0 + 3 * INTERVAL_S + 2.0, took
    # It flapped, and was damped for it: status counted the failures, the log said why.
    assert most_flaps > 2, most_flaps
    assert "flap penalty" in agent.log()
    assert back["uplinks"]["fibre"]["hysteresis_owed_s"] == 0.0
    print(
        f"storm {storm_ended - storm_began:.1f}s, {len(left)} switch(es) to lte, fibre back "
        f"{took:.2f}s after it ({back_at - storm_ended:.2f}s to status), up to {most_flaps} flaps in status"
    )
