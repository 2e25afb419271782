"""Route plan, diff and collision checks: pure functions over netlink-shaped data."""

from __future__ import annotations

import socket
import struct

import multiwan_agent as mwa

CONFIG = mwa.parse_config(
    """
[check]
targets = ["198.18.1.1"]
[[uplink]]
name = "fibre"
interface = "wan0"
priority = 1
[[uplink]]
name = "lte"
interface = "wan1"
gateway = "203.0.113.5"
priority = 2
[[uplink]]
name = "vpn"
interface = "wg0"
gateway = "none"
priority = 3
""",
    "t.toml",
)
IFACES = {
    "wan0": mwa.Interface("wan0", 2, True, True, "203.0.113.2", "203.0.113.1"),
    "wan1": mwa.Interface("wan1", 3, True, True, "203.0.113.6", None),
    "wg0": mwa.Interface("wg0", 4, True, True, "198.18.5.1", None),
}
INDEXES = {name: i.index for name, i in IFACES.items()}
P = mwa.AgentConfig().route_protocol


def installed(plan: mwa.NetPlan) -> tuple[list[mwa.RuleEntry], list[mwa.RouteEntry]]:
    """What the kernel would hold after applying `plan`."""
    rules = [
        mwa.RuleEntry(
            r.priority, r.table, P, r.fwmark, r.fwmask, r.source, r.oifname, r.suppress_prefixlength
        )
        for r in plan.rules
    ]
    return rules, installed_routes(plan, INDEXES)


def installed_routes(plan: mwa.NetPlan, indexes: dict[str, int]) -> list[mwa.RouteEntry]:
    """As the kernel dumps them: an IPv6 `unreachable` route comes back with oif lo (1)."""
    return [
        mwa.RouteEntry(
            r.table,
            (1 if r.family == 6 else None) if r.unreachable else indexes[r.interface],
            r.gateway,
            P,
            r.family,
            r.unreachable,
        )
        for r in plan.uplink_routes + plan.default_routes + plan.unreachable_routes
    ]


def test_plan_shape() -> None:
    plan = mwa.plan_network(CONFIG, IFACES, {4: "fibre"})
    described = [r.describe() for r in plan.rules]
    assert described == [
        "5000: from all lookup main suppress_prefixlength 0",
        "5100: from all oif wan0 lookup 201",
        "5101: from all oif wan1 lookup 202",
        "5102: from all oif wg0 lookup 203",
        "5356: from 203.0.113.2 lookup 201",
        "5357: from 203.0.113.6 lookup 202",
        "5358: from 198.18.5.1 lookup 203",
        "5612: from all fwmark 0x100/0xff00 lookup 201",
        "5613: from all fwmark 0x200/0xff00 lookup 202",
        "5614: from all fwmark 0x300/0xff00 lookup 203",
        "6023: from all lookup 200",
    ]
    assert plan.uplink_routes == (
        mwa.RouteSpec(201, "wan0", "203.0.113.1"),  # auto: follows DHCP
        mwa.RouteSpec(202, "wan1", "203.0.113.5"),  # static
        mwa.RouteSpec(203, "wg0", None),  # point-to-point
    )
    assert plan.default_routes == (mwa.RouteSpec(200, "wan0", "203.0.113.1"),)


def test_diff_of_an_empty_system_adds_routes_before_rules() -> None:
    plan = mwa.plan_network(CONFIG, IFACES, {4: "fibre"})
    changes = mwa.diff_network(CONFIG, plan, [], [], INDEXES, CONFIG.tables)
    kinds = [c.kind for c in changes]
    assert kinds == ["replace_route"] * 7 + ["add_rule"] * 11
    # every uplink table ends in `unreachable`: a flow of a vanished uplink never leaks elsewhere
    assert [c.describe() for c in changes[4:7]] == [
        f"replace_route ipv4 unreachable default metric {mwa.UNREACHABLE_METRIC} table {t}"
        for t in (201, 202, 203)
    ]


def test_diff_of_an_applied_plan_is_empty_and_switch_is_one_replace() -> None:
    plan = mwa.plan_network(CONFIG, IFACES, {4: "fibre"})
    rules, routes = installed(plan)
    assert mwa.diff_network(CONFIG, plan, rules, routes, INDEXES, CONFIG.tables) == []
    switched = mwa.plan_network(CONFIG, IFACES, {4: "lte"})
    changes = mwa.diff_network(CONFIG, switched, rules, routes, INDEXES, CONFIG.tables)
    assert changes == [mwa.Change("replace_route", route=mwa.RouteSpec(200, "wan1", "203.0.113.5"))]


def test_diff_never_deletes_the_selected_default_nor_foreign_objects() -> None:
    plan = mwa.plan_network(CONFIG, IFACES, {4: "fibre"})
    rules, routes = installed(plan)
    nothing_selected = mwa.plan_network(CONFIG, IFACES, {4: None})
    foreign_rule = mwa.RuleEntry(5050, 77, 4)  # inside our range but not ours: never deleted
    foreign_route = mwa.RouteEntry(201, 2, "203.0.113.9", 16)
    changes = mwa.diff_network(
        CONFIG, nothing_selected, rules + [foreign_rule], routes + [foreign_route], INDEXES, CONFIG.tables
    )
    assert all(c.kind != "del_route" for c in changes)
    assert all(c.rule is None or c.rule.priority != 5050 for c in changes)


def test_vanished_interface_drops_its_source_rule_and_route() -> None:
    plan = mwa.plan_network(CONFIG, IFACES, {4: "fibre"})
    rules, routes = installed(plan)
    without_wan1 = {k: v for k, v in IFACES.items() if k != "wan1"}
    changes = mwa.diff_network(
        CONFIG, mwa.plan_network(CONFIG, without_wan1, {4: "fibre"}), rules, routes, INDEXES, CONFIG.tables
    )
    described = sorted(c.describe() for c in changes)
    assert described == [
        "del_route ipv4 default table 202",
        "del_rule ipv4 5357: from 203.0.113.6 lookup 202",
    ]


def test_collisions() -> None:
    ours = mwa.RuleEntry(5100, 201, P, oifname="wan0")
    assert mwa.find_collisions(CONFIG, [ours], []) == []
    problems = mwa.find_collisions(
        CONFIG,
        [
            mwa.RuleEntry(5050, 254, 4),  # someone else's rule in our range
            mwa.RuleEntry(100, 202, 4),  # a rule into our table
            mwa.RuleEntry(200, 99, 4, fwmark=0x200, fwmask=0xFF00),  # our mark
            mwa.RuleEntry(201, 99, 4, fwmark=0x1, fwmask=0xFF),  # other bits: fine
        ],
        [mwa.RouteEntry(203, 4, None, 3)],  # a static route in our table
    )
    assert len(problems) == 4, problems
    assert "5050" in problems[0] and "table 202" in problems[1]
    assert "lte's mark 0x200" in problems[2] and "table 203" in problems[3]


# 250 uplinks ----------------------------------------------------------------------------

MANY = mwa.parse_config(
    '[check]\ntargets = ["198.18.1.1"]\n'
    + "".join(f'[[uplink]]\nname = "u{i}"\ninterface = "wan{i}"\n' for i in range(250)),
    "t.toml",
)
MANY_IFACES = {
    f"wan{i}": mwa.Interface(f"wan{i}", 10 + i, True, True, f"198.19.{2 + i}.2", f"198.19.{2 + i}.1")
    for i in range(250)
}


def test_the_layout_has_a_slot_per_uplink_for_each_kind_and_no_old_position() -> None:
    slots = [
        (mwa.RULE_OIF_OFFSET, mwa.RULE_SOURCE_OFFSET),
        (mwa.RULE_SOURCE_OFFSET, mwa.RULE_MARK_OFFSET),
        (mwa.RULE_MARK_OFFSET, mwa.RULE_DEFAULT_OFFSET),
    ]
    assert all(end - start >= mwa.MAX_UPLINKS for start, end in slots)
    assert mwa.RULE_MAIN_OFFSET == 0 and mwa.RULE_DEFAULT_OFFSET == mwa.RULE_BLOCK - 1
    # the 100-long layout: main 0, oif 10-38, source 40-68, fwmark 70-98, selection 99
    new = set().union(*(range(start, start + mwa.MAX_UPLINKS) for start, _ in slots))
    assert new.isdisjoint(range(1, 100)) and mwa.RULE_DEFAULT_OFFSET >= 100


def test_plan_of_250_uplinks() -> None:
    plan = mwa.plan_network(MANY, MANY_IFACES, {4: "u0"})
    priorities = [r.priority for r in plan.rules]
    assert len(plan.rules) == 1 + 3 * 250 + 1 and len(set(priorities)) == len(priorities)
    assert min(priorities) == 5000 and max(priorities) == 6023
    by_priority = {r.priority: r for r in plan.rules}
    last = MANY.uplinks[249]
    assert by_priority[5349] == mwa.RuleSpec(5349, last.table, oifname="wan249")
    assert by_priority[5605] == mwa.RuleSpec(5605, last.table, source="198.19.251.2")
    assert by_priority[5861] == mwa.RuleSpec(5861, last.table, fwmark=0xFA00, fwmask=0xFF00)
    assert by_priority[6023] == mwa.RuleSpec(6023, 200)
    assert {r.table for r in plan.rules} == MANY.tables | {254}
    indexes = {name: i.index for name, i in MANY_IFACES.items()}
    changes = mwa.diff_network(MANY, plan, [], [], indexes, MANY.tables)
    assert [c.kind for c in changes].count("add_rule") == 752
    rules = [
        mwa.RuleEntry(
            r.priority, r.table, P, r.fwmark, r.fwmask, r.source, r.oifname, r.suppress_prefixlength
        )
        for r in plan.rules
    ]
    routes = installed_routes(plan, indexes)
    assert mwa.diff_network(MANY, plan, rules, routes, indexes, MANY.tables) == []
    assert mwa.find_collisions(MANY, rules, routes) == [] and mwa.find_foreign(MANY, rules, routes) == ()
    # another program's rule anywhere in 5000-6023 collides; just past it does not
    others = [mwa.RuleEntry(5950, 77, 4), mwa.RuleEntry(6024, 77, 4)]
    (problem,) = mwa.find_collisions(MANY, others, [])
    assert "priority 5950" in problem and "range 5000-6023" in problem


# A restart over an agent of the 100-long layout -------------------------------------


def old_layout_rules(config: mwa.Config, interfaces: dict[str, mwa.Interface]) -> list[mwa.RuleEntry]:
    """The rules an agent before RULE_BLOCK 1024 left: main 0, oif 10+i, source 40+i,
    fwmark 70+i and the catch-all at 99, same protocol, same base."""
    base, mask = config.agent.rule_priority, config.agent.mark_mask
    rules = [mwa.RuleEntry(base, 254, P, suppress_prefixlength=0)]
    for i, uplink in enumerate(config.uplinks):
        rules.append(mwa.RuleEntry(base + 10 + i, uplink.table, P, oifname=uplink.interface))
        source = interfaces[uplink.interface].address
        if source is not None:
            rules.append(mwa.RuleEntry(base + 40 + i, uplink.table, P, source=source))
        rules.append(mwa.RuleEntry(base + 70 + i, uplink.table, P, fwmark=uplink.mark, fwmask=mask))
    rules.append(mwa.RuleEntry(base + 99, config.agent.default_table, P))
    return rules


def lookup(rules: list[mwa.RuleSpec], oif: str | None = None, src: str | None = None, mark: int = 0) -> int:
    """The table the kernel's rule walk picks for a packet to the Internet: main's rule
    with suppress_prefixlength 0 falls through (main's default is suppressed), every
    table of ours holds a default, so the first other match is the answer."""
    for rule in sorted(rules, key=lambda r: r.priority):
        if rule.suppress_prefixlength is not None:
            continue
        if rule.fwmark is not None and (mark & (rule.fwmask or 0xFFFFFFFF)) != rule.fwmark:
            continue
        if rule.source is not None and rule.source != src:
            continue
        if rule.oifname is not None and rule.oifname != oif:
            continue
        return rule.table
    return 254  # main, the kernel's own rule at 32766


#: Packets whose path must never change while the layout migrates: (what, oif, src, mark, table).
PACKETS = (
    ("LAN traffic to the selection", None, "198.51.100.10", 0, 200),
    ("a probe bound to wan1", "wan1", "203.0.113.6", 0, 202),
    ("a reply from wan1's address", None, "203.0.113.6", 0, 202),
    ("a flow stuck to lte (mark 0x200)", None, "198.51.100.10", 0x200, 202),
    ("a flow stuck to vpn (mark 0x300)", None, "198.51.100.10", 0x300, 203),
)


def paths_while_applying(changes: list[mwa.Change], start: list[mwa.RuleEntry]) -> list[str]:
    """Apply the rule changes one at a time; every misrouted packet, after each step."""
    rules = [r.spec() for r in start]
    wrong: list[str] = []
    for step, change in enumerate(changes):
        assert change.rule is not None
        if change.kind == "add_rule":
            rules.append(change.rule)
        else:
            rules.remove(change.rule)
        for what, oif, src, mark, table in PACKETS:
            got = lookup(rules, oif, src, mark)
            if got != table:
                wrong.append(f"after step {step} ({change.describe()}): {what} takes table {got}")
    return wrong


def test_migration_from_the_old_layout_adds_all_then_deletes_highest_first() -> None:
    plan = mwa.plan_network(CONFIG, IFACES, {4: "fibre"})
    old = old_layout_rules(CONFIG, IFACES)
    assert mwa.find_collisions(CONFIG, old, []) == []  # our own protocol in our block: ours
    assert mwa.find_foreign(CONFIG, old, []) == ()
    changes = mwa.diff_network(CONFIG, plan, old, installed_routes(plan, INDEXES), INDEXES, CONFIG.tables)
    kinds = [c.kind for c in changes]
    assert kinds == ["add_rule"] * 10 + ["del_rule"] * 10  # main's rule (5000) stays as it is
    deleted = [c.rule.priority for c in changes if c.kind == "del_rule" and c.rule is not None]
    assert deleted == [5099, 5072, 5071, 5070, 5042, 5041, 5040, 5012, 5011, 5010]
    assert paths_while_applying(changes, old) == []
    rules_after = [r.spec() for r in old] + [c.rule for c in changes if c.kind == "add_rule" and c.rule]
    for change in changes[10:]:
        assert change.rule is not None
        rules_after.remove(change.rule)
    assert sorted(rules_after, key=lambda r: r.priority) == list(plan.rules)


def test_migration_deleting_lowest_first_would_misroute() -> None:
    """The check above can fail: in ascending order, each old oif/source/fwmark rule's
    traffic would fall to the old catch-all (99) until that went too."""
    plan = mwa.plan_network(CONFIG, IFACES, {4: "fibre"})
    old = old_layout_rules(CONFIG, IFACES)
    changes = mwa.diff_network(CONFIG, plan, old, [], INDEXES, CONFIG.tables)
    adds = [c for c in changes if c.kind == "add_rule"]
    descending = [c for c in changes if c.kind == "del_rule"]
    dels = sorted(descending, key=lambda c: c.rule.priority if c.rule else 0)
    assert dels != descending
    wrong = paths_while_applying(adds + dels, old)
    assert any(w.endswith("a probe bound to wan1 takes table 200") for w in wrong)
    assert any(w.endswith("a flow stuck to lte (mark 0x200) takes table 200") for w in wrong)


DUAL = mwa.parse_config(
    """
[check]
targets = ["198.18.1.1", "2001:db8:ffff::1"]
[[uplink]]
name = "fibre"
interface = "wan0"
[[uplink]]
name = "lte"
interface = "wan1"
priority = 2
[[uplink]]
name = "v4only"
interface = "wan2"
priority = 3
[uplink.check]
targets = ["198.18.1.2"]
""",
    "dual.toml",
)
DUAL_IFACES = {
    "wan0": mwa.Interface("wan0", 2, True, True, "203.0.113.2", "203.0.113.1", "2001:db8:1::2", "fe80::1"),
    "wan1": mwa.Interface("wan1", 3, True, True, "203.0.113.6", "203.0.113.5", "2001:db8:2::2", None),
    "wan2": mwa.Interface("wan2", 4, True, True, "198.51.100.2", "198.51.100.1", "2001:db8:3::2", "fe80::1"),
}


def test_families_come_from_the_targets() -> None:
    fibre, lte, v4only = DUAL.uplinks
    assert fibre.families == (4, 6) and v4only.families == (4,)
    assert DUAL.families == (4, 6)
    assert mwa.parse_config(
        '[check]\ntargets=["2001:db8::1"]\n[[uplink]]\nname="a"\ninterface="x"', "t"
    ).families == (6,)


def test_dual_stack_plan() -> None:
    plan = mwa.plan_network(DUAL, DUAL_IFACES, {4: "lte", 6: "fibre"})
    v6_rules = [r.describe() for r in plan.rules if r.family == 6]
    assert v6_rules == [
        "5000: from all lookup main suppress_prefixlength 0",
        "5100: from all oif wan0 lookup 201",
        "5101: from all oif wan1 lookup 202",
        "5356: from 2001:db8:1::2 lookup 201",
        "5357: from 2001:db8:2::2 lookup 202",
        "5612: from all fwmark 0x100/0xff00 lookup 201",
        "5613: from all fwmark 0x200/0xff00 lookup 202",
        "6023: from all lookup 200",
    ]  # v4only has no IPv6 targets, so it carries no IPv6
    v6_routes = [r for r in plan.uplink_routes if r.family == 6]
    assert v6_routes == [mwa.RouteSpec(201, "wan0", "fe80::1", 6)]  # lte has no RA route yet
    assert set(plan.default_routes) == {
        mwa.RouteSpec(200, "wan1", "203.0.113.5", 4),
        mwa.RouteSpec(200, "wan0", "fe80::1", 6),
    }
    assert mwa.routable(DUAL.uplinks[1], DUAL_IFACES["wan1"], 4)
    assert not mwa.routable(DUAL.uplinks[1], DUAL_IFACES["wan1"], 6)
    # the same table id serves both families; a diff keys routes by (family, table)
    rules = [
        mwa.RuleEntry(
            r.priority, r.table, P, r.fwmark, r.fwmask, r.source, r.oifname, r.suppress_prefixlength, r.family
        )
        for r in plan.rules
    ]
    indexes = {n: i.index for n, i in DUAL_IFACES.items()}
    routes = installed_routes(plan, indexes)
    assert mwa.diff_network(DUAL, plan, rules, routes, indexes, DUAL.tables) == []
    switched = mwa.plan_network(DUAL, DUAL_IFACES, {4: "lte", 6: "lte"})
    # lte cannot route IPv6: no default for it, and the last IPv6 default is kept, not deleted
    assert mwa.diff_network(DUAL, switched, rules, routes, indexes, DUAL.tables) == []


def test_link_observation_dual_stack() -> None:
    fibre = DUAL.uplinks[0]
    only_v6 = mwa.Interface("wan0", 2, True, True, None, None, "2001:db8:1::2", "fe80::1")
    assert mwa.link_observation(fibre, only_v6).usable  # still carries IPv6
    v4only = DUAL.uplinks[2]
    assert mwa.link_observation(v4only, only_v6).reason == "no IPv4 address on wan2"


def test_parse_icmp6() -> None:
    reply = struct.pack("!BBHHH", 129, 0, 0, 0x42, 3) + b"x" * 24
    assert mwa._parse_icmp6(reply, "2001:db8:ffff::1") == (0, "2001:db8:ffff::1", 0x42, 3)
    inner = struct.pack("!IHBB", 0x60000000, 32, 58, 64) + socket.inet_pton(socket.AF_INET6, "2001:db8:1::2")
    inner += socket.inet_pton(socket.AF_INET6, "2001:db8:ffff::2") + struct.pack("!BBHHH", 128, 0, 0, 0x42, 4)
    error = struct.pack("!BBHI", 1, 0, 0, 0) + inner
    assert mwa._parse_icmp6(error, "2001:db8:1::1") == (3, "2001:db8:ffff::2", 0x42, 4)
    assert mwa._parse_icmp6(struct.pack("!BBHHH", 128, 0, 0, 1, 1), "2001:db8::9") is None


def test_link_observation_reasons() -> None:
    fibre, lte, vpn = CONFIG.uplinks
    assert mwa.link_observation(fibre, None).reason == "interface wan0 is gone"
    down = mwa.Interface("wan0", 2, False, False, None, None)
    assert mwa.link_observation(fibre, down).reason == "interface wan0 is administratively down"
    no_carrier = mwa.Interface("wan0", 2, True, False, "203.0.113.2", "203.0.113.1")
    assert mwa.link_observation(fibre, no_carrier).reason == "carrier lost on wan0"
    no_addr = mwa.Interface("wan0", 2, True, True, None, "203.0.113.1")
    assert mwa.link_observation(fibre, no_addr).reason == "no IPv4 address on wan0"
    no_gw = mwa.Interface("wan0", 2, True, True, "203.0.113.2", None)
    assert "no default route from DHCP on wan0" in mwa.link_observation(fibre, no_gw).reason
    assert mwa.link_observation(lte, IFACES["wan1"]).usable  # static gateway
    assert mwa.link_observation(vpn, IFACES["wg0"]).usable  # point-to-point


def _ip_header(src: str, dst: str, proto: int = 1) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )


def test_parse_icmp_echo_reply_and_errors() -> None:
    reply = _ip_header("198.18.1.1", "203.0.113.2") + struct.pack("!BBHHH", 0, 0, 0, 0x1234, 7) + b"x" * 24
    assert mwa._parse_icmp(reply) == (0, "198.18.1.1", 0x1234, 7)
    quoted = _ip_header("203.0.113.2", "198.18.1.2") + struct.pack("!BBHHH", 8, 0, 0, 0x1234, 9)
    error = _ip_header("203.0.113.1", "203.0.113.2") + struct.pack("!BBHI", 3, 1, 0, 0) + quoted
    assert mwa._parse_icmp(error) == (3, "198.18.1.2", 0x1234, 9)
    request = _ip_header("198.51.100.10", "203.0.113.2") + struct.pack("!BBHHH", 8, 0, 0, 1, 1)
    assert mwa._parse_icmp(request) is None
    assert mwa._parse_icmp(b"\x45" + b"\0" * 10) is None


def test_dns_query_encodes_international_names() -> None:
    query = mwa.dns_query(0x1234, "bücher.example", "AAAA")
    labels = b"".join(bytes([len(x)]) + x for x in b"xn--bcher-kva.example".split(b"."))
    assert query == struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(
        "!HH", 28, 1
    )
    assert mwa.dns_rcode(struct.pack("!HHHHHH", 0x1234, 0x8183, 1, 0, 0, 0), 0x1234) == 3
    assert mwa.dns_rcode(struct.pack("!HHHHHH", 0x9999, 0x8180, 1, 0, 0, 0), 0x1234) is None


def test_a_reload_dropping_a_family_removes_its_objects() -> None:
    plan = mwa.plan_network(DUAL, DUAL_IFACES, {4: "fibre", 6: "fibre"})
    indexes = {n: i.index for n, i in DUAL_IFACES.items()}
    rules = [
        mwa.RuleEntry(
            r.priority, r.table, P, r.fwmark, r.fwmask, r.source, r.oifname, r.suppress_prefixlength, r.family
        )
        for r in plan.rules
    ]
    routes = installed_routes(plan, indexes)
    v4_only = mwa.parse_config(
        '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
        '[[uplink]]\nname = "lte"\ninterface = "wan1"\npriority = 2\n'
        '[[uplink]]\nname = "v4only"\ninterface = "wan2"\npriority = 3\n',
        "t",
    )
    changes = mwa.diff_network(
        v4_only, mwa.plan_network(v4_only, DUAL_IFACES, {4: "fibre"}), rules, routes, indexes, DUAL.tables
    )
    assert {c.kind for c in changes if (c.rule or c.route or c).family == 6} == {"del_rule", "del_route"}
    assert any(c.kind == "del_route" and c.family == 6 and c.table == 200 for c in changes)
    assert all((c.rule or c.route or c).family == 6 for c in changes)


def test_nft_table_is_one_replacing_transaction_with_stickiness() -> None:
    script = mwa.render_nft(CONFIG)
    lines = script.splitlines()
    assert lines[:3] == ["add table inet multiwan", "delete table inet multiwan", "table inet multiwan {"]
    by_mark = "0x100 : goto to_fibre, 0x200 : goto to_lte, 0x300 : goto to_vpn"
    restore = f"ct direction original ct mark and 0xff00 vmap {{ {by_mark} }}"
    assert script.count(restore) == 2  # forwarded (prerouting) and the router's own (output)
    by_oif = '"wan0" : goto ct_fibre, "wan1" : goto ct_lte, "wg0" : goto ct_vpn'
    assert f"ct mark and 0xff00 == 0 oifname vmap {{ {by_oif} }}" in script
    # only the mark_mask bits of either mark are ever written
    assert "\t\tmeta mark set meta mark and 0xffff00ff or 0x200 accept\n" in script
    assert "\t\tct mark set ct mark and 0xffff00ff or 0x300\n" in script
    assert "meta mark set ct mark" not in script and "map @" not in script
    assert "inet multiwan" in mwa.describe_plan(CONFIG)


STEERING = mwa.parse_config(
    """
[agent]
sticky = "source"
[check]
targets = ["198.18.1.1", "2001:db8:ffff::1"]
[[uplink]]
name = "fibre"
interface = "wan0"
weight = 3
[[uplink]]
name = "lte"
interface = "wan1"
[[policy]]
name = "voip"
match = { protocol = "udp", dst_port = [5060, "10000-20000"], src = "198.51.100.50/32" }
uplinks = ["lte"]
fallback = "drop"
""",
    "steering.toml",
)


def test_nft_steering_rules() -> None:
    steering = mwa.Steering({4: (("fibre", 3), ("lte", 1)), 6: ()}, {"voip": {4: None}})
    script = mwa.render_nft(STEERING, steering)
    lines = [line.strip() for line in script.splitlines()]
    # only new connections from the LAN are placed; replies and inbound ones never
    assert 'ct state new ct mark and 0xff00 == 0 iifname != { "wan0", "wan1" } jump steer' in lines
    # connections from the internet belong to the uplink they came in on; port forwards answer through it
    by_iif = '"wan0" : goto in_fibre, "wan1" : goto in_lte'
    assert f"ct state new ct mark and 0xff00 == 0 iifname vmap {{ {by_iif} }}" in lines
    # labelled, so that release_flows keeps what came in from the internet
    assert "ct mark set ct mark and 0xffff00ff or 0x200 ct label set 127" in lines
    by_mark = "0x100 : goto to_fibre, 0x200 : goto to_lte"
    assert f"ct direction reply ct status dnat ct mark and 0xff00 vmap {{ {by_mark} }}" in lines
    assert (
        "meta nfproto ipv4 ip saddr { 198.51.100.50/32 } udp dport { 5060, 10000-20000 } jump policy_voip"
    ) in lines
    # the drop fallback drops only what would leave through an uplink
    assert 'meta nfproto ipv4 fib daddr oifname { "wan0", "wan1" } drop' in lines
    assert "meta nfproto ipv4 numgen random mod 4 vmap { 0-2 : goto new4_fibre, 3 : goto new4_lte }" in lines
    assert "meta nfproto ipv4 ip saddr @source4_lte update @source4_lte { ip saddr } goto to_lte" in lines
    assert "meta mark set meta mark and 0xffff00ff or 0x200 accept" in lines  # other mark bits kept
    assert not any("meta nfproto ipv6 numgen" in line for line in lines)  # no IPv6 group


def test_steering_update_is_one_transaction_that_keeps_placements() -> None:
    both = mwa.Steering({4: (("fibre", 3), ("lte", 1)), 6: (("fibre", 3), ("lte", 1))}, {"voip": {4: "lte"}})
    fibre_only = mwa.Steering({4: (("fibre", 3),), 6: (("fibre", 3),)}, {"voip": {4: None}})
    update = mwa.render_steering_update(STEERING, both, fibre_only).splitlines()
    assert update[0] == "flush chain inet multiwan balance"
    assert "add rule inet multiwan policy_voip meta nfproto ipv4 goto to_lte" not in update
    assert (
        'add rule inet multiwan policy_voip meta nfproto ipv4 fib daddr oifname { "wan0", "wan1" } drop'
        in update
    )
    # the hosts placed on the uplink that left are placed afresh; fibre's stay where they are
    flushed = [line for line in update if line.startswith("flush set")]
    assert flushed == ["flush set inet multiwan source4_lte", "flush set inet multiwan source6_lte"]
    assert [
        x for x in mwa.render_steering_update(STEERING, fibre_only, both).splitlines() if "set" in x
    ] == []
    plain = mwa.render_nft(CONFIG)
    assert "set source" not in plain and "chain new4_" not in plain  # sticky per connection: no host sets


LAN_PREFIXES = mwa.parse_config(
    """
[check]
targets = ["198.18.1.1", "2001:db8:ffff::1"]
[[uplink]]
name = "fibre"
interface = "wan0"
lan_prefixes6 = ["2001:db8:10::/56", "2001:db8:11::/56"]
lan_prefix_failover = "nat66"
[[uplink]]
name = "lte"
interface = "wan1"
priority = 2
lan_prefixes6 = ["2001:db8:20::/56"]
""",
    "prefixes.toml",
)


def test_lan_prefixes_leave_by_their_uplink_after_the_marks() -> None:
    fibre, lte = LAN_PREFIXES.uplinks
    assert fibre.lan_prefix_failover == "nat66" and lte.lan_prefix_failover == "none"
    plan = mwa.plan_network(LAN_PREFIXES, DUAL_IFACES, {4: "fibre", 6: "fibre"})
    v6_rules = [r.describe() for r in plan.rules if r.family == 6]
    assert v6_rules[-4:] == [
        "6000: from 2001:db8:10::/56 lookup 201",
        "6000: from 2001:db8:11::/56 lookup 201",
        "6000: from 2001:db8:20::/56 lookup 202",
        "6023: from all lookup 200",
    ]
    assert v6_rules[-5].startswith("5613: from all fwmark")  # a mark (stickiness) wins
    assert not any("2001:db8:1" in r.describe() for r in plan.rules if r.family == 4)
    # fibre cannot carry IPv6: its prefixes take the selection (lte's go on through lte)
    down = mwa.plan_network(LAN_PREFIXES, DUAL_IFACES, {4: "fibre", 6: "lte"}, frozenset({"lte"}))
    assert [r.source for r in down.rules if r.priority == 6000] == ["2001:db8:20::/56"]
    # the kernel's answer reads back as the spec: a network source keeps its length
    assert mwa._rule_source("2001:db8:10::", 56, 6) == "2001:db8:10::/56"
    assert mwa._rule_source("2001:db8:1::2", 128, 6) == "2001:db8:1::2"
    (prefix_rule,) = [r for r in down.rules if r.priority == 6000]
    args = mwa._rule_args(prefix_rule, 240)
    assert (args["src"], args["src_len"]) == ("2001:db8:20::", 56)


def test_lan_prefixes_are_never_balanced_and_nat66_masquerades_them_elsewhere() -> None:
    table = mwa.render_nft(LAN_PREFIXES)
    steer = table[table.index("chain steer {") :]
    assert steer.splitlines()[1].strip() == (
        "ip6 saddr { 2001:db8:10::/56, 2001:db8:11::/56, 2001:db8:20::/56 } return"
    )
    nat = table[table.index("chain nat {") :]
    # fibre's prefixes are masqueraded wherever else they leave; lte's ("none") never
    assert 'oifname { "wan1" } ip6 saddr { 2001:db8:10::/56, 2001:db8:11::/56 } masquerade' in nat
    assert "2001:db8:20::/56 } masquerade" not in nat


def test_check_prints_the_ipv6_plan() -> None:
    text = mwa.describe_plan(LAN_PREFIXES)
    plan = text[text.index("ipv6 plan:") : text.index("ipv4 rules")]
    assert "  fibre: IPv6 health from 2001:db8:ffff::1; its IPv4 is judged apart" in plan
    assert (
        "  LAN prefix 2001:db8:10::/56: leaves by fibre (rule 6000: from 2001:db8:10::/56 lookup 201) "
        "while it carries IPv6; else masqueraded (nat66)" in plan
    )
    assert "LAN prefix 2001:db8:20::/56: leaves by lte" in plan and "lan_prefix_failover = none" in plan
    assert "6000: from 2001:db8:10::/56 lookup 201" in text[text.index("ipv6 rules") :]
    assert "ipv6 plan" not in mwa.describe_plan(CONFIG)  # IPv4 only: as before
