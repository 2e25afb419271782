"""The HA router pair with the real keepalived: each router runs the agent, which tells
keepalived through its track file whether this router still has internet; VRRP moves the
LAN's gateway to the router that has."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_proc import AgentProcess
from lab_ha import HaLab

pytestmark = pytest.mark.lab

A_IP, B_IP = "203.0.113.2", "203.0.113.6"
INTERVAL_S, FALL = 0.2, 3


class RouterAgent(AgentProcess):
    """The agent in router `role` of the HA lab."""

    def __init__(self, lab: HaLab, workdir: Path, role: str, track: Path, interval: str = "200ms") -> None:
        config = (
            f'[agent]\nstate_dir = "{workdir / role}"\nhysteresis = "1s"\nkeepalived_track_file = "{track}"\n'
            '[check]\ntargets = ["198.18.1.1", "198.18.1.2"]\n'
            f'interval = "{interval}"\ntimeout = "{interval}"\n'
            f"fall = {FALL}\nrise = 3\n"
            '[[uplink]]\nname = "isp"\ninterface = "wan0"\n'
        )
        super().__init__(lab, workdir, config, name=f"agent-{role}", role=role)
        self.state_dir = workdir / role


@pytest.fixture
def ha_lab(lab: object) -> Iterator[HaLab]:  # `lab` only for its skip/require logic
    with HaLab() as built:
        yield built


def start_pair(lab: HaLab, tmp_path: Path, preempt: bool, interval: str = "200ms") -> dict[str, RouterAgent]:
    agents = {}
    for role, priority in (("ra", 150), ("rb", 100)):
        track = tmp_path / f"{role}.track"
        agents[role] = RouterAgent(lab, tmp_path, role, track, interval)
        agents[role].wait_selected("isp", timeout=10)
        lab.start_keepalived(role, tmp_path, priority, track, preempt)
    lab.wait_vip("ra", timeout_s=15)
    return agents


def connect_via(lab: HaLab, expected: str, timeout_s: float) -> float:
    """Until a new LAN connection goes through the router whose uplink address is `expected`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lab.connect_once(timeout=0.5) == expected:
            return time.monotonic()
    raise AssertionError(f"no LAN connection through {expected} within {timeout_s}s")


@pytest.mark.parametrize("preempt", [True, False])
def test_the_vip_moves_to_the_router_that_has_internet(ha_lab: HaLab, tmp_path: Path, preempt: bool) -> None:
    agents = start_pair(ha_lab, tmp_path, preempt)
    assert connect_via(ha_lab, A_IP, 5)
    fault = time.monotonic()
    ha_lab.silent_drop("ispa", True)  # router A's only uplink dies silently
    agents["ra"].wait_for(lambda s: s["stranded"], 5, "A without internet")
    assert (tmp_path / "ra.track").read_text().strip() == "1"
    moved = ha_lab.wait_vip("rb", timeout_s=15)
    through_b = connect_via(ha_lab, B_IP, 10)
    # the agent's silent-failure bound, then keepalived: a lower priority in A's next advert
    # (every 1 s) lets B preempt; then the ARP announcement and one connection attempt
    bound = FALL * INTERVAL_S + INTERVAL_S + 0.5 + 2 * 1.0 + 1.0
    assert moved - fault <= bound, (moved - fault, bound)
    assert through_b - fault <= bound + 1.0, through_b - fault
    ha_lab.silent_drop("ispa", False)
    agents["ra"].wait_for(lambda s: not s["stranded"], 10, "A back")
    if preempt:
        ha_lab.wait_vip("ra", timeout_s=10)  # the higher priority takes it back
        assert connect_via(ha_lab, A_IP, 10)
    else:
        time.sleep(4.0)  # several adverts: with nopreempt the VIP stays where it is
        assert ha_lab.vip_holder() == "rb"
        assert connect_via(ha_lab, B_IP, 5)
    for agent in agents.values():
        assert agent.stop() == 0
    # stopped agents say "no internet": keepalived never reads healthy from a dead agent
    assert (tmp_path / "ra.track").read_text().strip() == "1"
