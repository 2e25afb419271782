"""Health that matches reality, in the netns lab: loss, HTTP/HTTPS/DNS checks,
gateway checks, renumbering, point-to-point uplinks, initial_state, readiness."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from agent_proc import AgentProcess, lab_config
from lab import Lab

pytestmark = pytest.mark.lab

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"


def fibre_check(config: str, check: str) -> str:
    """Give fibre its own [uplink.check] table (lte keeps the ICMP default)."""
    return config.replace("priority = 1\n", f"priority = 1\n[uplink.check]\n{check}\n", 1)


def test_loss_degrades_the_uplink_moves_traffic_and_returns_after_hysteresis(
    lab: Lab, tmp_path: Path
) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="1s"))
    agent.wait_both_up()
    agent.wait_for(lambda s: s["uplinks"]["fibre"]["window_rounds"] == 20, 5, "a full window")
    lab.loss("isp1", 30)
    status = agent.wait_state("fibre", "degraded", timeout=10)
    assert status["uplinks"]["fibre"]["reason"].startswith("loss ")
    agent.wait_selected("lte", timeout=2)
    agent.wait_log("uplink=fibre degraded: loss ")
    assert lab.connect_once() == LTE_IP
    lab.loss("isp1", 0)
    up = agent.wait_state("fibre", "up", timeout=10)
    assert up["selected"] == "lte"  # still proving itself
    back = agent.wait_selected("fibre", timeout=5)
    assert back["updated_monotonic"] - back["uplinks"]["fibre"]["since_monotonic"] >= 1.0


def test_http_check_fails_on_a_captive_portal_while_icmp_works(lab: Lab, tmp_path: Path) -> None:
    check = (
        'method = "http"\nurl = "http://check.example/generate_204"\n'
        'expect_status = 204\ntargets = ["198.18.1.10"]'
    )
    agent = AgentProcess(lab, tmp_path, fibre_check(lab_config(tmp_path / "state"), check))
    agent.wait_both_up()
    assert lab.http_last_host() == "check.example"  # Host header from the URL, address from targets
    lab.set_http_status(302)
    status = agent.wait_state("fibre", "down", timeout=5)
    assert (
        status["uplinks"]["fibre"]["reason"]
        == "burst confirmed 3/3 after a failed round: upstream unreachable (status 302)"
    )
    agent.wait_selected("lte", timeout=2)
    ping = lab.run("router", "ping", "-c1", "-W1", "-I", "wan0", "198.18.1.1", check=False)
    assert ping.returncode == 0  # ICMP through fibre still works: only the HTTP check saw the portal
    lab.set_http_status(204)
    agent.wait_state("fibre", "up", timeout=5)


def test_https_check_with_and_without_certificate_checks(lab: Lab, tmp_path: Path) -> None:
    if lab.https_ca_file() is None:
        pytest.fail("the lab's HTTPS service needs openssl")
    check = 'method = "https"\nurl = "https://check.example/generate_204"\ntargets = ["198.18.1.10"]'
    unverified = fibre_check(
        lab_config(tmp_path / "state"), check + "\ntls_verify = false\nexpect_status = [204]"
    )
    agent = AgentProcess(lab, tmp_path, unverified)
    agent.wait_both_up()
    agent.stop()
    # The lab's certificate is self-signed: with checks on, the uplink never comes up.
    verified = fibre_check(lab_config(tmp_path / "state"), check)
    strict = AgentProcess(lab, tmp_path, verified, name="strict")
    strict.wait_for(lambda s: s["selected"] == "lte", 10, "lte selected")
    strict.wait_log("tls: ")


def test_dns_check_follows_the_resolver(lab: Lab, tmp_path: Path) -> None:
    check = 'method = "dns"\nquery_name = "example.com"\ntargets = ["198.18.1.10", "2001:db8:ffff::10"]'
    agent = AgentProcess(lab, tmp_path, fibre_check(lab_config(tmp_path / "state"), check))
    agent.wait_both_up()
    lab.set_dns_mode("servfail")
    status = agent.wait_state("fibre", "down", timeout=5)
    assert "servfail" in status["uplinks"]["fibre"]["reason"]
    lab.set_dns_mode("ok")
    agent.wait_state("fibre", "up", timeout=5)
    lab.set_dns_mode("silent")
    status = agent.wait_state("fibre", "down", timeout=5)
    assert "timeout" in status["uplinks"]["fibre"]["reason"]


def test_gateway_check_tells_a_local_failure_from_an_upstream_one(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_both_up()
    lab.gateway_dead("isp1", True)
    status = agent.wait_state("fibre", "down", timeout=5)
    fibre = status["uplinks"]["fibre"]
    assert fibre["failure"] == "gateway"
    assert fibre["reason"] == (
        "burst confirmed 3/3 after a failed round: gateway 203.0.113.1 unreachable (timeout)"
    )
    lab.gateway_dead("isp1", False)
    agent.wait_state("fibre", "up", timeout=5)
    lab.silent_drop("isp1", True)
    status = agent.wait_state("fibre", "down", timeout=5)
    assert status["uplinks"]["fibre"]["failure"] == "upstream"


def test_renumbering_of_the_backup_is_followed_at_once(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="300ms"))
    agent.wait_both_up()
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    done = lab.renumber_isp2("203.0.113.10", "203.0.113.9")
    deadline = done + 1.0  # the bar: followed within 1 s
    while True:
        rules = lab.ip("router", "rule", "show")
        selected_route = lab.default_routes("router", "200")
        table = lab.uplink_default("202")
        followed = (
            "from 203.0.113.10 lookup 202" in rules
            and LTE_IP not in rules
            and [r.get("gateway") for r in table] == ["203.0.113.9"]
            and [r.get("gateway") for r in selected_route] == ["203.0.113.9"]
        )
        if followed or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert followed, (rules, table, selected_route)
    print(f"renumbering followed {time.monotonic() - done:.3f}s after the change")
    assert lab.connect_once() == "203.0.113.10"
    assert agent.status()["uplinks"]["lte"]["address"] == "203.0.113.10"  # type: ignore[index]
    # a later failover uses the new gateway
    lab.silent_drop("isp1", False)
    agent.wait_selected("fibre", timeout=5)
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    assert lab.default_routes("router", "200")[0]["gateway"] == "203.0.113.9"
    assert lab.connect_once() == "203.0.113.10"


def test_point_to_point_uplink_fails_over_and_back(lab: Lab, tmp_path: Path) -> None:
    lab.enable_proxy_arp("isp2", True)
    config = lab_config(tmp_path / "state", hysteresis="300ms").replace(
        'interface = "wan1"\ngateway = "auto"', 'interface = "wan1"\ngateway = "none"'
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    assert lab.uplink_default("202")[0].get("gateway") is None
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    route = lab.default_routes("router", "200")[0]
    assert route["dev"] == "wan1" and "gateway" not in route and route.get("scope") == "link"
    assert lab.connect_once() == LTE_IP
    lab.silent_drop("isp1", False)
    agent.wait_selected("fibre", timeout=5)
    assert lab.connect_once() == FIBRE_IP


def test_initial_state_up_is_selected_before_any_round(lab: Lab, tmp_path: Path) -> None:
    config = lab_config(tmp_path / "state", interval="2s", timeout="1s").replace(
        "priority = 1\n", 'priority = 1\ninitial_state = "up"\n', 1
    )
    agent = AgentProcess(lab, tmp_path, config)
    status = agent.wait_for(lambda s: s["running"], 5, "the first status")
    # written after the first reconcile, before rise (3) rounds at 2 s could have passed
    assert status["selected"] == "fibre" and status["uplinks"]["fibre"]["state"] == "up"
    assert status["uplinks"]["lte"]["state"] == "down"
    assert status["uplinks"]["lte"]["reason"] == "not yet confirmed"
    assert lab.default_routes("router", "200")[0]["dev"] == "wan0"


def test_an_uplink_that_is_not_ready_is_not_probed_and_says_why(lab: Lab, tmp_path: Path) -> None:
    config = lab_config(tmp_path / "state") + (
        '\n[[uplink]]\nname = "spare"\ninterface = "wan9"\npriority = 3\n'
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    spare = agent.status()["uplinks"]["spare"]  # type: ignore[index]
    assert spare["ready"] is False and spare["ready_reason"] == "interface wan9 is gone"
    assert spare["state"] == "down" and spare["rtt_ms"] is None and spare["window_rounds"] == 0
    assert "uplink=spare round=" not in agent.log()


def test_a_family_the_uplink_lacks_is_not_probed(lab: Lab, tmp_path: Path) -> None:
    """Dual-stack targets, and lte loses its IPv6: it stays up for IPv4."""
    dual = 'targets = ["198.18.1.1", "2001:db8:ffff::1"]'
    config = lab_config(tmp_path / "state").replace('targets = ["198.18.1.1", "198.18.1.2"]', dual)
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    lab.ip("router", "-6", "addr", "del", "2001:db8:2::2/64", "dev", "wan1")
    lab.silent_drop("isp1", True)
    status = agent.wait_selected("lte", timeout=5)  # IPv4 moves to lte, which still answers on IPv4
    assert status["uplinks"]["lte"]["state"] == "up"
    assert status["families"]["ipv6"]["selected"] == "fibre"  # nothing else can carry IPv6
    assert lab.connect_once() == LTE_IP


def test_a_target_that_is_the_gateway_answers(lab: Lab, tmp_path: Path) -> None:
    """The gateway check and a probe to the same address share nothing that could collide."""
    config = lab_config(tmp_path / "state").replace(
        "priority = 2\n", 'priority = 2\n[uplink.check]\ntargets = ["203.0.113.5"]\n'
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    lab.gateway_dead("isp2", True)
    status = agent.wait_state("lte", "down", timeout=5)
    assert status["uplinks"]["lte"]["failure"] == "gateway"
