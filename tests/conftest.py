"""Shared pytest setup: the `lab` marker and the namespace-lab fixture."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make `import lab` work whether or not tests/ becomes a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import Lab  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs root and network namespaces")


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
