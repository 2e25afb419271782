"""Config that `check` accepts runs; config it refuses exits 2 and changes nothing (issue 12).

Before the config hardening `run` took a NUL in state_dir and an infinite sticky_timeout,
installed its rules and routes, then died on the status write or the nft load and left
them behind, even with --cleanup.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from agent_proc import AGENT, AgentProcess, lab_config, ruleset_snapshot
from lab import Lab

pytestmark = pytest.mark.lab

#: The longest sticky_timeout there is, with NAT: what `check` accepts, `run` must load.
STICKY_AT_ITS_BOUND = '[agent]\nsticky = "source"\nsticky_timeout = "168h"\n'


def agent_command(lab: Lab, *args: str) -> tuple[int, str, str]:
    proc = lab.run("router", sys.executable, str(AGENT), *args, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_a_config_check_accepts_runs_and_stops_cleanly(lab: Lab, tmp_path: Path) -> None:
    before = ruleset_snapshot(lab)
    text = lab_config(tmp_path / "state").replace("[agent]\n", STICKY_AT_ITS_BOUND, 1)
    text = text.replace('name = "lte"\n', 'name = "lte"\nnat = true\nnat_exclude = ["198.51.100.0/24"]\n')
    config = tmp_path / "good.toml"
    config.write_text(text)
    code, _, stderr = agent_command(lab, "check", "-c", str(config))
    # Only the lab's probe-rate warning: the table passes `nft -c`, the interfaces exist.
    assert code == 0 and "nft" not in stderr and "does not exist" not in stderr, stderr
    agent = AgentProcess(lab, tmp_path, text, "--cleanup")
    agent.wait_both_up()
    table = lab.run("router", "nft", "list", "table", "inet", "multiwan").stdout
    assert re.search(r"\btimeout (7d|1w|604800s)\b", table), table  # nft shows it in its own units
    assert agent.stop() == 0
    assert "Traceback" not in agent.log()
    assert ruleset_snapshot(lab) == before


@pytest.mark.parametrize(
    ("what", "key_path"),
    [
        ("nul-in-state-dir", "agent.state_dir"),
        ("infinite-sticky-timeout", "agent.sticky_timeout"),
        ("interface-with-newline", "uplink[1].interface"),
    ],
)
def test_a_config_run_could_not_finish_exits_2_and_changes_nothing(
    lab: Lab, tmp_path: Path, what: str, key_path: str
) -> None:
    state_dir = tmp_path / "state"
    text = lab_config(state_dir)
    if what == "nul-in-state-dir":
        text = text.replace(f'state_dir = "{state_dir}"', f'state_dir = "{state_dir}\\u0000x"')
    elif what == "infinite-sticky-timeout":
        text = text.replace("[agent]\n", f'[agent]\nsticky = "source"\nsticky_timeout = "{"1" * 400}s"\n')
    else:
        text = text.replace('interface = "wan1"', 'interface = "wan1\\n"')
    config = tmp_path / f"{what}.toml"
    config.write_text(text)
    before = ruleset_snapshot(lab)
    for command in (("check",), ("run", "--cleanup")):
        code, _, stderr = agent_command(lab, *command, "-c", str(config))
        assert code == 2, (command, stderr)
        assert f"error: {config}: {key_path}: expected " in stderr, stderr
        assert "Traceback" not in stderr
    assert ruleset_snapshot(lab) == before
    assert not state_dir.exists()  # not even the lock was taken
