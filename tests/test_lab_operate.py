"""Operating the agent in the netns lab: the control socket and the CLI (status, history,
drain, undrain, reload), hooks and webhooks that misbehave during a failover, metrics
scraped for real, `init` on the lab router, and `check`'s warnings about the host."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_proc import AGENT, AgentProcess, fake_tool_dir, lab_config, status_command
from lab import Lab
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.lab

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"


def cli(lab: Lab, agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`multiwan-agent ARGS -c CONFIG` in the router namespace, as an operator types it."""
    return lab.run("router", sys.executable, str(AGENT), *args, "-c", str(agent.config_path), check=False)


def selected_dev(lab: Lab) -> str | None:
    routes = lab.default_routes("router", "200")
    return routes[0].get("dev") if routes else None


def wait_dev(lab: Lab, dev: str, timeout_s: float = 5.0) -> float:
    """Until table 200's default leaves through `dev`; how long that took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if selected_dev(lab) == dev:
            return time.monotonic() - began
        time.sleep(0.005)
    raise AssertionError(f"table 200 never went to {dev}: {lab.default_routes('router', '200')}")


def test_drain_undrain_status_history_and_reload_through_the_control_socket(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", hysteresis="5s"))
    agent.wait_both_up()
    shown = cli(lab, agent, "status", "--json")
    assert shown.returncode == 0, shown
    assert json.loads(shown.stdout)["selected"] == "fibre" and json.loads(shown.stdout)["stale"] is None
    drained = cli(lab, agent, "drain", "fibre")
    assert drained.returncode == 0 and "fibre is drained" in drained.stdout, drained
    wait_dev(lab, "wan1", 2.0)
    assert lab.connect_once() == LTE_IP
    table = cli(lab, agent, "status")
    assert "up, drained" in table.stdout, table.stdout
    # it stayed up: undrain owes no hysteresis (5 s here), traffic returns at once
    back = cli(lab, agent, "undrain", "fibre")
    assert back.returncode == 0, back
    assert wait_dev(lab, "wan0", 2.0) < 1.0
    assert lab.connect_once() == FIBRE_IP
    history = cli(lab, agent, "history", "--since", "1h", "--json")
    assert history.returncode == 0, history
    events = [e["event"] for e in json.loads(history.stdout)]
    assert events.count("switch") >= 3 and "drain" in events and "undrain" in events, events
    assert "uplink_up" in events
    text = cli(lab, agent, "history")
    assert "fibre is drained by the operator; lte is the best uplink up" in text.stdout, text.stdout
    # reload: answered with its result
    agent.config_path.write_text(
        lab_config(tmp_path / "state", hysteresis="5s").replace("priority = 1", "priority = 9")
    )
    applied = cli(lab, agent, "reload")
    assert applied.returncode == 0 and "applied" in applied.stdout, applied
    wait_dev(lab, "wan1", 2.0)
    agent.config_path.write_text(lab_config(tmp_path / "state", interval="soon"))
    refused = cli(lab, agent, "reload")
    assert refused.returncode == 1 and "kept the running config" in refused.stderr, refused
    assert 'check.interval: expected a duration such as "500ms" or "2s", got "soon"' in refused.stderr
    unknown = cli(lab, agent, "drain", "dsl")
    assert unknown.returncode == 1 and "no uplink named 'dsl'" in unknown.stderr


def test_draining_the_last_uplink_up_needs_force_and_drains_survive_reload_and_restart(
    lab: Lab, tmp_path: Path
) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_both_up()
    lab.silent_drop("isp2", True)
    agent.wait_state("lte", "down", timeout=5)
    refused = cli(lab, agent, "drain", "fibre")
    assert refused.returncode == 1 and "refused: fibre is the last uplink up for IPv4" in refused.stderr, (
        refused
    )
    assert "--force" in refused.stderr and selected_dev(lab) == "wan0"
    lab.silent_drop("isp2", False)
    agent.wait_state("lte", "up", timeout=5)
    assert cli(lab, agent, "drain", "lte").returncode == 0
    agent.signal(__import__("signal").SIGHUP)
    agent.wait_log("reloaded ")
    assert agent.wait_for(lambda s: s["uplinks"]["lte"]["drained"], 5, "drained after reload")
    assert agent.stop() == 0
    again = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"), name="again")
    again.wait_log("uplink=lte stays drained, as the previous run left it")
    status = again.wait_both_up()
    assert status["uplinks"]["lte"]["drained"]
    # fibre fails: lte is drained, so nothing takes over and the route stays (stranded), as said
    lab.silent_drop("isp1", True)
    again.wait_for(lambda s: s["stranded"], 5, "stranded")
    assert selected_dev(lab) == "wan0"
    assert cli(lab, again, "undrain", "lte").returncode == 0
    wait_dev(lab, "wan1", 2.0)
    # the history of both runs is there
    events = json.loads(cli(lab, again, "history", "--json").stdout)
    assert {e["event"] for e in events} >= {"drain", "undrain", "reload", "adopted"}
    assert len({e["boot_id"] for e in events}) == 1 and events == sorted(events, key=lambda e: e["seq"])


def test_a_failover_keeps_its_bound_under_hostile_clients_a_hanging_hook_and_a_silent_webhook(
    lab: Lab, tmp_path: Path
) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nexec sleep 1000\n")
    hook.chmod(0o755)
    # A webhook receiver that accepts and never answers, in the router namespace.
    sink = lab.popen(
        "router",
        [sys.executable, "-c", "import socket,time\ns=socket.create_server(('127.0.0.1', 8099))\n"
         "c=[]\nprint('ready', flush=True)\nwhile True: c.append(s.accept())"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    extra = (
        f'\n[[hook]]\nexec = ["{hook}"]\ntimeout = "30s"\n'
        '[[webhook]]\nurl = "http://127.0.0.1:8099/x"\ntimeout = "30s"\n'
    )
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", extra=extra))
    agent.wait_both_up()
    path = str(agent.state_dir / "control.sock")
    # hostile clients: idle ones holding every slot, one half-open mid-line, garbage and oversize
    clients = []
    for payload in [b""] * 6 + [b'{"cmd": "sta', b"\x00\xff garbage\n" + b"y" * 9000 + b"\n"]:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        client.sendall(payload)
        clients.append(client)
    fault = time.monotonic()
    lab.silent_drop("isp1", True)
    moved = agent.wait_selected("lte", timeout=10)
    detected = moved["uplinks"]["fibre"]["since_monotonic"] - fault
    assert detected <= 3 * 0.1 + 0.1 + 0.5 + 0.5, detected
    assert lab.connect_once() == LTE_IP
    garbage = clients[-1]
    garbage.settimeout(5)
    answer = garbage.recv(4096).decode()
    assert '"ok":false' in answer and "expected one JSON object per line" in answer
    for client in clients:
        client.close()
    shown = status_command(lab, agent.state_dir)
    assert shown.returncode == 0 and "selected: lte" in shown.stdout, shown
    assert agent.proc.poll() is None


def fetch_metrics(lab: Lab, port: int = 9367) -> dict[str, list]:
    text = lab.run(
        "router",
        sys.executable,
        "-c",
        "import urllib.request, sys; "
        f"url = 'http://127.0.0.1:{port}/metrics'; "
        "sys.stdout.write(urllib.request.urlopen(url, timeout=5).read().decode())",
    ).stdout
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_are_served_parse_and_agree_with_status(lab: Lab, tmp_path: Path) -> None:
    textfile = tmp_path / "multiwan.prom"
    extra_agent = f'metrics_listen = "127.0.0.1:9367"\nmetrics_textfile = "{textfile}"\n'
    config = lab_config(tmp_path / "state").replace("[agent]\n", "[agent]\n" + extra_agent)
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    lab.silent_drop("isp1", True)
    status = agent.wait_selected("lte", timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = fetch_metrics(lab)
        if any(s.value for s in metrics["multiwan_detection_seconds"] if s.name.endswith("_count")):
            break
        time.sleep(0.1)
    selected = {
        (s.labels["uplink"], s.labels["family"]): s.value for s in metrics["multiwan_uplink_selected"]
    }
    assert selected == {("fibre", "ipv4"): 0, ("lte", "ipv4"): 1}
    up = {s.labels["uplink"]: s.value for s in metrics["multiwan_uplink_up"]}
    assert up == {u: float(status["uplinks"][u]["state"] == "up") for u in ("fibre", "lte")}
    (count,) = [s for s in metrics["multiwan_detection_seconds"] if s.name.endswith("_count")]
    (total,) = [s for s in metrics["multiwan_detection_seconds"] if s.name.endswith("_sum")]
    assert count.value == 1 and 0.2 <= total.value <= 1.0, total  # fall x interval + timeout = 0.4 s here
    switches = {s.labels["family"]: s.value for s in metrics["multiwan_switches"]}
    assert switches["ipv4"] >= 2  # none -> fibre, fibre -> lte
    assert any(s.labels.get("reason") == "timeout" for s in metrics["multiwan_probe_failures"])
    deadline = time.monotonic() + 10
    while not textfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "multiwan_uplink_up" in textfile.read_text()


def test_init_on_the_lab_router_writes_a_config_that_check_accepts_and_that_fails_over(
    lab: Lab, tmp_path: Path
) -> None:
    written = tmp_path / "init.toml"
    args = ("init", "-o", str(written), "--target", "198.18.1.1", "--target", "198.18.1.2")
    made = lab.run("router", sys.executable, str(AGENT), *args, check=False)
    if importlib.util.find_spec("tomli_w") is None:  # OpenWrt's library set: no tomli-w
        assert made.returncode == 1 and "init writes TOML with tomli-w" in made.stderr, made
        return
    assert made.returncode == 0, made
    again = lab.run("router", sys.executable, str(AGENT), *args, check=False)
    assert again.returncode == 1 and "exists; add --force" in again.stderr
    text = written.read_text()
    assert "# wan0: IPv4: its default route comes from DHCP" in text
    checked = lab.run("router", sys.executable, str(AGENT), "check", "-c", str(written), check=False)
    assert checked.returncode == 0, checked
    # for the lab: its own state_dir, and short intervals
    fast = (
        text.replace("[agent]\n", f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
        .replace('hysteresis = "30s"', 'hysteresis = "1s"')
        .replace('interval = "1s"', 'interval = "100ms"')
        .replace('timeout = "1s"', 'timeout = "100ms"')
    )
    agent = AgentProcess(lab, tmp_path, fast)
    agent.wait_selected("wan0", timeout=10)
    lab.silent_drop("isp1", True)
    agent.wait_selected("wan1", timeout=5)
    assert lab.connect_once() == LTE_IP


def test_check_warns_about_each_problem_of_the_host_once(lab: Lab, tmp_path: Path) -> None:
    config = tmp_path / "warn.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
        '[check]\ntargets = ["198.18.1.1"]\ninterval = "50ms"\ntimeout = "50ms"\n'
        '[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
        '[[uplink]]\nname = "lte"\ninterface = "wan1"\ngateway = "198.51.100.77"\n'
        '[[uplink]]\nname = "dsl"\ninterface = "wan9"\n'
    )
    lab.run("router", "sysctl", "-q", "-w", "net.ipv4.conf.wan0.rp_filter=1", "net.ipv4.ip_forward=0")
    env = fake_tool_dir(
        tmp_path, "nft", "echo 'Error: Could not process rule: No such file or directory' >&2\nexit 1"
    )
    run = lab.popen(
        "router",
        [sys.executable, str(AGENT), "check", "-c", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    for start in (
        "warning: uplink[0] (fibre): strict reverse-path filtering on wan0",
        "warning: uplink[1] (lte).gateway: 198.51.100.77 is not on-link on wan1",
        "warning: uplink[2] (dsl): interface wan9 does not exist on this host",
        "warning: net.ipv4.ip_forward = 0",
        "warning: nft -c refuses the agent's table: Error: Could not process rule",
        "warning: every uplink probes the one target 198.18.1.1",
        "warning: 198.18.1.1 gets 60 probes a second from this router",
    ):
        assert sum(w.startswith(start) for w in warnings) == 1, (start, warnings)
    assert len(warnings) == 7, warnings
    strict = lab.run(
        "router", sys.executable, str(AGENT), "check", "--strict", "-c", str(config), check=False
    )
    assert strict.returncode == 1
