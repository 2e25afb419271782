"""The rule block at scale, in the netns lab: a restart over an agent of the old
100-long layout, and 250 uplinks running.

The old layout (agents before RULE_BLOCK 1024): main 0, oif 10+i, source 40+i,
fwmark 70+i, the catch-all `lookup <default_table>` at 99, all from
rule_priority and with the agent's protocol id. The new one: main 0, oif 100+i,
source 356+i, fwmark 612+i, the catch-all at 1023.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from agent_proc import AgentProcess, lab_config
from lab import PROBE_TARGETS, Lab, RouteEvent

pytestmark = pytest.mark.lab

PROTOCOL = "240"
FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"
#: When the 250-uplink agent is past its start-up work (it took 13 s to the first count once).
STEADY_AFTER_S = 14.0

#: What a 2-uplink agent of the old layout left (fibre wan0 table 201 mark 0x100, lte wan1 202 0x200).
OLD_RULES = (
    ("5000", "lookup", "main", "suppress_prefixlength", "0"),
    ("5010", "oif", "wan0", "lookup", "201"),
    ("5011", "oif", "wan1", "lookup", "202"),
    ("5040", "from", FIBRE_IP, "lookup", "201"),
    ("5041", "from", LTE_IP, "lookup", "202"),
    ("5070", "fwmark", "0x100/0xff00", "lookup", "201"),
    ("5071", "fwmark", "0x200/0xff00", "lookup", "202"),
    ("5099", "lookup", "200"),
)
#: Its routes: the selected default (fibre) and each uplink table's two defaults.
OLD_ROUTES = (
    ("default", "via", "203.0.113.1", "dev", "wan0", "table", "200"),
    ("default", "via", "203.0.113.1", "dev", "wan0", "table", "201"),
    ("unreachable", "default", "table", "201", "metric", "4294901760"),
    ("default", "via", "203.0.113.5", "dev", "wan1", "table", "202"),
    ("unreachable", "default", "table", "202", "metric", "4294901760"),
)
NEW_PRIORITIES = [5000, 5100, 5101, 5356, 5357, 5612, 5613, 6023]


class Rule(NamedTuple):
    """One line of `ip rule show` / `ip monitor rule`, as far as the rule walk needs it."""

    priority: int
    source: str | None
    fwmark: int | None
    fwmask: int
    oif: str | None
    table: str
    suppress: bool

    def matches(self, oif: str | None, source: str | None, mark: int) -> bool:
        return (
            (self.source is None or self.source == source)
            and (self.fwmark is None or mark & self.fwmask == self.fwmark)
            and (self.oif is None or self.oif == oif)
        )


def parse_rule(text: str) -> Rule:
    """'5070:\\tfrom all fwmark 0x100/0xff00 lookup 201 proto 240' -> Rule."""
    head, _, rest = text.partition(":")
    words = rest.split()

    def word_after(key: str) -> str | None:
        return words[words.index(key) + 1] if key in words else None

    source = word_after("from")
    mark, _, mask = (word_after("fwmark") or "").partition("/")
    return Rule(
        int(head),
        None if source in (None, "all") else source,
        int(mark, 16) if mark else None,
        int(mask, 16) if mask else 0xFFFFFFFF,
        word_after("oif"),
        word_after("lookup") or word_after("table") or "",
        "suppress_prefixlength" in words,
    )


def table_for(rules: list[Rule], oif: str | None = None, source: str | None = None, mark: int = 0) -> str:
    """The table that answers a packet to the Internet: `local` holds no route for it,
    main's rule with suppress_prefixlength 0 falls through (its defaults are suppressed),
    every other table on the way holds a default."""
    for rule in sorted(rules, key=lambda r: r.priority):
        if rule.table == "local" or rule.suppress or not rule.matches(oif, source, mark):
            continue
        return rule.table
    return "none"


#: Paths that must hold at every moment of the migration: (what, oif, source, mark, table).
PATHS = (
    ("LAN traffic (the selection)", None, "198.51.100.10", 0, "200"),
    ("a probe bound to lte", "wan1", LTE_IP, 0, "202"),
    ("a reply from lte's address", None, LTE_IP, 0, "202"),
    ("a flow stuck to fibre", None, "198.51.100.10", 0x100, "201"),
    ("a flow stuck to lte", None, "198.51.100.10", 0x200, "202"),
)


def is_rule_event(event: RouteEvent) -> bool:
    head = event.route.split(":", 1)[0]
    return head.isdigit() and ":" in event.route


def our_priorities(lab: Lab) -> list[int]:
    return [r["priority"] for r in lab.rules("router") if r.get("protocol") == PROTOCOL]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def test_restart_over_an_old_layout_moves_the_rules_without_a_gap(lab: Lab, tmp_path: Path) -> None:
    for priority, *spec in OLD_RULES:
        lab.ip("router", "rule", "add", "priority", priority, *spec, "protocol", PROTOCOL)
    for route in OLD_ROUTES:
        lab.ip("router", "route", "add", *route, "proto", PROTOCOL)
    assert lab.connect_once() == FIBRE_IP  # what the old agent left routes the LAN
    before = [parse_rule(line) for line in lab.ip("router", "rule", "show").splitlines()]
    monitor = lab.monitor_routes("router", rules=True)
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_both_up()
    wait_until(lambda: our_priorities(lab) == NEW_PRIORITIES, 5, "the new layout")
    status = agent.wait_for(lambda s: s["running"], 5, "running")
    events = monitor.stop()

    assert "refusing to start" not in agent.log() and status["foreign"] == []
    rule_events = [e for e in events if is_rule_event(e)]
    added = [parse_rule(e.route).priority for e in rule_events if not e.deleted]
    deleted = [parse_rule(e.route).priority for e in rule_events if e.deleted]
    assert sorted(added) == NEW_PRIORITIES[1:]  # main's rule (5000) is the same in both
    assert deleted == [5099, 5071, 5070, 5041, 5040, 5011, 5010]  # the old catch-all first
    first_delete = next(i for i, e in enumerate(rule_events) if e.deleted)
    assert all(not e.deleted for e in rule_events[:first_delete]) and len(rule_events[:first_delete]) == 7
    # Replay the kernel's events: every path holds after each one.
    rules = list(before)
    wrong: list[str] = []
    for event in rule_events:
        rule = parse_rule(event.route)
        if event.deleted:
            rules.remove(rule)
        else:
            rules.append(rule)
        for what, oif, source, mark, table in PATHS:
            if table_for(rules, oif, source, mark) != table:
                wrong.append(f"after {event.line!r}: {what} takes {table_for(rules, oif, source, mark)}")
    assert wrong == []
    # The routes were the agent's already: not one default deleted, in any table.
    assert monitor.deleted_defaults() == []
    assert [r["dev"] for r in lab.default_routes("router", "200")] == ["wan0"]
    assert lab.connect_once() == FIBRE_IP
    assert agent.stop() == 0


# 250 uplinks ##################################################################


def scale_config(state_dir: Path, uplinks: list[tuple[str, str]]) -> str:
    targets = ", ".join(f'"{t}"' for t in PROBE_TARGETS)
    lines = [
        "[agent]",
        f'state_dir = "{state_dir}"',
        'hysteresis = "1s"',
        "[check]",
        f"targets = [{targets}]",
        'interval = "1s"',
        'timeout = "500ms"',
        "fall = 3",
        "rise = 2",
    ]
    for priority, (name, interface) in enumerate(uplinks, start=1):
        lines += ["[[uplink]]", f'name = "{name}"', f'interface = "{interface}"', f"priority = {priority}"]
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process, all its threads (/proc/PID/stat fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def test_250_uplinks_are_accepted_come_up_and_get_their_rules(lab: Lab, tmp_path: Path) -> None:
    extra = lab.add_extra_uplinks(248)
    uplinks = [("fibre", "wan0"), ("lte", "wan1")] + [(f"u{dev[3:]}", dev) for dev, _, _ in extra]
    assert len(uplinks) == 250
    started = time.monotonic()
    agent = AgentProcess(lab, tmp_path, scale_config(tmp_path / "state", uplinks))
    pid = agent.proc.pid
    status = agent.wait_for(
        lambda s: len(s["uplinks"]) == 250 and all(u["state"] == "up" for u in s["uplinks"].values()),
        30,
        "250 uplinks up",
    )
    all_up_s = time.monotonic() - started
    wait_until(lambda: len(our_priorities(lab)) == 752, 10, "752 rules")
    rules_s = time.monotonic() - started
    start_cpu_s = sum(cpu_seconds(pid))
    assert status["selected"] == "fibre"
    # main 0, oif 100-349, source 356-605, fwmark 612-861, the selection 1023
    expected = [5000, *range(5100, 5350), *range(5356, 5606), *range(5612, 5862), 6023]
    assert our_priorities(lab) == expected
    last = next(r for r in lab.rules("router") if r["priority"] == 5861)
    assert (last["fwmark"], last["table"]) == ("0xfa00", str(status["uplinks"]["u249"]["table"]))
    assert status["uplinks"]["u50"]["table"] == 251 and status["uplinks"]["u51"]["table"] == 256
    assert lab.connect_once() == FIBRE_IP
    # The first conntrack count (one dump per family past 4 marks); the agent then spaces
    # them out to stay under 0.5 % of a core. Steady state is measured after it.
    agent.wait_for(
        lambda s: all(u["connections"] is not None for u in s["uplinks"].values()), 30, "the first count"
    )
    counted_s, count_cpu_s = time.monotonic() - started, sum(cpu_seconds(pid)) - start_cpu_s
    # Steady state: CPU over 5 s of the agent's own clock (its status updates), probes
    # running, from STEADY_AFTER_S after the start (the uplinks' first rounds, the first
    # writes of a 250-uplink status and the first count are start-up work).
    time.sleep(max(started + STEADY_AFTER_S - time.monotonic(), 0.0))
    steady_from, (user_from, system_from) = time.monotonic(), cpu_seconds(pid)
    # At 250 uplinks a status write is dear, so rtt/loss refreshes come at the 5 s heartbeat.
    agent.wait_for(lambda s: s["updated_monotonic"] >= steady_from + 5, 20, "5 s of running")
    user_to, system_to = cpu_seconds(pid)
    elapsed = time.monotonic() - steady_from
    user_pct, system_pct = (
        100 * (b - a) / elapsed for a, b in ((user_from, user_to), (system_from, system_to))
    )
    stop_from = time.monotonic()
    assert agent.stop() == 0
    stop_s = time.monotonic() - stop_from
    print(
        f"\n250 uplinks: all up after {all_up_s:.1f} s, all rules after {rules_s:.1f} s, "
        f"{start_cpu_s:.1f} s of CPU to get there; first conntrack count done at {counted_s:.1f} s "
        f"({count_cpu_s:.1f} s of CPU); then {user_pct:.1f}% user + {system_pct:.1f}% system of a core; "
        f"stopped in {stop_s:.1f} s"
    )
    # A dump per table (40 s of CPU a reconcile here) took 37 s and 31 s of CPU to get there.
    assert all_up_s < 20 and start_cpu_s < 15 and user_pct + system_pct < 50
