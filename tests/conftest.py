"""Shared pytest setup: the `lab` marker and the namespace-lab fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make `import lab` work whether or not tests/ becomes a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import Lab  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs root and network namespaces")


#: The suite's 3-minute soak runs beside the other tests, in a lab and a process of its
#: own (its namespaces have their own prefix): three minutes of mostly waiting would
#: otherwise be three minutes of the suite's. The test itself waits for it and judges it.
SOAK_TEST = "test_a_3_minute_soak_of_random_faults_grows_nothing_and_settles_on_fibre"
SOAK_ARGS = ("--minutes", "3", "--seed", "12", "--sample", "5", "--rss-bar", "10240")
_background_soak: tuple[subprocess.Popen[bytes], Path] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    global _background_soak
    if lab_unavailable_reason() is not None or not any(item.name == SOAK_TEST for item in session.items):
        return
    handle, name = tempfile.mkstemp(prefix="mwt-soak-", suffix=".log")
    script = Path(__file__).resolve().parent / "bench" / "soak.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), *SOAK_ARGS], stdout=handle, stderr=subprocess.STDOUT
    )
    os.close(handle)
    _background_soak = (proc, Path(name))


def background_soak() -> tuple[subprocess.Popen[bytes], Path] | None:
    """The soak started beside the suite (its process and its output), if it was."""
    return _background_soak


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _background_soak is None:
        return
    proc, log = _background_soak
    if proc.poll() is None:  # the run ended early (a failure, -x, ^C): stop it, lab and all
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    log.unlink(missing_ok=True)


def lab_unavailable_reason() -> str | None:
    """Why the namespace lab cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, nftables)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"lab tests need {' and '.join(missing)} on PATH"
    if not os.path.isdir("/proc/sys/net/ipv6"):
        return "lab tests need IPv6 in the kernel (the lab is dual stack)"
    return None


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A freshly built lab, torn down after the test even if it fails.

    Options for Lab() come from the marker: @pytest.mark.lab(dhcp_defaults=False).
    """
    reason = lab_unavailable_reason()
    if reason is not None:
        if os.environ.get("MULTIWAN_REQUIRE_LAB"):
            pytest.fail(f"MULTIWAN_REQUIRE_LAB is set but {reason}")
        pytest.skip(reason)
    marker = request.node.get_closest_marker("lab")
    options = dict(marker.kwargs) if marker is not None else {}
    with Lab(**options) as built:
        yield built
