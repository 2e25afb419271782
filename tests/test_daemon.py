"""The daemon's own logic, without a kernel: the watchdog and the conntrack edge's job boundary.

What these stand in for (an nft run, a conntrack dump) is replaced by a stub that is
stuck or raises: the test is of what the daemon does about it, not of the kernel
interface, which the lab tests (test_lab_daemon.py) exercise for real.
"""

from __future__ import annotations

import asyncio
import py_compile
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import multiwan_agent as mwa

ROOT = Path(__file__).resolve().parent.parent


class Sent:
    """A Notifier that keeps what it would send."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.watchdog_s = 0.2

    def send(self, message: str) -> None:
        self.messages.append(message)


class Edge:
    def __init__(self, stuck: float | None = None, answers: bool = True) -> None:
        self.stuck = stuck
        self._answers = answers

    def stuck_for(self, now: float) -> float | None:
        return self.stuck

    async def answers(self, timeout_s: float) -> bool:
        return self._answers


@pytest.mark.parametrize("broken", ["pump", "routes", "nft", "conntrack"])
def test_the_watchdog_is_fed_only_while_every_edge_answers(
    broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    edges = {name: Edge() for name in ("pump", "routes", "nft", "conntrack")}
    notifier = Sent()

    async def run() -> None:
        task = asyncio.ensure_future(
            mwa.feed_watchdog(notifier, 0.2, *(edges[n] for n in ("pump", "routes", "nft", "conntrack")))  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.25)
        assert notifier.messages.count("WATCHDOG=1") >= 2
        edges[broken] = Edge(stuck=6.0, answers=False)
        fed = notifier.messages.count("WATCHDOG=1")
        task.cancel()
        task = asyncio.ensure_future(
            mwa.feed_watchdog(notifier, 0.2, *(edges[n] for n in ("pump", "routes", "nft", "conntrack")))  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.35)
        task.cancel()
        assert notifier.messages.count("WATCHDOG=1") == fed

    asyncio.run(run())
    assert "withholding the watchdog" in caplog.text
    assert caplog.text.count("withholding the watchdog") == 1  # once per episode, not per period


def test_a_release_that_raises_is_reported_and_the_edge_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = mwa.parse_config(
        '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "a"\ninterface = "w0"\n', "t"
    )
    posted: list[object] = []

    def broken_release(*args: object) -> mwa.Released:
        raise ValueError("odd-length address attribute")

    monkeypatch.setattr(mwa, "conntrack_release", broken_release)
    monkeypatch.setattr(mwa, "conntrack_counts", lambda *args: {"a": 0})

    async def run() -> None:
        edge = mwa.ConntrackEdge(config, posted.append, threading.Event(), dry_run=False)
        task = asyncio.ensure_future(edge.run())
        edge.release(mwa.FlowRelease("a", 0x100, 0xFF00, frozenset({4}), frozenset()))
        for _ in range(200):
            if any(isinstance(p, mwa.ReleaseFinished) for p in posted):
                break
            await asyncio.sleep(0.01)
        assert not task.done()  # the task lives on
        task.cancel()
        edge.close()

    asyncio.run(run())
    (finished,) = [p for p in posted if isinstance(p, mwa.ReleaseFinished)]
    assert finished.uplink == "a" and finished.released.error == "ValueError: odd-length address attribute"
    assert "uplink=a release of its connections failed" in caplog.text and "Traceback" in caplog.text


@pytest.mark.parametrize("form", ["pyc", "stdin"])
def test_run_without_a_source_file_to_load_again_runs_on_as_it_is(form: str, tmp_path: Path) -> None:
    """The single file's re-exec loads the script again: from bytecode or from stdin there is
    nothing to load (and no parse tree to shed), so `run` goes on where it is. A bad config
    shows it got as far as reading the config, with exit 2, before any side effect."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    if form == "pyc":
        pyc = tmp_path / "multiwan_agent.pyc"
        py_compile.compile(str(ROOT / "multiwan_agent.py"), cfile=str(pyc), doraise=True)
        argv, stdin = [sys.executable, str(pyc)], None
    else:
        argv, stdin = [sys.executable, "-"], (ROOT / "multiwan_agent.py").read_text()
    out = subprocess.run(
        [*argv, "run", "-c", str(bad)], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "invalid TOML" in out.stderr and "Traceback" not in out.stderr
