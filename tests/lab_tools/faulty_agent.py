#!/usr/bin/env python3
"""The agent with one bug injected into its own code, for the lab's supervision tests.

    faulty_agent.py MODE run -c CONFIG ...

MODE is one of:
  probe-target   every ICMP probe to 198.18.1.2 raises (a bug in a probe method)
  probe-round    every other probe round raises before any probe is sent
  edge-once      the conntrack edge's count raises once (a dying task, restarted)
  pump           the pump raises on the first probe round (the agent must exit non-zero)

It imports the real module and replaces one function, then runs main(): the
rest is the agent as shipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import multiwan_agent as mwa  # noqa: E402


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "probe-target":
        ping = mwa.IcmpEcho.ping

        def broken_ping(self: mwa.IcmpEcho, target: str, seq: int, timeout_s: float, **options: Any) -> None:
            if target == "198.18.1.2":
                raise RuntimeError("injected bug in a probe method")
            ping(self, target, seq, timeout_s, **options)

        mwa.IcmpEcho.ping = broken_ping  # type: ignore[method-assign]
    elif mode == "probe-round":
        collect = mwa.UplinkProber._collect
        calls: dict[str, int] = {}

        def broken_round(self: mwa.UplinkProber, *args: Any) -> mwa.RoundResult:
            calls[self.uplink.name] = calls.get(self.uplink.name, 0) + 1
            if calls[self.uplink.name] % 2:
                raise KeyError("injected bug in the round")
            return collect(self, *args)

        mwa.UplinkProber._collect = broken_round  # type: ignore[method-assign]
    elif mode == "edge-once":
        count = mwa.ConntrackEdge._count
        raised = {"done": False}

        async def broken_count(self: mwa.ConntrackEdge) -> tuple[dict[str, int] | None, float]:
            if not raised["done"]:
                raised["done"] = True
                raise ZeroDivisionError("injected bug in the conntrack edge")
            return await count(self)

        mwa.ConntrackEdge._count = broken_count  # type: ignore[method-assign]
    elif mode == "pump":

        def broken_round(state: mwa.AgentState, result: mwa.RoundResult, now: float) -> object:
            raise AssertionError("injected bug in the core")

        mwa.on_round = broken_round  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return mwa.main(argv)


if __name__ == "__main__":
    sys.exit(main())
