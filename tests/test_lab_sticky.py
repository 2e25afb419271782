"""Connections that survive a switch: connmark stickiness through the agent's nft table."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_proc import AgentProcess, lab_config
from lab import LAB_TOOLS, SERVER_IP, SERVER_PORT, Lab

pytestmark = pytest.mark.lab

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"


def hold(lab: Lab, seconds: float, role: str = "lan") -> subprocess.Popen[str]:
    proc = lab.popen(
        role,
        [
            sys.executable,
            str(LAB_TOOLS / "holder.py"),
            "--host",
            SERVER_IP,
            "--port",
            str(SERVER_PORT),
            "--duration-s",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc


def conntrack_count(lab: Lab) -> int:
    out = lab.run("router", "conntrack", "-C", check=False).stdout.strip()
    return int(out) if out.isdigit() else 0


def failover_to_lte(lab: Lab, agent: AgentProcess) -> None:
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)


def test_a_connection_opened_on_the_backup_lives_through_the_failback(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="500ms"))
    agent.wait_log("nft: installed table inet multiwan")
    agent.wait_selected("fibre")
    failover_to_lte(lab, agent)
    holder = hold(lab, 10)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == f"# source {LTE_IP}"
    # status counts the tracked connections that stick to each uplink
    agent.wait_for(lambda s: (s["uplinks"]["lte"]["connections"] or 0) >= 1, 12, "a connection on lte")
    before = conntrack_count(lab)
    lab.silent_drop("isp1", False)
    agent.wait_selected("fibre", timeout=5)
    assert lab.connect_once() == FIBRE_IP  # new connections take the preferred uplink again
    time.sleep(1.0)  # the held connection keeps talking after the switch
    holder.terminate()
    lines = holder.stdout.read().splitlines()
    holder.wait(timeout=5)
    exchanges = [line.split() for line in lines if line and not line.startswith("#")]
    assert len(exchanges) >= 10, lines
    assert all(words[1] == "ok" for words in exchanges), lines  # zero failed round trips
    # No switch flushes conntrack (a flush would leave only the few entries made since).
    assert before > 0 and conntrack_count(lab) > before // 2


def test_the_table_comes_back_after_another_firewalls_full_reload(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="500ms"))
    agent.wait_log("nft: installed table inet multiwan")
    agent.wait_selected("fibre")
    # Another firewall reloads: flush everything, then put its own rules back.
    labnat = lab.run("router", "nft", "list", "table", "ip", "labnat").stdout
    lab.nft("router", "flush ruleset\n" + labnat)
    t0 = time.monotonic()
    while lab.run("router", "nft", "list", "table", "inet", "multiwan", check=False).returncode != 0:
        assert time.monotonic() - t0 < 1.0, "not re-installed within one probe interval"
        time.sleep(0.01)
    agent.wait_log("nft: table inet multiwan is gone; re-installing")
    # and stickiness works again
    failover_to_lte(lab, agent)
    holder = hold(lab, 4)
    assert holder.stdout is not None and holder.stdout.readline().strip() == f"# source {LTE_IP}"
    lab.silent_drop("isp1", False)
    agent.wait_selected("fibre", timeout=5)
    time.sleep(0.5)
    holder.terminate()
    lines = holder.stdout.read().splitlines()
    holder.wait(timeout=5)
    exchanges = [line.split() for line in lines if line and not line.startswith("#")]
    assert len(exchanges) >= 5 and all(words[1] == "ok" for words in exchanges), lines


def test_nat_follows_the_path_and_excluded_destinations_are_not_natted(lab: Lab, tmp_path: Path) -> None:
    lab.run("router", "nft", "delete", "table", "ip", "labnat")  # the agent does NAT now
    assert lab.connect_once(timeout=0.5) is None  # without NAT, the ISPs drop the LAN's source (BCP38)
    config = (
        lab_config(tmp_path / "state", hysteresis="300ms")
        .replace("priority = 1\n", "priority = 1\nnat = true\n", 1)
        .replace("priority = 2\n", "priority = 2\nnat = true\n", 1)
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_log("nft: installed table inet multiwan")
    agent.wait_selected("fibre")
    assert lab.connect_once() == FIBRE_IP
    failover_to_lte(lab, agent)
    assert lab.connect_once() == LTE_IP  # the next new connection leaves with the new uplink's address
    # Another firewall's full reload takes the agent's NAT with it; it is back within one interval.
    lab.nft("router", "flush ruleset\n")
    flushed = time.monotonic()
    while lab.connect_once(timeout=0.2) != LTE_IP:
        assert time.monotonic() - flushed < 1.0, "NAT not back within one probe interval"
    agent.stop()
    excluded = config.replace(
        "priority = 2\nnat = true\n", 'priority = 2\nnat = true\nnat_exclude = ["198.18.1.10/32"]\n'
    )
    again = AgentProcess(lab, tmp_path, excluded, name="excluded")
    again.wait_log("nft: installed table inet multiwan")
    assert lab.connect_once(timeout=0.5) is None  # routed without NAT: isp2 drops the LAN source
    assert lab.counter("isp2", "spoofed") > 0


def exchanges_of(holder: subprocess.Popen[str]) -> list[list[str]]:
    holder.terminate()
    assert holder.stdout is not None
    lines = holder.stdout.read().splitlines()
    holder.wait(timeout=5)
    return [line.split() for line in lines if line and not line.startswith("#")]


def test_the_routers_own_connections_follow_the_selection_and_stick(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="500ms"))
    agent.wait_log("nft: installed table inet multiwan")
    agent.wait_both_up()
    assert lab.connect_once(role="router") == FIBRE_IP
    failover_to_lte(lab, agent)
    assert lab.connect_once(role="router") == LTE_IP  # follows the selection
    holder = hold(lab, 10, role="router")
    assert holder.stdout is not None and holder.stdout.readline().strip() == f"# source {LTE_IP}"
    lab.silent_drop("isp1", False)
    agent.wait_selected("fibre", timeout=5)
    assert lab.connect_once(role="router") == FIBRE_IP  # new ones take the preferred uplink again
    time.sleep(0.5)  # the held connection keeps talking after the switch
    exchanges = exchanges_of(holder)
    assert len(exchanges) >= 5 and all(words[1] == "ok" for words in exchanges), exchanges


def test_failure_of_an_idle_uplink_disturbs_no_connection_of_the_others(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="500ms"))
    agent.wait_both_up()
    holder = hold(lab, 10)
    assert holder.stdout is not None and holder.stdout.readline().strip() == f"# source {FIBRE_IP}"
    lab.carrier("isp2", False)  # the backup, carrying nothing, loses its link
    agent.wait_state("lte", "down", timeout=5)
    lab.carrier("isp2", True)
    agent.wait_state("lte", "up", timeout=5)
    time.sleep(0.5)  # and fibre's connection keeps talking afterwards
    exchanges = exchanges_of(holder)
    assert len(exchanges) >= 5 and all(words[1] == "ok" for words in exchanges), exchanges
