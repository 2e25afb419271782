"""Dual stack in the netns lab: each family has its own health and fails over on its own.

Both uplinks probe two targets in each family; a fault in one family at isp1
must move that family only, with no route or rule change of the other family
(watched with `ip -4`/`ip -6 monitor route rule`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from agent_proc import AgentProcess, lab_config
from lab import LAB_TOOLS, SERVER_IP6, SERVER_PORT, Lab, RouteEvent

pytestmark = pytest.mark.lab

DUAL_TARGETS = 'targets = ["198.18.1.1", "198.18.1.2", "2001:db8:ffff::1", "2001:db8:ffff::2"]'
SOURCE = {("fibre", 4): "203.0.113.2", ("lte", 4): "203.0.113.6", ("fibre", 6): "2001:db8:1::2"}
SOURCE[("lte", 6)] = "2001:db8:2::2"
#: The bound on a silent failure's failover (fault to the selection table's new default),
#: the same for both families: interval 100 ms, fall 3, confirmation bursts.
FAILOVER_BOUND_S = 2.0
OTHER = {4: 6, 6: 4}


def family_name(family: int) -> str:
    return f"ipv{family}"


def selected(status: dict[str, Any], family: int) -> str | None:
    return status["families"][family_name(family)]["selected"]  # type: ignore[no-any-return]


def start_dual(lab: Lab, tmp_path: Path) -> AgentProcess:
    config = lab_config(tmp_path / "state").replace('targets = ["198.18.1.1", "198.18.1.2"]', DUAL_TARGETS)
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_for(
        lambda s: all(
            selected(s, f) == "fibre" and s["uplinks"]["lte"]["health"][family_name(f)]["state"] == "up"
            for f in (4, 6)
        ),
        10,
        "both uplinks up in both families",
    )
    return agent


def assert_held_after(holder: subprocess.Popen[str], back_at: float, deadline: float) -> None:
    """The held connection (lab_tools/holder.py) kept talking: every exchange ok, and 5
    after `back_at` (read as they come, bounded by the holder's 10 s and `deadline`)."""
    assert holder.stdout is not None
    exchanges: list[list[str]] = []
    while time.monotonic() < deadline and sum(float(w[0]) > back_at for w in exchanges) < 5:
        line = holder.stdout.readline()
        if not line:
            break
        exchanges.append(line.split())
    holder.terminate()
    holder.wait(timeout=5)
    assert sum(float(w[0]) > back_at for w in exchanges) >= 5, exchanges
    assert all(w[1] == "ok" for w in exchanges), exchanges


def switched_at(events: list[RouteEvent], family: int) -> float:
    """When the selection table (200) got its new default of this family."""
    times = [
        e.t for e in events if e.is_default and e.table == "200" and e.family == family and not e.deleted
    ]
    assert times, events
    return times[0]


@pytest.mark.parametrize("dead", [6, 4])
def test_one_family_failing_moves_it_alone_then_both_move(
    lab: Lab, tmp_path: Path, dead: int, record_property: Any
) -> None:
    """A silent failure of one family at isp1 moves that family to lte within the same bound
    for IPv4 and IPv6, with no route or rule event of the other family; then the other fails
    too and moves as well."""
    alive = OTHER[dead]
    agent = start_dual(lab, tmp_path)
    assert lab.connect_once(family=dead) == SOURCE[("fibre", dead)]
    moved = lab.monitor_routes(rules=True, family=dead)
    quiet = lab.monitor_routes(rules=True, family=alive)

    fault_at = time.monotonic()
    lab.silent_drop("isp1", True, family=dead)
    status = agent.wait_for(lambda s: selected(s, dead) == "lte", 5, f"{family_name(dead)} on lte")
    fibre = status["uplinks"]["fibre"]
    assert selected(status, alive) == "fibre"
    assert fibre["state"] == "up"  # the best family speaks for the uplink
    assert fibre["health"][family_name(dead)]["state"] == "down"
    assert "upstream unreachable" in fibre["health"][family_name(dead)]["reason"]
    assert fibre["health"][family_name(alive)]["state"] == "up"
    failover_s = switched_at(moved.events(), dead) - fault_at
    record_property(f"failover_ipv{dead}_s", round(failover_s, 3))
    print(f"silent failure of IPv{dead}: failover in {failover_s:.3f}s")
    assert failover_s < FAILOVER_BOUND_S
    assert lab.connect_once(family=dead) == SOURCE[("lte", dead)]
    assert lab.connect_once(family=alive) == SOURCE[("fibre", alive)]
    agent.wait_log(f"uplink=fibre family={family_name(dead)} down:")
    assert quiet.stop() == []  # not one route or rule of the other family changed

    lab.silent_drop("isp1", True, family=alive)
    status = agent.wait_for(lambda s: selected(s, alive) == "lte", 5, "both families on lte")
    assert selected(status, dead) == "lte" and status["uplinks"]["fibre"]["state"] == "down"
    assert lab.connect_once(family=alive) == SOURCE[("lte", alive)]


def test_the_routers_own_ipv6_follows_the_ipv6_selection_and_sticks(lab: Lab, tmp_path: Path) -> None:
    """IPv6 dies at isp1 while IPv4 stays: the router's own new IPv6 connections leave by
    lte, one held on lte lives through the failback, IPv4 stays on fibre all along."""
    agent = start_dual(lab, tmp_path)
    agent.wait_log("nft: installed table inet multiwan")
    assert lab.connect_once(role="router", family=6) == SOURCE[("fibre", 6)]
    lab.silent_drop("isp1", True, family=6)
    agent.wait_for(lambda s: selected(s, 6) == "lte", 5, "ipv6 on lte")
    assert lab.connect_once(role="router", family=6) == SOURCE[("lte", 6)]
    assert lab.connect_once(role="router", family=4) == SOURCE[("fibre", 4)]
    holder = lab.popen(
        "router",
        [sys.executable, str(LAB_TOOLS / "holder.py"), "--host", SERVER_IP6, "--port", str(SERVER_PORT)]
        + ["--duration-s", "10"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == f"# source {SOURCE[('lte', 6)]}"
    lab.silent_drop("isp1", False, family=6)
    agent.wait_for(lambda s: selected(s, 6) == "fibre", 5, "ipv6 back on fibre")
    back_at = time.monotonic()
    assert lab.connect_once(role="router", family=6) == SOURCE[("fibre", 6)]
    # The held connection keeps talking after the failback.
    deadline = back_at + 5
    assert_held_after(holder, back_at, deadline)


def prefix_rules(lab: Lab) -> list[str]:
    """The sources of the router's IPv6 LAN prefix rules."""
    return [f"{r['src']}/{r['srclen']}" for r in lab.rules(family=6) if r.get("srclen", 128) < 128]


def test_lan_prefixes_leave_by_their_uplink_and_fail_over_with_nat66(lab: Lab, tmp_path: Path) -> None:
    """A LAN host with an address from each ISP's prefix: each source leaves by its own ISP
    (BCP38 at both); when fibre's IPv6 dies, new connections from its prefix leave by lte,
    masqueraded (nat66), one opened then keeps its path through the failback, and no ISP
    ever drops a packet as spoofed."""
    delegated = lab.delegate_prefixes6()
    (prefix1, host1), (prefix2, host2) = delegated["isp1"], delegated["isp2"]
    config = (
        lab_config(tmp_path / "state")
        .replace('targets = ["198.18.1.1", "198.18.1.2"]', DUAL_TARGETS)
        .replace(
            "priority = 1\n", f'priority = 1\nlan_prefixes6 = ["{prefix1}"]\nlan_prefix_failover = "nat66"\n'
        )
        .replace(
            "priority = 2\n", f'priority = 2\nlan_prefixes6 = ["{prefix2}"]\nlan_prefix_failover = "nat66"\n'
        )
    )
    # Without the agent, main's RA default (wan0 first) sends isp2's prefix to isp1: dropped.
    assert lab.connect_once(family=6, source=host2, timeout=0.5) is None
    spoofed = [lab.counter(isp, "spoofed_6") for isp in ("isp1", "isp2")]
    assert spoofed[0] > 0  # BCP38 bites
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_for(
        lambda s: selected(s, 6) == "fibre" and s["uplinks"]["lte"]["health"]["ipv6"]["state"] == "up",
        10,
        "both up for IPv6",
    )
    agent.wait_log("nft: installed table inet multiwan")
    assert sorted(prefix_rules(lab)) == [prefix1, prefix2]
    # Each source leaves by its own ISP, untranslated (the other ISP would drop it).
    assert lab.connect_many(3, family=6, source=host1) == [host1] * 3
    assert lab.connect_many(3, family=6, source=host2) == [host2] * 3

    lab.silent_drop("isp1", True, family=6)
    agent.wait_for(lambda s: not s["uplinks"]["fibre"]["lan_prefixes_here"], 5, "fibre's prefix moved")
    assert selected(agent.status() or {}, 4) == "fibre"
    deadline = time.monotonic() + 5
    while prefix1 in prefix_rules(lab) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert prefix_rules(lab) == [prefix2]
    # New connections from fibre's prefix now leave by lte, masqueraded to lte's address.
    assert lab.connect_many(3, family=6, source=host1) == [SOURCE[("lte", 6)]] * 3
    assert lab.connect_many(2, family=6, source=host2) == [host2] * 2
    holder = lab.popen(
        "lan",
        [sys.executable, str(LAB_TOOLS / "holder.py"), "--host", SERVER_IP6, "--port", str(SERVER_PORT)]
        + ["--duration-s", "10", "--source", host1],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == f"# source {SOURCE[('lte', 6)]}"

    lab.silent_drop("isp1", False, family=6)
    agent.wait_for(lambda s: selected(s, 6) == "fibre", 5, "ipv6 back on fibre")
    back_at = time.monotonic()
    deadline = back_at + 5
    while prefix1 not in prefix_rules(lab) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lab.connect_many(3, family=6, source=host1) == [host1] * 3  # its own path again
    # The connection masqueraded by lte keeps lte (its mark beats the prefix rule).
    assert_held_after(holder, back_at, deadline)
    assert [lab.counter(isp, "spoofed_6") for isp in ("isp1", "isp2")] == spoofed  # none since


def test_an_ra_gateway_change_is_followed_in_ipv6_alone(lab: Lab, tmp_path: Path) -> None:
    """isp1's router moves to fe80::2 (a new RA): fibre's IPv6 table follows, IPv6 still
    leaves by fibre once fe80::1 is gone, and IPv4 sees no route or rule event."""
    agent = start_dual(lab, tmp_path)
    quiet = lab.monitor_routes(rules=True, family=4)
    lab.ip("isp1", "-6", "addr", "add", "fe80::2/64", "dev", "cpe", "nodad")
    ra = ["::/0", "via", "fe80::2", "dev", "wan0", "proto", "ra", "metric", "1024"]
    lab.ip("router", "-6", "route", "replace", *ra)
    agent.wait_log("gateway6 fe80::1 -> fe80::2")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and lab.uplink_default("201", family=6)[0].get("gateway") != "fe80::2":
        time.sleep(0.02)
    assert lab.uplink_default("201", family=6)[0]["gateway"] == "fe80::2"
    assert lab.default_routes("router", "200", family=6)[0]["gateway"] == "fe80::2"
    lab.ip("isp1", "-6", "addr", "del", "fe80::1/64", "dev", "cpe")
    assert lab.connect_once(family=6) == SOURCE[("fibre", 6)]
    status = agent.status() or {}
    assert selected(status, 6) == "fibre" and status["uplinks"]["fibre"]["health"]["ipv6"]["state"] == "up"
    assert quiet.stop() == []
