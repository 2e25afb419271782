"""Fault injection in the netns lab (issue 12): kernel refusals, restarts, flaps, reload storms
and a big conntrack table, each ending with the right uplink selected, nothing of others
touched and no moment without a default route.

Cases that exist elsewhere and are not repeated here: a hanging nft (from the start and at
runtime) and a failing nft (test_lab_daemon.py), a foreign rule at runtime
(test_lab_daemon.py), a SIGHUP storm of good reloads during a failure (test_lab_daemon.py),
the backup's interface deleted and re-created (test_lab_agent.py), SIGTERM and restart
(test_lab_agent.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from agent_proc import AgentProcess, hup_storm, lab_config
from lab import SERVER_IP, Lab, RouteMonitor

pytestmark = pytest.mark.lab

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"
POLICY = (
    '\n[[policy]]\nname = "web"\nmatch = { protocol = "tcp", dst_port = 443 }\nuplinks = ["fibre", "lte"]\n'
)


# Others' objects ###############################################################


def add_others(lab: Lab) -> None:
    """Objects of others in the router: a rule, a route in their own table, an nft table."""
    lab.ip("router", "rule", "add", "priority", "4000", "fwmark", "0x7", "lookup", "77")
    lab.ip("router", "route", "add", "default", "via", "203.0.113.1", "table", "77")
    lab.nft(
        "router", "table inet others {\n  chain input {\n    type filter hook input priority 5;\n  }\n}\n"
    )


def others(lab: Lab) -> tuple[Any, ...]:
    """Everything of others in the router (for a before/after comparison)."""
    main = [
        r for r in lab.ip_json("router", "-4", "route", "show", "table", "main") if r.get("dst") != "default"
    ]
    return (
        lab.ip("router", "rule", "show", "priority", "4000"),
        lab.ip("router", "-4", "route", "show", "table", "77"),
        lab.run("router", "nft", "list", "table", "inet", "others").stdout,
        main,
        [r for r in lab.default_routes("router", "main") if r.get("protocol") == "dhcp"],
    )


def assert_never_without_default(monitor: RouteMonitor) -> None:
    """No default route of the selection table or of main was ever deleted (every switch a replace)."""
    deleted = [e.line for e in monitor.deleted_defaults(family=4) if e.table in ("200", "main")]
    assert deleted == [], deleted


def selected_dev(lab: Lab) -> str | None:
    routes = lab.default_routes("router", "200")
    return routes[0].get("dev") if routes else None


# Cases ########################################################################


def test_a_gateway_the_kernel_refuses_is_reported_and_retried_until_it_is_on_link(
    lab: Lab, tmp_path: Path
) -> None:
    add_others(lab)
    before = others(lab)
    monitor = lab.monitor_routes("router")
    # lte's static gateway is not on any prefix of wan1: the kernel refuses every route via it
    config = lab_config(tmp_path / "state").replace(
        'interface = "wan1"\ngateway = "auto"', 'interface = "wan1"\ngateway = "203.0.113.200"'
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_selected("fibre")
    status = agent.wait_for(lambda s: s["route_failures"] != [], 5, "the refused route in status")
    assert any("203.0.113.200" in f or "wan1" in f for f in status["route_failures"]), status
    # and a foreign route appears in the agent's own table meanwhile: reported, left alone
    lab.ip("router", "route", "add", "198.18.7.0/24", "dev", "wan0", "table", "201")
    agent.wait_log("foreign object: ipv4 route 198.18.7.0/24 in table 201")
    lab.silent_drop("isp1", True)
    agent.wait_state("fibre", "down", timeout=5)
    time.sleep(0.5)  # a few retries of the refused route: none may take fibre's default away
    assert selected_dev(lab) == "wan0"  # lte cannot carry: the last working path stays
    assert agent.proc.poll() is None
    # The fault is transient: once the gateway is on-link the retry (back-off <= 30 s,
    # hastened by the address event) installs the route without a reload.
    lab.ip("isp2", "addr", "add", "203.0.113.200/25", "dev", "cpe")
    lab.ip("router", "addr", "add", "203.0.113.201/25", "dev", "wan1")
    agent.wait_for(lambda s: s["route_failures"] == [], 35, "the route installed")
    agent.wait_log("no longer fails", timeout=5)
    assert agent.log().count("203.0.113.200") >= 1 and "retrying with back-off" in agent.log()
    lab.silent_drop("isp1", False)
    agent.wait_both_up(timeout=15)
    assert "198.18.7.0/24" in lab.ip("router", "route", "show", "table", "201")  # never deleted
    lab.ip("router", "route", "del", "198.18.7.0/24", "dev", "wan0", "table", "201")
    lab.ip("router", "addr", "del", "203.0.113.201/25", "dev", "wan1")
    lab.ip("isp2", "addr", "del", "203.0.113.200/25", "dev", "cpe")
    agent.wait_selected("fibre")
    assert_never_without_default(monitor)
    monitor.stop()
    assert agent.stop() == 0
    assert others(lab) == before


def test_sigkill_on_the_backup_and_restart_never_use_another_egress(lab: Lab, tmp_path: Path) -> None:
    add_others(lab)
    before = others(lab)
    config = lab_config(tmp_path / "state", hysteresis="500ms")
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    monitor = lab.monitor_routes("router", rules=True)
    agent.signal(signal.SIGKILL)
    agent.proc.wait(timeout=5)
    agent.stop()
    assert selected_dev(lab) == "wan1"  # a killed agent leaves its routes
    again = AgentProcess(lab, tmp_path, config, name="agent2")
    again.wait_for(lambda s: s["running"] and s["selected"] == "lte", 10, "restarted on lte")
    again.wait_state("fibre", "down", timeout=5)
    # While fibre is still failing, not one route of the selection table went through wan0.
    assert [e.line for e in monitor.events() if e.table == "200" and "wan0" in e.line] == []
    assert selected_dev(lab) == "wan1"
    lab.silent_drop("isp1", False)
    again.wait_both_up(timeout=10)
    events = monitor.stop()
    assert_never_without_default(monitor)
    assert not [e.line for e in events if e.line.startswith("Deleted") and "lookup 200" in e.line]
    assert again.stop() == 0
    assert others(lab) == before


def nft_missing_env(tmp_path: Path) -> dict[str, str]:
    """A PATH without nft (only `ip`, which `ip netns exec` itself needs)."""
    directory = tmp_path / "bin-without-nft"
    directory.mkdir()
    (directory / "ip").symlink_to("/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "/sbin/ip")
    return dict(os.environ, PATH=str(directory))


def test_a_missing_nft_is_reported_and_routing_fails_over_and_back(lab: Lab, tmp_path: Path) -> None:
    add_others(lab)
    before = others(lab)
    monitor = lab.monitor_routes("router")
    agent = AgentProcess(
        lab,
        tmp_path,
        lab_config(tmp_path / "state", hysteresis="500ms", extra=POLICY),
        env=nft_missing_env(tmp_path),
    )
    agent.wait_both_up()
    status = agent.wait_for(lambda s: s["nft"]["problem"] is not None, 10, "the missing nft in status")
    assert not status["nft"]["installed"], status["nft"]
    lab.carrier("isp1", False)
    agent.wait_selected("lte", timeout=5)
    assert lab.connect_once() == LTE_IP
    lab.carrier("isp1", True)
    agent.wait_both_up(timeout=10)
    assert lab.connect_once() == FIBRE_IP
    assert_never_without_default(monitor)
    monitor.stop()
    assert "Traceback" not in agent.log()
    assert agent.stop() == 0
    assert others(lab) == before


def test_a_sighup_storm_of_good_and_bad_configs_during_a_failover(lab: Lab, tmp_path: Path) -> None:
    add_others(lab)
    before = others(lab)
    good = lab_config(tmp_path / "state", hysteresis="500ms", interval="200ms", timeout="200ms")
    bad = lab_config(tmp_path / "state", interval="soon")
    agent = AgentProcess(lab, tmp_path, good)
    agent.wait_both_up()
    monitor = lab.monitor_routes("router")
    with hup_storm(agent, (good, bad), 40):  # 40 SIGHUPs in 4 s, every other config does not parse
        time.sleep(0.8)
        fault = time.monotonic()
        lab.silent_drop("isp1", True)
        moved = agent.wait_selected("lte", timeout=10)
    # fall x interval + timeout, one more round for a reload, and slack for a loaded machine
    assert moved["uplinks"]["fibre"]["since_monotonic"] - fault <= 3 * 0.2 + 0.2 + 0.2 + 1.0
    agent.config_path.write_text(good)
    agent.signal(signal.SIGHUP)
    lab.silent_drop("isp1", False)
    agent.wait_both_up(timeout=10)
    log = agent.log()
    assert agent.proc.poll() is None and "Traceback" not in log
    assert log.count("reload rejected") >= 3 and log.count("reloaded ") >= 3, log[-3000:]
    assert_never_without_default(monitor)
    monitor.stop()
    assert agent.stop() == 0
    assert others(lab) == before


def test_the_new_uplinks_interface_deleted_during_the_switch_and_re_created(lab: Lab, tmp_path: Path) -> None:
    add_others(lab)
    before = others(lab)
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="500ms"))
    agent.wait_both_up()
    monitor = lab.monitor_routes("router")
    lab.carrier("isp1", False)  # the switch to lte starts at once (a link event) ...
    lab.ip("isp2", "link", "del", "cpe")  # ... and lte's wan1 goes in the middle of it
    agent.wait_for(lambda s: s["uplinks"]["lte"]["state"] == "down", 5, "lte gone")
    assert agent.proc.poll() is None
    # Re-created (new ifindex), as a USB modem would be: the agent moves to it.
    lab.ip("isp2", "link", "add", "cpe", "type", "veth", "peer", "name", "wan1", "netns", lab.name("router"))
    lab.ip("isp2", "addr", "add", "203.0.113.5/30", "dev", "cpe")
    lab.ip("isp2", "link", "set", "cpe", "up")
    lab.ip("router", "addr", "add", "203.0.113.6/30", "dev", "wan1")
    lab.ip("router", "link", "set", "wan1", "up")
    lab.ip(
        "router",
        "route",
        "add",
        "default",
        "via",
        "203.0.113.5",
        "dev",
        "wan1",
        "proto",
        "dhcp",
        "metric",
        "200",
    )
    agent.wait_selected("lte", timeout=10)
    assert lab.connect_once() == LTE_IP
    lab.carrier("isp1", True)
    agent.wait_both_up(timeout=10)
    events = monitor.stop()
    # The kernel itself removes the routes through a deleted interface; the agent deletes none.
    deleted = [
        e.line for e in events if e.deleted and e.is_default and e.family == 4 and e.table in ("200", "main")
    ]
    assert all("dev wan1" in line for line in deleted), deleted
    assert agent.stop() == 0
    assert others(lab) == before


def test_a_flapping_carrier_switches_no_more_than_rise_and_hysteresis_allow(lab: Lab, tmp_path: Path) -> None:
    # The flap (down/up every 2 s for a minute at 1 s probes) scaled to 100 ms probes:
    # down/up every 200 ms for 6 s. Up for 200 ms never reaches rise (3 x 100 ms) plus the
    # hysteresis (500 ms), so fibre is never re-selected during the flap.
    add_others(lab)
    before = others(lab)
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="500ms"))
    agent.wait_both_up()
    monitor = lab.monitor_routes("router")
    began = time.monotonic()
    for _ in range(15):
        lab.carrier("isp1", False)
        time.sleep(0.2)
        lab.carrier("isp1", True)
        time.sleep(0.2)
    flap_end = time.monotonic()
    lab.carrier("isp1", False)
    agent.wait_selected("lte", timeout=5)
    lab.carrier("isp1", True)
    agent.wait_both_up(timeout=10)
    events = monitor.stop()
    # A switch is a change of the selection table's device; the same route written again
    # (a reconcile after a link event) is none.
    devs = [
        "wan0" if "dev wan0" in e.line else "wan1"
        for e in events
        if began <= e.t <= flap_end and e.table == "200" and e.is_default and not e.deleted
    ]
    switches = [(a, b) for a, b in zip(["wan0", *devs], devs, strict=False) if a != b]
    # one failover, and (up for 200 ms never earns rise + hysteresis) no failback
    assert switches in ([], [("wan0", "wan1")]), [e.line for e in events]
    assert_never_without_default(monitor)
    assert agent.stop() == 0
    assert others(lab) == before


FLOWS = 10_000
#: The 3-minute soak beside the suite: its lab, 3 minutes, its checks, and slack.
SOAK_WAIT_S = 420.0
FLOODER = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 20000 + int(sys.argv[2])):
    s.sendto(b"x", (sys.argv[1], port))
"""


def conntrack_count(lab: Lab, mark: str) -> int:
    listed = lab.run("router", "conntrack", "-L", "-m", mark, check=False, timeout=30)
    return sum(1 for line in listed.stdout.splitlines() if line.startswith(("udp", "tcp", "icmp")))


def agent_cpu_s(agent: AgentProcess) -> float:
    fields = Path(f"/proc/{agent.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_10000_tracked_flows_fail_over_and_release_in_bounded_time(lab: Lab, tmp_path: Path) -> None:
    add_others(lab)
    before = others(lab)
    config = lab_config(tmp_path / "state", hysteresis="500ms").replace(
        "priority = 1\n", 'priority = 1\nrelease_flows = "on_down"\n', 1
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    lab.run("lan", sys.executable, "-c", FLOODER, SERVER_IP, str(FLOWS), timeout=30)
    marked = conntrack_count(lab, "0x100/0xff00")
    assert marked >= FLOWS * 0.95, marked
    monitor = lab.monitor_routes("router")
    cpu_before = agent_cpu_s(agent)
    fault = time.monotonic()
    lab.carrier("isp1", False)
    moved = agent.wait_selected("lte", timeout=5)
    failover_s = moved["updated_monotonic"] - fault
    agent.wait_log("uplink=fibre released", timeout=30)
    released_s = time.monotonic() - fault
    cpu_s = agent_cpu_s(agent) - cpu_before
    left = conntrack_count(lab, "0x100/0xff00")
    print(
        f"\n{marked} flows: failover {failover_s:.3f}s, released within {released_s:.3f}s, "
        f"agent CPU {cpu_s:.3f}s"
    )
    assert failover_s < 1.0 and released_s < 10.0 and cpu_s < 5.0, (failover_s, released_s, cpu_s)
    assert left < marked * 0.05, left
    lab.carrier("isp1", True)
    agent.wait_both_up(timeout=10)
    assert_never_without_default(monitor)
    monitor.stop()
    assert agent.stop() == 0
    assert others(lab) == before


def test_a_3_minute_soak_of_random_faults_grows_nothing_and_settles_on_fibre() -> None:
    """tests/bench/soak.py for 3 minutes, started beside the suite (conftest.py) as soon as
    the tests are collected; this waits for its verdict.

    RSS: 3 minutes still hold the allocator's warm-up (a 10-minute soak's slope fell under
    1 MB/10 min; a 3-minute one's first minutes read ~5): this run is held to 10 MB per 10
    minutes, a leak of one object per probe, and fds, threads and tasks to no growth at all."""
    from conftest import background_soak, lab_unavailable_reason

    reason = lab_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    started = background_soak()
    assert started is not None, "conftest.py did not start the soak beside the suite"
    proc, log = started
    try:
        proc.wait(timeout=SOAK_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the soak did not end within {SOAK_WAIT_S:g}s:\n{log.read_text()}")
    report = log.read_text()
    print("\n" + report)
    assert proc.returncode == 0, report
