"""Smoke tests of the namespace lab itself (not of the agent)."""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable

import pytest
from lab import (
    ISPS,
    PROBE_TARGETS,
    PROBE_TARGETS6,
    SERVER_IP,
    SERVER_IP6,
    SERVER_PORT,
    Lab,
    RouteEvent,
    lab_namespaces,
)

pytestmark = pytest.mark.lab

WAN0_IP = ISPS["isp1"].router_ip
WAN1_IP = ISPS["isp2"].router_ip
WAN0_IP6 = ISPS["isp1"].router_ip6
WAN1_IP6 = ISPS["isp2"].router_ip6


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def ping(lab: Lab, *args: str, wait_s: float = 1.0) -> bool:
    if shutil.which("ping") is None:
        pytest.fail("ping (iputils-ping) is not installed")
    return lab.run("router", "ping", "-n", "-c1", f"-W{wait_s:g}", *args, check=False).returncode == 0


def ping6(lab: Lab, *args: str, wait_s: float = 1.0) -> bool:
    return ping(lab, "-6", *args, wait_s=wait_s)


def gateway_lladdr(lab: Lab, dev: str = "wan0") -> str | None:
    """The link-layer address the router resolved for fe80::1 on dev, if any."""
    entries = lab.ip_json("router", "-6", "neigh", "show", "fe80::1", "dev", dev)
    return entries[0].get("lladdr") if entries else None


def counters(lab: Lab, name: str) -> tuple[int, int]:
    return lab.counter("isp1", name), lab.counter("isp2", name)


def test_lan_reaches_server_through_wan0_with_nat(lab: Lab) -> None:
    routes = sorted((r["dev"], r["gateway"], r["metric"]) for r in lab.default_routes())
    assert routes == [("wan0", "203.0.113.1", 100), ("wan1", "203.0.113.5", 200)]
    srv_before = counters(lab, "srv")
    assert lab.connect_once() == WAN0_IP
    isp1_srv, isp2_srv = counters(lab, "srv")
    assert isp1_srv > srv_before[0] and isp2_srv == srv_before[1]


def test_lan_reaches_server6_through_wan0_with_nat66(lab: Lab) -> None:
    routes = sorted(
        (r["dev"], r["gateway"], r["protocol"], r["metric"]) for r in lab.default_routes(family=6)
    )
    assert routes == [("wan0", "fe80::1", "ra", 1024), ("wan1", "fe80::1", "ra", 1025)]
    srv_before = counters(lab, "srv_6")
    # The very first IPv6 connection of a fresh lab must not lose a packet
    # (a lost SYN costs 1 s): every link is IPv6-ready when build() returns.
    assert lab.connect_once(timeout=0.5, family=6) == WAN0_IP6
    isp1_srv, isp2_srv = counters(lab, "srv_6")
    assert isp1_srv > srv_before[0] and isp2_srv == srv_before[1]
    assert counters(lab, "srv") == (0, 0)  # IPv6 is not counted as IPv4
    assert lab.ip_json("lan", "-6", "route", "show", "default")[0]["gateway"] == "2001:db8:100::1"
    assert lab.rules(family=6) and lab.default_routes(table="1234", family=6) == []


@pytest.mark.lab(dhcp_defaults=False)
def test_without_dhcp_defaults_there_is_no_default_route(lab: Lab) -> None:
    assert lab.default_routes() == []
    assert lab.default_routes(table="1234") == []  # a table that does not exist
    assert lab.connect_once(timeout=0.3) is None
    assert lab.default_routes(family=6) == []
    assert lab.connect_once(timeout=0.3, family=6) is None


def test_udp_echo_reports_source(lab: Lab) -> None:
    script = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.settimeout(2); s.sendto(b'x', ('{SERVER_IP}', {SERVER_PORT})); "
        "print(s.recv(64).decode().strip())"
    )
    assert lab.run("lan", "python3", "-c", script).stdout.strip() == WAN0_IP
    script6 = (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
        f"s.settimeout(2); s.sendto(b'x', ('{SERVER_IP6}', {SERVER_PORT})); "
        "print(s.recv(64).decode().strip())"
    )
    assert lab.run("lan", "python3", "-c", script6).stdout.strip() == WAN0_IP6


def test_silent_drop_keeps_gateway_answering(lab: Lab) -> None:
    lab.silent_drop("isp1", True)
    lab.silent_drop("isp1", True)  # idempotent
    assert lab.connect_once(timeout=0.3) is None
    assert ping(lab, "203.0.113.1")
    lab.silent_drop("isp1", False)
    lab.silent_drop("isp1", False)  # idempotent
    assert lab.connect_once() == WAN0_IP


def test_silent_drop_blocks_ipv6_too_and_gateway_answers(lab: Lab) -> None:
    lab.silent_drop("isp1", True)
    assert lab.connect_once(timeout=0.3, family=6) is None
    assert ping6(lab, "fe80::1%wan0")
    assert ping6(lab, ISPS["isp1"].cpe_ip6)
    assert lab.connect_once(timeout=0.3) is None  # and IPv4, as before
    lab.silent_drop("isp1", False)
    assert lab.connect_once(family=6) == WAN0_IP6


def test_gateway_dead_and_loss_in_ipv6(lab: Lab) -> None:
    # arp=False: the dead gateway still answers neighbour discovery...
    lab.gateway_dead("isp1", True)
    assert not ping6(lab, "fe80::1%wan0", wait_s=0.3)
    assert not ping6(lab, ISPS["isp1"].cpe_ip6, wait_s=0.3)
    assert gateway_lladdr(lab) is not None
    assert lab.connect_once(timeout=0.3, family=6) is None
    # ...arp=True: not even that (the entry stays INCOMPLETE, then FAILED).
    lab.gateway_dead("isp1", True, arp=True)
    lab.ip("router", "-6", "neigh", "flush", "dev", "wan0")
    assert not ping6(lab, "fe80::1%wan0", wait_s=0.3)
    assert gateway_lladdr(lab) is None
    lab.gateway_dead("isp1", False)
    # Flush the INCOMPLETE entry: resolution starts afresh instead of on its
    # next retransmission (up to 1 s away, as long as the ping waits).
    lab.ip("router", "-6", "neigh", "flush", "dev", "wan0")
    assert ping6(lab, "fe80::1%wan0")
    assert gateway_lladdr(lab) is not None

    lab.loss("isp1", 100)
    assert lab.connect_once(timeout=0.3, family=6) is None
    assert ping6(lab, "fe80::1%wan0")  # loss is upstream forwarding only
    lab.loss("isp1", 0)
    assert lab.connect_once(family=6) == WAN0_IP6


def test_gateway_dead_and_loss(lab: Lab) -> None:
    lab.gateway_dead("isp1", True)
    assert not ping(lab, "203.0.113.1")
    assert lab.connect_once(timeout=0.3) is None
    lab.gateway_dead("isp1", False)
    assert ping(lab, "203.0.113.1")

    lab.loss("isp1", 100)
    assert lab.connect_once(timeout=0.3) is None
    lab.loss("isp1", 0)
    assert lab.connect_once() == WAN0_IP


def test_counters_count_probe_bound_to_wan1_at_isp2_only(lab: Lab) -> None:
    t1_before, t2_before = counters(lab, "t1"), counters(lab, "t2")
    assert ping(lab, "-I", "wan1", PROBE_TARGETS[0])
    assert counters(lab, "t1") == (t1_before[0], t1_before[1] + 1)
    assert counters(lab, "t2") == t2_before


def test_counters_count_ipv6_probe_bound_to_wan1_at_isp2_only(lab: Lab) -> None:
    t1_before, t2_before = counters(lab, "t1_6"), counters(lab, "t2_6")
    assert ping6(lab, "-I", "wan1", PROBE_TARGETS6[1])
    assert counters(lab, "t2_6") == (t2_before[0], t2_before[1] + 1)
    assert counters(lab, "t1_6") == t1_before
    assert counters(lab, "t2") == (0, 0)


def test_carrier_loss_shows_no_carrier(lab: Lab) -> None:
    def flags() -> list[str]:
        return list(lab.ip_json("router", "link", "show", "dev", "wan0")[0]["flags"])

    assert lab.connect_once(family=6) == WAN0_IP6
    monitor = lab.monitor_routes("router")
    assert "LOWER_UP" in flags()
    lab.carrier("isp1", False)
    assert wait_for(lambda: "NO-CARRIER" in flags())
    # The kernel keeps the route through the dead link; moving traffic is the agent's job.
    assert any(r["dev"] == "wan0" for r in lab.default_routes())
    # IPv6 likewise: the RA-style route stays, flagged linkdown.
    assert [r["flags"] for r in lab.default_routes(family=6) if r["dev"] == "wan0"] == [["linkdown"]]
    lab.carrier("isp1", True)
    assert wait_for(lambda: "LOWER_UP" in flags())
    # The ISP's IPv6 addresses (flushed by `link set down`) are back.
    assert lab.connect_once(timeout=0.5, family=6) == WAN0_IP6
    assert lab.connect_once() == WAN0_IP
    # No route was deleted or added on the router, in either family.
    assert monitor.stop() == []


def test_bcp38_drops_unnatted_source(lab: Lab) -> None:
    target = PROBE_TARGETS[0]
    # With NAT, a ping sourced from the LAN address leaves wan0 as 203.0.113.2.
    assert ping(lab, "-I", "198.51.100.1", target)
    assert lab.counter("isp1", "spoofed") == 0
    # Untracked packets skip the nat hook, so the LAN source leaves wan0 as-is,
    # which is what a NAT/stickiness bug looks like from the ISP's side.
    lab.nft(
        "router",
        "table ip spooftest {\n"
        "  chain out {\n"
        "    type filter hook output priority raw; policy accept;\n"
        f"    ip daddr {target} notrack\n"
        "  }\n"
        "}\n",
    )
    t1_before = lab.counter("isp1", "t1")
    assert not ping(lab, "-I", "198.51.100.1", target)
    assert lab.counter("isp1", "spoofed") == 1
    assert lab.counter("isp1", "t1") == t1_before


def test_bcp38_drops_unnatted_ipv6_source(lab: Lab) -> None:
    target = PROBE_TARGETS6[0]
    # With NAT66, a ping sourced from the LAN address leaves wan0 as 2001:db8:1::2.
    assert ping6(lab, "-I", "2001:db8:100::1", target)
    assert lab.counter("isp1", "t1_6") == 1
    assert lab.counter("isp1", "spoofed_6") == 0
    # Neighbour discovery (link-local sources) never reaches the ISP's forward hook.
    assert ping6(lab, "fe80::1%wan0")
    lab.nft(
        "router",
        "table ip6 spooftest {\n"
        "  chain out {\n"
        "    type filter hook output priority raw; policy accept;\n"
        f"    ip6 daddr {target} notrack\n"
        "  }\n"
        "}\n",
    )
    assert not ping6(lab, "-I", "2001:db8:100::1", target, wait_s=0.3)
    assert lab.counter("isp1", "spoofed_6") == 1
    assert lab.counter("isp1", "t1_6") == 1
    assert lab.counter("isp1", "spoofed") == 0  # the IPv4 rule never saw it


def test_route_monitor_sees_replace_and_delete(lab: Lab) -> None:
    monitor = lab.monitor_routes("router")
    lab.ip("router", "route", "replace", "default", "via", "203.0.113.5", "dev", "wan1",
           "proto", "dhcp", "metric", "100")  # fmt: skip
    lab.ip("router", "route", "del", "default", "metric", "200")
    assert wait_for(lambda: len(monitor.events()) >= 2)
    events = monitor.stop()
    assert [e.line for e in events] == [
        "default via 203.0.113.5 dev wan1 proto dhcp metric 100",
        "Deleted default via 203.0.113.5 dev wan1 proto dhcp metric 200",
    ]
    assert [e.line for e in monitor.deleted_defaults("main")] == [events[1].line]
    assert monitor.deleted_defaults("100") == []
    assert events[0].t <= events[1].t
    assert [e.family for e in events] == [4, 4]


def test_route_monitor_tells_ipv6_events_apart(lab: Lab) -> None:
    monitor = lab.monitor_routes("router")
    lab.ip("router", "-6", "route", "replace", "default", "via", "fe80::1", "dev", "wan1",
           "proto", "ra", "metric", "1024")  # fmt: skip
    lab.ip("router", "-6", "route", "add", "default", "dev", "wan1", "table", "200")
    lab.ip("router", "route", "add", "default", "dev", "wan1", "table", "200")
    lab.ip("router", "-6", "route", "del", "default", "metric", "1025")
    assert wait_for(lambda: len(monitor.events()) >= 4)
    events = monitor.stop()
    assert [(e.line, e.family) for e in events] == [
        ("default via fe80::1 dev wan1 proto ra metric 1024 pref medium", 6),
        ("default dev wan1 table 200 metric 1024 pref medium", 6),
        ("default dev wan1 table 200 scope link", 4),
        ("Deleted default via fe80::1 dev wan1 proto ra metric 1025 pref medium", 6),
    ]
    assert monitor.deleted_defaults(family=4) == []
    assert monitor.deleted_defaults("main", family=6) == [events[3]]
    assert RouteEvent(0.0, "2001:db8:1::/64 dev wan0 proto kernel metric 256").family == 6
    assert RouteEvent(0.0, "unreachable 2001:db8:9::/64 dev lo metric 1024").family == 6
    assert RouteEvent(0.0, "198.18.0.0/15 via 203.0.113.1 dev wan0").family == 4


@pytest.mark.parametrize("family", [4, 6])
def test_connector_sees_outage(lab: Lab, family: int) -> None:
    source = WAN0_IP if family == 4 else WAN0_IP6
    connector = lab.start_connector(duration_s=1.5, period_ms=10, timeout_ms=100, family=family)
    assert wait_for(lambda: sum(a.ok for a in connector.samples()) >= 30)
    fault_begin = time.monotonic()
    lab.silent_drop("isp1", True)
    fault_end = time.monotonic()
    samples = connector.wait(timeout=10)
    assert not connector.unparsed()
    # Attempts that started a full timeout before the fault had finished before it.
    before = [a for a in samples if a.t < fault_begin - 0.1]
    after = [a for a in samples if a.t > fault_end]
    assert len(before) >= 10 and all(a.ok and a.detail == source for a in before)
    assert after and all(not a.ok and a.detail == "timeout" for a in after)
    assert connector.longest_outage_s() > 0.5
    # Attempts start on the fixed schedule t0 + k*10ms: never two in one slot.
    assert connector.started_at is not None
    slots = [math.floor((a.t - connector.started_at) / 0.010 + 1e-6) for a in before]
    assert all(a < b for a, b in zip(slots, slots[1:], strict=False))


def test_close_removes_namespaces_and_processes() -> None:
    lab = Lab()
    with lab:
        prefix = lab.prefix
        assert len(lab_namespaces(prefix)) == 5
        stray = lab.run("router", "sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!").stdout
        stray_pid = int(stray)
        lab.popen("lan", ["sleep", "60"])
    assert lab_namespaces(prefix) == []
    # The backgrounded sleep was not our child: it was killed via `ip netns pids`.
    assert wait_for(lambda: not _alive(stray_pid), timeout=2)
    lab.close()  # idempotent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
