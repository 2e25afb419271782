"""Run multiwan-agent as a real process inside a lab's router namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from lab import Lab

AGENT: Final = Path(__file__).resolve().parent.parent / "multiwan_agent.py"
POLL_S: Final = 0.01

#: A lab config: both uplinks probe both targets every 100 ms.
LAB_CONFIG: Final = """\
[agent]
state_dir = "{state_dir}"
hysteresis = "{hysteresis}"

[check]
targets = ["198.18.1.1", "198.18.1.2"]
interval = "{interval}"
timeout = "{timeout}"
fall = {fall}
rise = {rise}

[[uplink]]
name = "fibre"
interface = "wan0"
gateway = "auto"
priority = 1

[[uplink]]
name = "lte"
interface = "wan1"
gateway = "auto"
priority = 2
"""


def lab_config(
    state_dir: Path,
    hysteresis: str = "1s",
    interval: str = "100ms",
    timeout: str = "100ms",
    fall: int = 3,
    rise: int = 3,
    extra: str = "",
) -> str:
    return (
        LAB_CONFIG.format(
            state_dir=state_dir,
            hysteresis=hysteresis,
            interval=interval,
            timeout=timeout,
            fall=fall,
            rise=rise,
        )
        + extra
    )


class AgentProcess:
    """`multiwan_agent.py run` in the router namespace, with its log in a file."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        config_text: str,
        *args: str,
        name: str = "agent",
        env: dict[str, str] | None = None,
        program: Sequence[str] = (),
        role: str = "router",
    ) -> None:
        """`program` replaces `python multiwan_agent.py` (e.g. a wrapper that injects a fault);
        `env` replaces the environment (e.g. a PATH with a fake `nft` first)."""
        self.lab = lab
        self.workdir = workdir
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.state_dir = workdir / "state"
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "a")
        self.proc = lab.popen(
            role,
            [*(program or (sys.executable, str(AGENT))), "run", "-c", str(self.config_path), "-v", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self) -> dict[str, Any] | None:
        try:
            result = json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError, RecursionError):  # a test may have written garbage there
            return None
        return result if isinstance(result, dict) else None

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str = ""
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            status = self.status()
            if status is not None and status.get("pid") == self.agent_pid() and predicate(status):
                return status
            time.sleep(POLL_S)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; status={self.status()}\n{self.log()}"
        )

    def wait_selected(self, name: str | None, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_for(lambda s: s.get("selected") == name, timeout, f"selected={name}")

    def wait_both_up(self, timeout: float = 10.0) -> dict[str, Any]:
        """The lab's steady state: fibre selected and lte up as its backup."""
        return self.wait_for(
            lambda s: s["selected"] == "fibre" and s["uplinks"]["lte"]["state"] == "up", timeout, "both up"
        )

    def wait_state(self, uplink: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        return self.wait_for(lambda s: s["uplinks"][uplink]["state"] == state, timeout, f"{uplink} {state}")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(POLL_S)
        raise AssertionError(f"{text!r} not in the agent log:\n{self.log()}")

    def agent_pid(self) -> int | None:
        # `ip netns exec` execs the command, so the Popen pid is the agent's.
        return self.proc.pid

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code


@contextmanager
def hup_storm(
    agent: AgentProcess, configs: Sequence[str], count: int, period_s: float = 0.1
) -> Iterator[None]:
    """While the block runs: `count` SIGHUPs, `period_s` apart, each after writing the next
    of `configs` (in turn) as the agent's config; the storm ends with the block."""
    stop = threading.Event()

    def storm() -> None:
        for i in range(count):  # bounded: count x period_s
            if stop.wait(period_s):
                return
            agent.config_path.write_text(configs[i % len(configs)])
            agent.signal(signal.SIGHUP)

    sender = threading.Thread(target=storm, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(timeout=10)


def status_command(lab: Lab, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`multiwan-agent status` as an operator runs it (in the router namespace)."""
    return lab.run(
        "router", sys.executable, str(AGENT), "status", "--state-dir", str(state_dir), *args, check=False
    )


def fake_tool_dir(workdir: Path, name: str, body: str) -> dict[str, str]:
    """An environment whose PATH finds a fake `name` (a shell script with `body`) first."""
    directory = workdir / "fake-bin"
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{directory}:{os.environ.get('PATH', '/usr/bin:/bin')}")


def ruleset_snapshot(lab: Lab) -> tuple[Any, ...]:
    """Everything the agent could touch in the router, for before/after comparisons."""
    return (
        lab.rules("router"),
        # IPv4 only: IPv6 link-local routes appear by themselves after DAD.
        lab.ip_json("router", "-4", "route", "show", "table", "all"),
        lab.run("router", "nft", "list", "ruleset").stdout,
    )
