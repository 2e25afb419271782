"""The daemon under faults of its own edges, in the netns lab: a hanging or failing
`nft`, probe code that raises, a dying task, a second instance, a killed agent, a
foreign rule at runtime, a SIGHUP storm and corrupt state files."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from agent_proc import (
    AGENT,
    AgentProcess,
    fake_tool_dir,
    hup_storm,
    lab_config,
    ruleset_snapshot,
    status_command,
)
from lab import Lab

pytestmark = pytest.mark.lab

LTE_IP = "203.0.113.6"
FIBRE_IP = "203.0.113.2"
FAULTY = Path(__file__).resolve().parent / "lab_tools" / "faulty_agent.py"
#: A policy that moves with fibre's health, so that every failover and failback
#: also rewrites the nft table's steering (an nft run on the switching path).
POLICY = (
    '\n[[policy]]\nname = "web"\nmatch = { protocol = "tcp", dst_port = 443 }\nuplinks = ["fibre", "lte"]\n'
)
HANG = "exec sleep 1000"


def silent_failure_bound(interval: float, timeout: float, fall: int = 3) -> float:
    """The issue's bound for a silent failure, plus scheduling slack on a loaded 2-core machine."""
    return fall * interval + timeout + 0.5 + 0.5


def fail_and_recover(lab: Lab, agent: AgentProcess, hysteresis: float, interval: float) -> None:
    """A silent failure of fibre and its recovery, with the detection and the failback timed."""
    fault = time.monotonic()
    lab.silent_drop("isp1", True)
    moved = agent.wait_selected("lte", timeout=10)
    detected = moved["uplinks"]["fibre"]["since_monotonic"] - fault
    assert detected <= silent_failure_bound(interval, interval), detected
    assert lab.connect_once() == LTE_IP
    lab.silent_drop("isp1", False)
    up = agent.wait_state("fibre", "up", timeout=10)
    back = agent.wait_selected("fibre", timeout=10)
    failback = back["updated_monotonic"] - up["uplinks"]["fibre"]["since_monotonic"]
    assert hysteresis - 0.05 <= failback <= hysteresis + 3 * interval + 1.0, failback
    assert lab.connect_once() == FIBRE_IP


def stop_within(agent: AgentProcess, limit_s: float) -> float:
    began = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=10) == 0
    took = time.monotonic() - began
    assert took < limit_s, f"SIGTERM took {took:.2f}s:\n{agent.log()}"
    return took


def test_a_hanging_nft_from_the_start_delays_neither_failover_nor_failback(lab: Lab, tmp_path: Path) -> None:
    env = fake_tool_dir(tmp_path, "nft", HANG)
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", extra=POLICY), env=env)
    agent.wait_both_up(timeout=10)
    fail_and_recover(lab, agent, hysteresis=1.0, interval=0.1)
    agent.wait_log("nft did not answer within 5s and was killed", timeout=10)
    status = agent.wait_for(lambda s: s["nft"]["problem"] is not None, 10, "the hang in status")
    assert "did not answer" in status["nft"]["problem"] and not status["nft"]["installed"]
    # a reload is not blinded by it either: routing follows the new config
    agent.config_path.write_text(
        lab_config(tmp_path / "state", extra=POLICY).replace("priority = 1", "priority = 9")
    )
    agent.signal(signal.SIGHUP)
    agent.wait_selected("lte", timeout=15)
    agent.wait_log("its nft table could not be checked: nft did not answer", timeout=5)
    stop_within(agent, 1.0)


def test_a_hanging_nft_at_runtime_delays_neither_failover_nor_failback(lab: Lab, tmp_path: Path) -> None:
    hang_file = tmp_path / "hang"
    # Only loads and steering updates (`nft -f -`) hang: the `nft list` check that follows
    # each of them is silent when it hangs (it says nothing about the table), and one that
    # happened to start just after the touch held the edge through both switches, after
    # which the wanted steering was the live one again and no run was left to report.
    env = fake_tool_dir(
        tmp_path, "nft", f'[ -e "{hang_file}" ] && [ "$1" = "-f" ] && {HANG}\nexec /usr/sbin/nft "$@"'
    )
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state", extra=POLICY), env=env)
    agent.wait_log("nft: installed table inet multiwan (start)")
    agent.wait_both_up(timeout=10)
    hang_file.touch()
    for _ in range(2):  # each switch wants an nft run that never returns
        fail_and_recover(lab, agent, hysteresis=1.0, interval=0.1)
    agent.wait_log("nft did not answer within 5s", timeout=10)
    stop_within(agent, 1.0)


def test_a_failing_nft_still_lets_a_reload_apply_its_routing(lab: Lab, tmp_path: Path) -> None:
    env = fake_tool_dir(
        tmp_path, "nft", 'echo "Error: Could not process rule: No such file or directory" >&2\nexit 1'
    )
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"), env=env)
    agent.wait_both_up()
    agent.wait_log("nft: cannot install table inet multiwan (start)")
    agent.config_path.write_text(lab_config(tmp_path / "state").replace("priority = 1", "priority = 9"))
    agent.signal(signal.SIGHUP)
    agent.wait_selected("lte", timeout=5)
    agent.wait_log("nft -c refuses the new table: Error: Could not process rule")
    assert "reload rejected" not in agent.log()
    assert agent.log().count("nft: cannot install table") <= 2  # once per config, not per retry
    assert lab.connect_once() == LTE_IP


@pytest.mark.parametrize("mode", ["probe-target", "probe-round"])
def test_probe_code_that_raises_neither_freezes_the_uplink_nor_fails_it_over(
    lab: Lab, tmp_path: Path, mode: str
) -> None:
    program = (sys.executable, str(FAULTY), mode)
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"), program=program)
    agent.wait_both_up(timeout=10)
    # two seconds of rounds with the bug: no failover, the errors are counted and the bug logged once
    status = agent.wait_for(lambda s: s["uplinks"]["fibre"]["probe_errors"] >= 20, 10, "probe errors counted")
    assert status["selected"] == "fibre" and status["uplinks"]["fibre"]["state"] == "up"
    log = agent.log()
    assert "a bug in the agent, not a failed probe" in log and "Traceback" in log
    assert log.count("Traceback") == 2  # once per uplink and kind; status counts the rest
    assert "uplink=fibre down" not in log and "selected=lte" not in log
    # health is not frozen: a real failure is still seen, within the bound
    fault = time.monotonic()
    lab.silent_drop("isp1", True)
    moved = agent.wait_selected("lte", timeout=10)
    detected = moved["uplinks"]["fibre"]["since_monotonic"] - fault
    # probe-round: every other round is inconclusive, so a fall takes up to twice the rounds
    rounds = 2 if mode == "probe-round" else 1
    assert detected <= silent_failure_bound(0.1 * rounds, 0.1), detected


def test_a_task_that_dies_is_logged_and_restarted(lab: Lab, tmp_path: Path) -> None:
    program = (sys.executable, str(FAULTY), "edge-once")
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"), program=program)
    agent.wait_both_up(timeout=10)
    agent.wait_log("task=conntrack died: ZeroDivisionError: injected bug")
    agent.wait_log("task=conntrack restarts in 1.0s")
    assert "Traceback" in agent.log()
    # restarted: the counts come (both uplinks carry probes, so lte's count is known)
    agent.wait_for(lambda s: s["uplinks"]["lte"]["connections"] is not None, 10, "counts after the restart")
    fail_and_recover(lab, agent, hysteresis=1.0, interval=0.1)


def test_a_dead_pump_ends_the_agent_with_a_failure_and_leaves_the_routes(lab: Lab, tmp_path: Path) -> None:
    program = (sys.executable, str(FAULTY), "pump")
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"), program=program)
    assert agent.proc.wait(timeout=15) == 1
    log = agent.log()
    assert "task=pump died: AssertionError: injected bug in the core" in log and "Traceback" in log
    assert "stopping with a failure: task pump died" in log
    assert "routes and rules stay in place" in log


def test_a_second_agent_refuses_with_exit_3_and_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    first = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    first.wait_both_up()
    before = ruleset_snapshot(lab)
    second = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"), name="second")
    assert second.proc.wait(timeout=10) == 3
    assert f"another multiwan-agent (pid {first.proc.pid}) already runs with state_dir" in second.log()
    assert ruleset_snapshot(lab) == before
    assert first.proc.poll() is None and first.status()["pid"] == first.proc.pid  # type: ignore[index]
    assert status_command(lab, first.state_dir).returncode == 0


def test_status_tells_a_killed_agent_and_a_stranded_one(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_both_up()
    live = status_command(lab, agent.state_dir)
    assert live.returncode == 0 and "NOT RUNNING" not in live.stdout, live
    lab.silent_drop("isp1", True)
    lab.silent_drop("isp2", True)
    agent.wait_for(lambda s: s["stranded"], 5, "no uplink up")
    stranded = status_command(lab, agent.state_dir)
    assert stranded.returncode == 1 and "[NO UPLINK UP]" in stranded.stdout, stranded
    agent.proc.kill()
    agent.proc.wait(timeout=5)
    dead = status_command(lab, agent.state_dir)
    assert dead.returncode == 3, dead
    assert "NOT RUNNING: no agent holds the lock" in dead.stdout
    as_json = status_command(lab, agent.state_dir, "--json")
    assert as_json.returncode == 3 and '"stale": "no agent holds the lock"' in as_json.stdout


def test_a_foreign_rule_added_at_runtime_is_reported_and_left_alone(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_both_up()
    lab.ip("router", "rule", "add", "pref", "5050", "lookup", "main")
    # rule events reach the agent at once; the periodic resync (30 s) is the bound
    agent.wait_log(
        "foreign object: ipv4 rule 5050: from all lookup main (protocol 0): it precedes the selection"
    )
    status = agent.wait_for(lambda s: s["foreign"] != [], 5, "the foreign rule in status")
    assert "failover is ineffective" in status["foreign"][0]["defeats"]
    shown = status_command(lab, agent.state_dir)
    assert "WARNING foreign ipv4 rule 5050" in shown.stdout
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    assert "5050:\tfrom all lookup main" in lab.ip("router", "rule", "show")  # never deleted
    assert agent.log().count("foreign object: ipv4 rule 5050") == 1  # once, through resyncs
    lab.ip("router", "rule", "del", "pref", "5050", "lookup", "main")
    agent.wait_log("foreign object gone: ipv4 rule 5050")
    # and a reload is judged on the new config, not refused for what the agent lives with
    lab.ip("router", "rule", "add", "pref", "5050", "lookup", "main")
    agent.wait_for(lambda s: s["foreign"] != [], 5, "the rule again")
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded ")
    assert "reload rejected" not in agent.log()


def test_a_sighup_storm_during_a_failure_delays_its_detection_by_at_most_one_round(
    lab: Lab, tmp_path: Path
) -> None:
    interval = 0.2
    config = lab_config(tmp_path / "state", interval="200ms", timeout="200ms")
    # Every other reload changes lte's check (its prober restarts) and fibre's weight
    # (its prober must not): the storm is of real reloads, not of no-ops.
    other = config.replace("priority = 2\n", 'priority = 2\n[uplink.check]\ntimeout = "150ms"\n').replace(
        "priority = 1\n", "priority = 1\nweight = 2\n"
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()
    with hup_storm(agent, (config, other), 50):  # 50 SIGHUPs in 5 s
        time.sleep(1.0)  # into the storm
        fault = time.monotonic()
        lab.silent_drop("isp1", True)
        moved = agent.wait_selected("lte", timeout=10)
    detected = moved["uplinks"]["fibre"]["since_monotonic"] - fault
    assert detected <= silent_failure_bound(interval, interval) + interval, detected
    log = agent.log()
    assert agent.proc.poll() is None and log.count("reloaded ") >= 5 and "reload rejected" not in log


def wait_module_running(agent: AgentProcess, timeout_s: float = 10.0) -> None:
    """Until the agent's module body runs (it has mapped _asyncio, imported right after its
    first statement, which catches signals). Before that the interpreter itself starts up
    (30-100 ms here), and no Python program can handle a signal that early."""
    deadline = time.monotonic() + timeout_s
    maps = Path(f"/proc/{agent.proc.pid}/maps")
    while time.monotonic() < deadline:
        try:
            if "_asyncio" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError("the agent's module never started")


def test_signals_while_the_agent_starts_neither_kill_it_nor_get_lost(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    wait_module_running(agent)
    for _ in range(3):  # long before the daemon's own handlers (after the config and the first dumps)
        agent.signal(signal.SIGHUP)
    agent.wait_selected("fibre", timeout=10)
    assert agent.proc.poll() is None
    agent.wait_log("reloaded ")  # the early SIGHUP is a reload once the agent runs
    assert agent.stop() == 0
    before = ruleset_snapshot(lab)
    early = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state2"), name="early")
    wait_module_running(early)
    early.signal(signal.SIGTERM)
    assert early.proc.wait(timeout=10) == 0  # a clean stop, before it changed anything
    assert ruleset_snapshot(lab) == before


def test_run_as_a_script_it_goes_on_compiled_with_its_pid_and_its_arguments(lab: Lab, tmp_path: Path) -> None:
    """The single file re-executes itself once, so that CPython does not keep the script's
    parse tree for the daemon's whole life (run_without_the_parse_tree): under the same PID
    (systemd's and procd's), with the loader and then the same arguments (for ps, pgrep and
    keepalived's track_process); named multiwan-agentd, as the daemon is however started."""
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_selected("fibre", timeout=10)
    argv = Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert argv[0] == sys.executable.encode() and b"-c" in argv
    assert argv[-5:] == [str(AGENT).encode(), b"run", b"-c", str(agent.config_path).encode(), b"-v"]
    assert Path(f"/proc/{agent.proc.pid}/comm").read_text() == "multiwan-agentd\n"
    assert agent.stop() == 0
    module = AgentProcess(
        lab,
        tmp_path,
        lab_config(tmp_path / "state"),
        name="module",
        program=(sys.executable, "-m", "multiwan_agent"),
        env={**os.environ, "PYTHONPATH": str(AGENT.parent)},
    )
    module.wait_selected("fibre", timeout=10)
    argv = Path(f"/proc/{module.proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert argv[1:3] == [b"-m", b"multiwan_agent"]  # imported, compiled by importlib: no re-exec
    assert Path(f"/proc/{module.proc.pid}/comm").read_text() == "multiwan-agentd\n"
    assert module.stop() == 0


def test_only_the_rtnetlink_part_of_pyroute2_is_imported(lab: Lab) -> None:
    """pyroute2's package __init__ imports every protocol it has (10 MiB); the agent loads
    IPRoute alone, and finds it again on a second call. A fresh interpreter in the router
    namespace, as the agent is; reading its links changes nothing."""
    program = (
        f"import sys; sys.path.insert(0, {str(AGENT.parent)!r}); import multiwan_agent as m; "
        "ipr = m.pyroute2_iproute(); assert ipr.__name__ == 'IPRoute', ipr; "
        "assert 'pyroute2.ndb' not in sys.modules and 'pyroute2.ipset' not in sys.modules; "
        "assert m.pyroute2_iproute() is ipr; "
        "h = ipr(); print(sorted(msg.get_attr('IFLA_IFNAME') for msg in h.get_links())); h.close()"
    )
    out = lab.run("router", sys.executable, "-c", program, check=False)
    assert out.returncode == 0, out.stderr
    assert "wan0" in out.stdout and "wan1" in out.stdout


CORRUPT = {
    "deep": "[" * 100_000,
    "array": "[]",
    "number": "42",
    "uplinks-array": '{"version": 1, "pid": 1, "updated": 0, "updated_monotonic": 0, "uplinks": []}',
    "since-yesterday": (
        '{"version": 1, "pid": 1, "updated": 0, "updated_monotonic": 0, '
        '"uplinks": {"fibre": {"state": "down", "since": "yesterday"}}}'
    ),
    "binary": "\x00\x01\x02\xff\xfe",
    "huge-number": (
        '{"version": 1, "pid": 1, "updated": 0, "updated_monotonic": 1' + "0" * 400 + ", "
        '"uplinks": {"fibre": {"state": "down", "since_monotonic": 1' + "0" * 400 + "}}}"
    ),
    "lone-surrogate": (
        '{"version": 1, "pid": 1, "updated": 0, "updated_monotonic": 0, '
        '"uplinks": {"fibre": {"state": "down", "reason": "\\ud800"}}}'
    ),
}


def test_corrupt_status_files_neither_stop_a_start_nor_crash_status(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    for name, content in CORRUPT.items():
        (state / "status.json").write_text(content, encoding="utf-8", errors="surrogateescape")
        shown = status_command(lab, state)
        assert shown.returncode == 3, (name, shown)
        assert "Traceback" not in shown.stderr and "its status cannot be read" in shown.stderr, (name, shown)
        agent = AgentProcess(lab, tmp_path, lab_config(state), name=f"agent-{name}")
        agent.wait_selected("fibre", timeout=10)
        assert "ignoring the previous run's status" in agent.log(), name
        assert agent.stop() == 0


def test_an_unwritable_status_file_is_warned_about_once(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_both_up()
    status = agent.state_dir / "status.json"
    status.unlink()
    status.mkdir()  # os.replace onto a directory fails
    lab.silent_drop("isp1", True)
    agent.wait_log("selected=lte")
    time.sleep(2.5)  # heartbeats and metrics writes fail meanwhile
    assert agent.log().count("cannot write") == 1
    status.rmdir()
    agent.wait_log(f"status: {status} is written again", timeout=10)
    assert agent.wait_selected("lte")
