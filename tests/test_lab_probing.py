"""The probing engine in the netns lab: adaptive timeouts, confirmation bursts, passive
health from LAN traffic, and a steady probe rate. Timing bars are measured in
tests/bench/probing.py; here the bounds are loose enough for a loaded 2-core machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_proc import AgentProcess, lab_config
from lab import Lab

pytestmark = pytest.mark.lab

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"
SLOW_ECHO = Path(__file__).resolve().parent / "lab_tools" / "slow_echo.py"
#: Destinations of the LAN traffic (echo servers in inet), one per new connection in turn.
SERVERS = ("198.18.1.21", "198.18.1.22", "198.18.1.23", "198.18.1.24")


def production_config(state_dir: Path, interval: str = "1s", extra_check: str = "") -> str:
    """Production-like timing: interval 1 s, timeout 1 s, fall 3, rise 3."""
    config = lab_config(state_dir, hysteresis="1s", interval=interval, timeout="1s")
    return config.replace("rise = 3\n", f"rise = 3\n{extra_check}", 1)


def count_t1(lab: Lab) -> int:
    out = lab.run("isp1", "nft", "-j", "list", "counter", "inet", "count", "t1").stdout
    return next(int(i["counter"]["packets"]) for i in json.loads(out)["nftables"] if "counter" in i)


def wait_default_via(lab: Lab, device: str, timeout: float) -> float:
    """The monotonic time the selection table's default first points through `device`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded by `timeout`
        routes = lab.default_routes("router", "200")
        if routes and routes[0].get("dev") == device:
            return time.monotonic()
        time.sleep(0.01)
    raise AssertionError(f"the default did not move to {device} within {timeout}s: {routes}")


def test_a_silent_failure_is_confirmed_by_a_burst_inside_the_round_counting_bound(
    lab: Lab, tmp_path: Path
) -> None:
    agent = AgentProcess(lab, tmp_path, production_config(tmp_path / "state"))
    agent.wait_both_up(timeout=15)
    # A ~1 ms path: after a few answers the probes wait timeout_min (200 ms), not 1 s.
    status = agent.wait_for(
        lambda s: set(s["uplinks"]["fibre"]["timeouts_ms"].values()) == {200.0}, 10, "adaptive timeouts"
    )
    assert status["uplinks"]["fibre"]["burst"] is None
    # A healthy uplink's regular rounds ping no gateway: only the targets, two rounds' worth.
    lab.nft(
        "isp1",
        "table inet gw {\n counter pings { packets 0 bytes 0 }\n"
        " chain input {\n  type filter hook input priority -20;\n"
        '  iifname "cpe" icmp type echo-request counter name pings\n }\n}\n',
    )
    targets_before = lab.counter("isp1", "t1")
    time.sleep(2.1)  # a measuring window of two rounds, not a wait for a condition
    pings = lab.run("isp1", "nft", "-j", "list", "counter", "inet", "gw", "pings").stdout
    gateway_pings = next(
        int(i["counter"]["packets"]) for i in json.loads(pings)["nftables"] if "counter" in i
    )
    assert gateway_pings == 0 and lab.counter("isp1", "t1") - targets_before >= 2, gateway_pings
    fault_at = time.monotonic()
    lab.silent_drop("isp1", True)
    moved_at = wait_default_via(lab, "wan1", timeout=6)
    # Round counting needs fall x interval + timeout = 4 s at worst; a burst needs a round
    # (at most 1 s away), its 200 ms timeout and two more 200 ms confirmations.
    assert moved_at - fault_at < 2.5, moved_at - fault_at
    # "upstream": the burst rounds pinged the gateway, and it answered.
    agent.wait_log("uplink=fibre down: burst confirmed 3/3 after a failed round: upstream unreachable")
    assert lab.connect_once() == LTE_IP
    lab.silent_drop("isp1", False)
    agent.wait_log("uplink=fibre up: burst confirmed 3/3 after a good round", timeout=10)
    agent.wait_selected("fibre", timeout=5)


def test_passive_health_suspects_a_dead_uplink_from_lan_traffic_and_a_burst_confirms(
    lab: Lab, tmp_path: Path
) -> None:
    lab.add_servers(SERVERS)
    # A long interval, so that the live traffic, not the next round, sees the failure first.
    agent = AgentProcess(lab, tmp_path, production_config(tmp_path / "state", interval="3s"))
    agent.wait_both_up(timeout=20)
    connector = lab.start_connector(60, period_ms=50, timeout_ms=300, hosts=SERVERS)
    agent.wait_for(
        lambda s: (s["uplinks"]["fibre"]["passive"] or {}).get("state") == "answered", 10, "passive signal"
    )
    assert agent.status()["uplinks"]["lte"]["passive"]["state"] == "idle"  # it carries nothing
    fault_at = time.monotonic()
    lab.silent_drop("isp1", True)
    moved_at = wait_default_via(lab, "wan1", timeout=8)
    assert moved_at - fault_at < 2.0, moved_at - fault_at  # round counting: up to 10 s here
    agent.wait_log("uplink=fibre suspect: ")
    agent.wait_log("uplink=fibre down: burst confirmed 3/3 after passive suspicion (")
    lab.silent_drop("isp1", False)
    connector.stop()


def test_a_lan_port_scan_through_the_uplink_never_takes_it_down(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, production_config(tmp_path / "state"))
    agent.wait_both_up(timeout=15)
    # 1,000 ports, 100 half-open connections at a time, as a scanner does.
    scan = (
        "import socket, sys, time\n"
        "for first in range(20000, 21000, 100):\n"
        "    socks = [socket.socket() for _ in range(100)]\n"
        "    for port, s in zip(range(first, first + 100), socks):\n"
        "        s.setblocking(False); s.connect_ex((sys.argv[1], port))\n"
        "    time.sleep(0.1)\n"
        "    for s in socks: s.close()\n"
    )
    # Closed ports (each answered by a RST), then filtered ones (no answer at all).
    lab.run("lan", sys.executable, "-c", scan, "198.18.1.10", timeout=60)
    lab.nft(
        "inet",
        "table inet scan {\n chain input {\n  type filter hook input priority 0;\n"
        "  tcp dport 20000-20999 drop\n }\n}\n",
    )
    lab.run("lan", sys.executable, "-c", scan, "198.18.1.10", timeout=60)
    time.sleep(1.0)  # let passive health judge the filtered ones (its timeout is 300 ms)
    status = agent.status()
    assert status is not None
    fibre = status["uplinks"]["fibre"]
    assert fibre["state"] == "up" and status["selected"] == "fibre", fibre
    assert fibre["passive"]["suspicions"] == 0, fibre["passive"]  # one destination is no dead path
    log = agent.log()
    assert "uplink=fibre down" not in log and "uplink=fibre suspect" not in log


def test_five_percent_loss_for_a_minute_no_switch_no_sustained_burst_steady_rate(
    lab: Lab, tmp_path: Path
) -> None:
    agent = AgentProcess(lab, tmp_path, production_config(tmp_path / "state", interval="250ms"))
    agent.wait_both_up(timeout=15)
    # Counted where the probes arrive at the ISP, before its 5 % loss.
    lab.nft(
        "isp1",
        "table inet count {\n counter t1 { packets 0 bytes 0 }\n"
        " chain forward {\n  type filter hook forward priority -20;\n"
        '  iifname "cpe" ip daddr 198.18.1.1 counter name t1\n }\n}\n',
    )
    lab.loss("isp1", 5)
    before = count_t1(lab)
    began = time.monotonic()
    bursting = 0
    deadline = began + 60
    while time.monotonic() < deadline:  # bounded: 60 s
        status = agent.status()
        assert status is not None and status["selected"] == "fibre", status
        assert status["uplinks"]["fibre"]["state"] == "up", status["uplinks"]["fibre"]
        bursting += status["uplinks"]["fibre"]["burst"] is not None
        time.sleep(0.5)
    sent = count_t1(lab) - before
    elapsed = time.monotonic() - began
    log = agent.log()
    burst_rounds = log.count("burst(")  # -v round lines of burst rounds
    assert "uplink=fibre degraded" not in log and "uplink=fibre down" not in log
    # The loss was real: about 5 % of 2 targets x 240 rounds went unanswered (-v round lines).
    lost = log.count("=timeout")
    assert 0 < lost < 0.15 * 2 * 240, lost
    assert bursting <= 3, bursting  # a burst is a few hundred ms, never a state
    # One probe per round to each target: the regular rounds are within 5 % of 4 a second.
    regular_rate = (sent - burst_rounds) / elapsed
    assert abs(regular_rate - 4.0) <= 0.2, (sent, burst_rounds, elapsed)


def test_an_rtt_that_jumps_past_the_adaptive_timeout_is_late_not_lost(lab: Lab, tmp_path: Path) -> None:
    delay = tmp_path / "delay_ms"
    delay.write_text("0")
    # The targets answer from slow_echo.py instead of the kernel: the lab's way to add latency.
    lab.run("inet", "sysctl", "-q", "-w", "net.ipv4.icmp_echo_ignore_all=1")
    responder = lab.popen(
        "inet",
        [
            sys.executable, str(SLOW_ECHO), "--address", "198.18.1.1", "--address", "198.18.1.2",
            "--delay-file", str(delay), "--duration-s", "120",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert responder.stdout is not None and responder.stdout.readline().strip() == "ready"
    agent = AgentProcess(lab, tmp_path, production_config(tmp_path / "state", interval="500ms"))
    agent.wait_both_up(timeout=15)
    agent.wait_for(
        lambda s: set(s["uplinks"]["fibre"]["timeouts_ms"].values()) == {200.0}, 10, "adaptive timeouts"
    )
    delay.write_text("400")  # 1 ms -> 400 ms at once: past the 200 ms timeout, inside the 1 s ceiling
    status = agent.wait_for(
        lambda s: min(s["uplinks"]["fibre"]["timeouts_ms"].values()) > 400, 15, "the timeout learned"
    )
    fibre = status["uplinks"]["fibre"]
    assert fibre["late_replies"] >= 1, fibre
    assert fibre["loss_pct"] == 0.0, fibre  # late, not lost
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # bounded: 5 s more at 400 ms
        status = agent.status()
        assert status is not None and status["uplinks"]["fibre"]["state"] == "up", status
        time.sleep(0.2)
    assert status["selected"] == "fibre"
    log = agent.log()
    assert "uplink=fibre down" not in log and "uplink=lte down" not in log


def test_64_uplinks_start_probe_and_fail_over(lab: Lab, tmp_path: Path) -> None:
    extra = lab.add_extra_uplinks(62)  # wan2..wan63 through isp1, like fibre
    config = production_config(tmp_path / "state", interval="500ms")
    config += "".join(
        f'\n[[uplink]]\nname = "x{n}"\ninterface = "{dev}"\ngateway = "{gateway}"\npriority = {n + 1}\n'
        for n, (dev, _address, gateway) in enumerate(extra, start=2)
    )
    agent = AgentProcess(lab, tmp_path, config)
    status = agent.wait_for(
        lambda s: sum(u["state"] == "up" for u in s["uplinks"].values()) == 64, 30, "64 uplinks up"
    )
    assert status["selected"] == "fibre"
    fault_at = time.monotonic()
    lab.silent_drop("isp1", True)  # fibre and the 62 others: only lte (isp2) is left
    moved_at = wait_default_via(lab, "wan1", timeout=10)
    assert moved_at - fault_at < 3.0, moved_at - fault_at
    agent.wait_for(
        lambda s: sum(u["state"] == "down" for u in s["uplinks"].values()) == 63, 10, "63 uplinks down"
    )
    assert lab.connect_once() == LTE_IP
    lab.silent_drop("isp1", False)
    agent.wait_selected("fibre", timeout=15)
