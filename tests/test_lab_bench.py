"""The side-by-side benchmark's contender works: shell_loop.sh fails over in a lab.

tests/bench/side_by_side.py compares the agent with tests/bench/shell_loop.sh; this
runs the loop (interval 200 ms, fall 3, rise 3) in the lab's router for one silent
failure of isp1 and checks it points the main table's default at wan1, so a bad
comparison cannot come from a loop that never switches. And the script's --help runs.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from lab import Lab

BENCH = Path(__file__).resolve().parent / "bench"
sys.path.insert(0, str(BENCH))

from side_by_side import ShellLoop, wait_route  # noqa: E402

pytestmark = pytest.mark.lab


@pytest.mark.lab(dhcp_defaults=False)
def test_shell_loop_fails_over_on_a_silent_failure(lab: Lab) -> None:
    with tempfile.TemporaryDirectory(prefix="mwt-shell-") as tmp:
        monitor = lab.monitor_routes("router")
        loop = ShellLoop(lab, interval=0.2, fall=3, rise=3, log=Path(tmp) / "shell.log")
        try:
            t0 = time.monotonic()
            lab.silent_drop("isp1", True)
            # Each failed ping waits its 1 s -W: fall x (interval + 1 s) = 3.6 s, plus slack.
            took = wait_route(monitor, t0, "wan1", "main", timeout_s=15)
            log_path = Path(tmp) / "shell.log"
            # The loop logs its switch after `ip route replace` returns, so the
            # route can be seen before the line is written: wait for it, bounded.
            log = log_path.read_text()
            for _ in range(50):
                if "failover: " in log:
                    break
                time.sleep(0.1)
                log = log_path.read_text()
            assert took is not None, f"the shell loop did not fail over; its log:\n{log}"
            assert "failover: 3 failures" in log, log
        finally:
            loop.stop()
            lab.silent_drop("isp1", False)


def test_side_by_side_help() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "side_by_side.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--no-scale" in result.stdout and "--runs" in result.stdout
