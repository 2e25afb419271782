"""systemd integration: the unit file, and sd_notify over a real socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_proc import AGENT, lab_config
from lab import Lab

import multiwan_agent as mwa

UNIT = Path(__file__).resolve().parent.parent / "multiwan-agent.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_is_hardened_as_promised() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["WatchdogSec"] and s["RuntimeDirectory"] == ["multiwan-agent"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK AF_INET AF_INET6"]
    assert s["After"] == ["network-online.target"] and s["Wants"] == ["network-online.target"]
    assert s["RestartPreventExitStatus"] == ["2 3"]  # a bad config or a refused start: no retry loop


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies() -> None:
    out = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "is not executable" not in line and "/usr/local/bin/multiwan-agent" not in line
    ]
    assert problems == []


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    return sock


def _collect(sock: socket.socket, until: float, stop_when: str = "") -> list[str]:
    messages: list[str] = []
    while time.monotonic() < until:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if stop_when and stop_when in messages[-1]:
            break
    return messages


def test_notifier_without_sdnotify_speaks_the_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenWrt has no sdnotify: the built-in sender must produce the same datagrams."""
    sock = _listen(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setitem(sys.modules, "sdnotify", None)  # makes `import sdnotify` fail
    notifier = mwa.Notifier()
    notifier.send("READY=1\nSTATUS=ok")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_watchdog_period_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert mwa.Notifier().watchdog_s == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert mwa.Notifier().watchdog_s is None


@pytest.mark.lab
def test_agent_notifies_ready_status_watchdog_and_stopping(lab: Lab, tmp_path: Path) -> None:
    sock = _listen(tmp_path / "notify")
    config = tmp_path / "agent.toml"
    config.write_text(lab_config(tmp_path / "state"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="300000")
    proc = lab.popen(
        "router",
        [sys.executable, str(AGENT), "run", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    messages = _collect(sock, time.monotonic() + 10, stop_when="selected=fibre")
    ready = [m for m in messages if "READY=1" in m]
    assert ready, messages
    assert any(m.startswith("STATUS=selected=fibre") for m in messages), messages
    more = _collect(sock, time.monotonic() + 0.8)
    assert sum("WATCHDOG=1" in m for m in more) >= 3, more  # every 150 ms
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    assert any("STOPPING=1" in m for m in _collect(sock, time.monotonic() + 2, stop_when="STOPPING=1"))
