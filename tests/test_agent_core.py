"""The agent core (Core: the agent), driven with a fake clock: every decision that
used to need the lab, replayed as observations. No sockets, no sleeps, no kernel."""

from __future__ import annotations

import dataclasses
import json

import pytest

import multiwan_agent as mwa

FIBRE_IF = mwa.Interface("wan0", 2, True, True, "203.0.113.2", "203.0.113.1")
LTE_IF = mwa.Interface("wan1", 3, True, True, "203.0.113.6", "203.0.113.5")
INTERFACES = {"wan0": FIBRE_IF, "wan1": LTE_IF}
TARGETS = ("198.18.1.1", "198.18.1.2")


def config(extra_fibre: str = "", extra_lte: str = "", agent: str = "", tail: str = "") -> mwa.Config:
    return mwa.parse_config(
        f'[agent]\nhysteresis = "5s"\n{agent}\n'
        '[check]\ntargets = ["198.18.1.1", "198.18.1.2"]\ninterval = "1s"\nfall = 3\nrise = 3\n'
        f'[[uplink]]\nname = "fibre"\ninterface = "wan0"\npriority = 1\n{extra_fibre}\n'
        f'[[uplink]]\nname = "lte"\ninterface = "wan1"\npriority = 2\n{extra_lte}\n{tail}',
        "agent.toml",
    )


def round_(
    name: str, ok: bool | tuple[bool, bool], at: float, seq: int = 1, targets: tuple[str, ...] = TARGETS
) -> mwa.RoundResult:
    """A round of `targets`; ok=(ipv4, ipv6) answers each family's targets differently."""

    def answered(target: str) -> bool:
        return ok if isinstance(ok, bool) else ok[mwa.family_of(target) == 6]

    probes = tuple(
        mwa.ProbeResult(t, answered(t), 1.0 if answered(t) else None, "ok" if answered(t) else "timeout")
        for t in targets
    )
    return mwa.RoundResult(name, seq, at, probes)


class Clock:
    """The agent replayed: a state, a fake monotonic clock, and every intent seen."""

    def __init__(
        self, cfg: mwa.Config, previous: mwa.PreviousRun | None = None, routes=(), boot="b1"
    ) -> None:
        self.now = 100.0
        #: Per uplink, the targets its rounds probe (default: TARGETS).
        self.targets: dict[str, tuple[str, ...]] = {}
        self.state, intent = mwa.start_agent(cfg, INTERFACES, list(routes), previous, boot, self.now)
        self.intents = [intent]
        self.work: mwa.RouteWork | None = intent.routes
        self.reconcile()

    def apply(self, result: tuple[mwa.AgentState, mwa.Intent]) -> mwa.Intent:
        self.state, intent = result
        self.intents.append(intent)
        if intent.routes is not None:
            self.work = intent.routes  # the routes edge keeps only the newest
        return intent

    def round(self, name: str, ok: bool | tuple[bool, bool]) -> mwa.RoundResult:
        return round_(name, ok, self.now, targets=self.targets.get(name, TARGETS))

    def rounds(self, name: str, ok: bool | tuple[bool, bool], count: int) -> list[mwa.Intent]:
        out = []
        for _ in range(count):
            self.now += 1.0
            out.append(self.apply(mwa.on_round(self.state, self.round(name, ok), self.now)))
            if out[-1].routes is not None:
                out.append(self.reconcile())
        return out

    def both(
        self, fibre: bool | tuple[bool, bool], lte: bool | tuple[bool, bool], count: int
    ) -> list[mwa.Intent]:
        out = []
        for _ in range(count):
            self.now += 1.0
            for name, ok in (("fibre", fibre), ("lte", lte)):
                out.append(self.apply(mwa.on_round(self.state, self.round(name, ok), self.now)))
                if out[-1].routes is not None:
                    out.append(self.reconcile())
        return out

    def tick(self, to: float) -> mwa.Intent:
        self.now = to
        intent = self.apply(mwa.on_tick(self.state, self.now))
        if intent.routes is not None:
            self.reconcile()
        return intent

    def reconcile(self, failed=(), rules=(), routes=(), work: mwa.RouteWork | None = None) -> mwa.Intent:
        """The routes edge did the newest route work (or `work`) and saw `rules`/`routes`."""
        if work is None:
            if self.work is None:
                self.state, self.work = mwa._route_work(self.state)
            work, self.work = self.work, None
        return self.apply(mwa.on_routes(self.state, work, list(failed), list(rules), list(routes), self.now))

    def selected(self) -> str | None:
        return self.state.selected(4)

    def events(self, kind: type) -> list:
        return [e for i in self.intents for e in i.events if isinstance(e, kind)]

    def releases(self) -> list[mwa.FlowRelease]:
        return [r for i in self.intents for r in i.releases]


def up_and_running(cfg: mwa.Config) -> Clock:
    clock = Clock(cfg)
    clock.both(True, True, 3)
    assert clock.selected() == "fibre"
    return clock


# release_flows -------------------------------------------------------------


def test_release_on_down_starts_after_the_route_moved_and_reports_what_it_did() -> None:
    clock = up_and_running(config(extra_fibre='release_flows = "on_down"'))
    intents = clock.rounds("fibre", False, 3)
    down = intents[-2]
    assert clock.selected() == "lte"
    # the failover's intent carries the route change; the release waits for its reconcile
    assert down.routes is not None and down.releases == ()
    (release,) = intents[-1].releases
    assert (release.uplink, release.families, release.mark) == ("fibre", frozenset({4}), 0x100)
    assert "203.0.113.2" in release.local and "203.0.113.6" in release.local
    done = clock.apply(mwa.on_released(clock.state, "fibre", mwa.Released(deleted=7), clock.now))
    (event,) = done.events
    assert (
        isinstance(event, mwa.FlowsReleased) and event.why == "it went down" and event.released.deleted == 7
    )
    assert clock.state.releasing == {} and clock.state.owed_releases == {}


def test_release_on_failback_when_the_backup_stops_carrying() -> None:
    clock = up_and_running(config(extra_lte='release_flows = "on_failback"'))
    clock.rounds("fibre", False, 3)
    assert clock.selected() == "lte" and clock.releases() == []
    clock.both(True, True, 3)  # fibre is up again but proving itself
    assert clock.selected() == "lte" and clock.releases() == []
    clock.tick(clock.state.wake_at)  # hysteresis over: failback
    assert clock.selected() == "fibre"
    (release,) = clock.releases()
    assert release.uplink == "lte" and clock.state.releasing["lte"].kind == "failback"


def test_an_uplink_that_recovers_while_its_release_runs_cancels_it() -> None:
    clock = up_and_running(config(extra_fibre='release_flows = "on_down"'))
    clock.rounds("fibre", False, 3)
    assert "fibre" in clock.state.releasing
    # it comes back (rise rounds) before the release finished
    intents = clock.rounds("fibre", True, 3)
    assert [i.cancel_releases for i in intents if i.cancel_releases] == [("fibre",)]
    # the edge answers late; nothing breaks, and nothing else is released
    done = clock.apply(
        mwa.on_released(clock.state, "fibre", mwa.Released(deleted=2, cancelled=True), clock.now)
    )
    (event,) = done.events
    assert event.released.cancelled and clock.state.releasing == {} and done.releases == ()


def test_a_release_finished_for_an_uplink_a_reload_removed_is_harmless() -> None:
    clock = up_and_running(config(extra_lte='release_flows = "on_down"'))
    clock.rounds("lte", False, 3)
    assert "lte" in clock.state.releasing
    only_fibre = mwa.parse_config(
        '[agent]\nhysteresis = "5s"\n[check]\ntargets = ["198.18.1.1"]\n'
        '[[uplink]]\nname = "fibre"\ninterface = "wan0"\npriority = 1\n',
        "agent.toml",
    )
    clock.apply(mwa.on_reload(clock.state, only_fibre, [], [], "", clock.now))
    done = clock.apply(mwa.on_released(clock.state, "lte", mwa.Released(deleted=1), clock.now))
    assert [type(e) for e in done.events] == [mwa.FlowsReleased] and done.releases == ()
    # a round of the removed uplink still in flight is dropped
    late = clock.apply(mwa.on_round(clock.state, round_("lte", True, clock.now), clock.now))
    assert late.events == () and "lte" not in clock.state.healths


def test_a_family_the_uplink_still_carries_keeps_its_flows_until_it_does_not() -> None:
    cfg = config(
        extra_fibre='release_flows = "on_down"\n[uplink.check]\ntargets = ["198.18.1.1", "2001:db8:ffff::1"]'
    )
    fibre6 = dataclasses.replace(FIBRE_IF, address6="2001:db8:1::2", ra_gateway="fe80::1")
    clock = Clock(cfg)
    # Each family has a health of its own: fibre's rounds probe both (its IPv6 is judged too).
    clock.targets["fibre"] = ("198.18.1.1", "2001:db8:ffff::1")
    clock.apply(mwa.on_links(clock.state, {"wan0": fibre6, "wan1": LTE_IF}, clock.now))
    clock.reconcile()
    clock.both(True, True, 3)
    assert clock.state.selected(6) == "fibre"
    clock.rounds("fibre", False, 3)
    # IPv6 has no other uplink: fibre still carries it (stranded), so only IPv4 is released
    (release,) = clock.releases()
    assert release.families == frozenset({4})
    assert clock.state.owed_releases["fibre"].families == frozenset({6})


# restart: adoption and owed hysteresis ----------------------------------------


SELECTION_ROUTE = mwa.RouteEntry(200, 2, "203.0.113.1", 240, 4)


def test_adoption_after_a_restart_changes_no_route() -> None:
    clock = Clock(config(), routes=[SELECTION_ROUTE])
    assert [e.uplink for e in clock.events(mwa.Adopted)] == ["fibre"]
    assert clock.state.healths["fibre"].state is mwa.State.UP and clock.selected() == "fibre"
    assert all(not i.routes or not i.routes.urgent for i in clock.intents)  # nothing re-sent: no flap


def previous(state: str = "up", recovered: bool = True, since: float = 95.0, boot: str | None = "b1"):
    return mwa.PreviousRun(boot, {"fibre": mwa.PreviousUplink(mwa.State(state), True, recovered, since)})


@pytest.mark.parametrize(
    ("prev", "owes"),
    [
        (previous(since=97.0), True),  # still inside its 5 s hysteresis (now = 100)
        (previous(since=90.0), False),  # proved itself before the restart
        (previous(boot="b0", since=0.0), True),  # another boot: its monotonic time says nothing
        (previous(recovered=False, since=0.0), False),  # never failed
        (previous(state="down", since=99.0), True),  # failed before the restart
        (None, False),
    ],
)
def test_owed_hysteresis_is_judged_on_the_monotonic_clock_of_one_boot(prev, owes) -> None:
    clock = Clock(config(), previous=prev, routes=[SELECTION_ROUTE])
    health = clock.state.healths["fibre"]
    assert (health.state is mwa.State.DOWN and health.has_failed) is owes
    assert bool(clock.events(mwa.Adopted)) is not owes


def test_a_stepped_wall_clock_changes_nothing_about_a_restart() -> None:
    """The status document's wall-clock fields (a router without an RTC steps its clock) are not read."""
    document = {
        "version": 1, "pid": 1, "boot_id": "b1", "updated": 0.0, "updated_monotonic": 99.0,
        "uplinks": {"fibre": {"state": "up", "recovered": True, "has_failed": True,
                              "since_monotonic": 97.0, "since": 1.0}},
    }  # fmt: skip
    runs = []
    for wall in (1.0, 4_000_000_000.0, -5.0):
        document["uplinks"]["fibre"]["since"] = wall
        document["updated"] = wall
        parsed = mwa.parse_status(json.dumps(document), "status.json")
        runs.append(mwa.previous_run(parsed))
    assert runs[0] == runs[1] == runs[2]
    assert mwa.owes_hysteresis(runs[0], "fibre", "b1", 5.0, 100.0)


def test_an_owed_uplink_carries_again_only_after_the_full_hysteresis() -> None:
    clock = Clock(config(), previous=previous(since=97.0))
    clock.rounds("lte", True, 3)
    clock.rounds("fibre", True, 3)
    assert clock.selected() == "lte"  # fibre is up but owes the hysteresis
    wake = clock.state.wake_at
    assert wake == pytest.approx(clock.state.healths["fibre"].since + 5.0)
    clock.tick(wake - 0.01)
    assert clock.selected() == "lte"
    clock.tick(wake)
    assert clock.selected() == "fibre"


# reload ---------------------------------------------------------------------


def test_a_reload_keeps_health_of_unchanged_uplinks_and_resets_a_changed_path() -> None:
    clock = up_and_running(config())
    clock.rounds("lte", False, 2)  # two failed rounds of three: evidence a reload must keep
    before = clock.state.healths["fibre"]
    new = config(extra_lte='gateway = "203.0.113.5"', agent='sticky = "connection"')
    intent = clock.apply(mwa.on_reload(clock.state, new, [], [], "", clock.now))
    assert [type(e) for e in intent.events] == [mwa.Reloaded] and intent.refresh_links
    assert clock.state.healths["fibre"] == mwa.remap_health(before, new.uplink("fibre").check)
    assert clock.state.healths["lte"].state is mwa.State.DOWN  # another gateway: another path
    # unchanged path keeps its counters (clamped) and its evidence
    same = config()
    clock = up_and_running(config())
    clock.rounds("fibre", False, 2)
    clock.apply(mwa.on_reload(clock.state, same, [], [], "", clock.now))
    assert clock.state.healths["fibre"].bad_rounds == 2
    clock.rounds("fibre", False, 1)
    assert clock.selected() == "lte"  # the third failed round after the reload completes the fall


def test_a_reload_is_refused_for_moved_ids_and_new_collisions_only() -> None:
    clock = up_and_running(config())
    moved = config(agent="default_table = 300")
    refused = clock.apply(mwa.on_reload(clock.state, moved, [], [], "", clock.now))
    (event,) = refused.events
    assert isinstance(event, mwa.ReloadRejected) and "default_table cannot change" in event.reason
    assert clock.state.config is not moved
    # a foreign rule already in the block (the running agent lives with it) is no reason
    foreign = mwa.RuleEntry(5050, 254, 0)
    lived = clock.apply(mwa.on_reload(clock.state, config(), [foreign], [], "", clock.now))
    assert [type(e) for e in lived.events] == [mwa.Reloaded]
    # but a new uplink table another program already uses is
    busy = mwa.RouteEntry(210, 5, "203.0.113.9", 3, 4)
    third = config(tail='[[uplink]]\nname = "dsl"\ninterface = "wan2"\ntable = 210\npriority = 3\n')
    clash = clock.apply(mwa.on_reload(clock.state, third, [foreign], [busy], "", clock.now))
    assert isinstance(clash.events[0], mwa.ReloadRejected) and "table 210" in clash.events[0].reason


def test_a_reload_whose_nft_table_cannot_be_checked_still_applies_the_routing() -> None:
    clock = up_and_running(config())
    swapped = config().__class__(
        "agent.toml",
        config().agent,
        tuple(dataclasses.replace(u, priority=3 - u.priority) for u in config().uplinks),
    )
    intent = clock.apply(
        mwa.on_reload(clock.state, swapped, [], [], "nft did not answer within 5s", clock.now)
    )
    (event,) = intent.events
    assert isinstance(event, mwa.Reloaded) and event.nft_note == "nft did not answer within 5s"
    assert intent.nft is not None and intent.nft.config is swapped
    clock.apply(mwa.on_links(clock.state, INTERFACES, clock.now))
    assert clock.selected() == "lte"  # lte never failed: preferred now, at once


# route changes that fail -------------------------------------------------------


def test_a_failing_route_change_is_reported_once_and_retried_with_back_off() -> None:
    clock = up_and_running(config())
    clock.state, work = mwa._route_work(clock.state)
    change = mwa.Change("replace_route", route=work.plan.uplink_routes[0])
    delays = []
    for _ in range(3):
        clock.apply(mwa.on_routes(clock.state, work, [(change, "Network unreachable")], [], [], clock.now))
        delays.append(clock.state.retry_at - clock.now)
        tick = clock.apply(mwa.on_tick(clock.state, clock.state.retry_at))
        assert tick.refresh_links  # a retry starts from a fresh dump
    assert delays == [0.5, 1.0, 2.0]
    assert len(clock.events(mwa.RouteChangeFailed)) == 1
    clock.apply(mwa.on_routes(clock.state, work, [], [], [], clock.now))
    assert len(clock.events(mwa.RouteChangeRecovered)) == 1 and clock.state.retry_at is None


def test_a_failed_selected_default_is_sent_again_as_urgent() -> None:
    clock = up_and_running(config())
    for _ in range(3):
        clock.now += 1
        intent = clock.apply(mwa.on_round(clock.state, round_("fibre", False, clock.now), clock.now))
    urgent = intent.routes.urgent
    assert [c.route.interface for c in urgent] == ["wan1"]
    clock.apply(mwa.on_routes(clock.state, intent.routes, [(urgent[0], "No such device")], [], [], clock.now))
    assert [c.route.interface for c in mwa._route_work(clock.state)[1].urgent] == ["wan1"]


def test_netlink_trouble_backs_off_like_a_failed_change() -> None:
    clock = up_and_running(config())
    first = clock.apply(mwa.on_routes_failed(clock.state, "NetlinkError: busy", clock.now))
    again = clock.apply(mwa.on_routes_failed(clock.state, "NetlinkError: busy", clock.now))
    assert len(first.events) == 1 and again.events == ()
    assert clock.state.retry_delay_s == 1.0


# others' objects at runtime ---------------------------------------------------------------


def test_a_foreign_rule_in_the_block_is_reported_once_with_what_it_defeats() -> None:
    clock = up_and_running(config())
    rule = mwa.RuleEntry(5500, 254, 0)  # after the source rules (5356+), before the fwmark ones (5612+)
    first = clock.reconcile(rules=[rule])
    (event,) = first.events
    assert isinstance(event, mwa.ForeignAppeared)
    assert event.foreign.what == "ipv4 rule 5500: from all lookup main (protocol 0)"
    assert "precedes the selection (rule 6023): failover is ineffective" in event.foreign.defeats
    assert "connection stickiness" in event.foreign.defeats and "probes" not in event.foreign.defeats
    assert first.status is mwa.StatusWrite.NOW
    assert clock.reconcile(rules=[rule]).events == ()  # once, not on every reconcile
    gone = clock.reconcile()
    assert [type(e) for e in gone.events] == [mwa.ForeignGone] and clock.state.foreign == ()


def test_foreign_rules_to_our_tables_marks_and_routes_in_them() -> None:
    cfg = config()
    found = mwa.find_foreign(
        cfg,
        [
            mwa.RuleEntry(100, 201, 0),  # ahead of us, into fibre's table
            mwa.RuleEntry(4000, 77, 0, fwmark=0x100, fwmask=0xFF00),  # fibre's mark, elsewhere
            mwa.RuleEntry(6024, 201, 0),  # after our block (5000-6023): harmless
            mwa.RuleEntry(5001, 201, 240),  # ours
        ],
        [mwa.RouteEntry(202, 3, "203.0.113.5", 3, 4, dst="10.0.0.0/8"), mwa.RouteEntry(201, 2, None, 240, 4)],
    )
    assert [f.what for f in found] == [
        "ipv4 rule 100: from all lookup 201 (protocol 0)",
        "ipv4 rule 4000: from all fwmark 0x100/0xff00 lookup 77 (protocol 0)",
        "ipv4 route 10.0.0.0/8 in table 202 (protocol 3)",
    ]
    assert "whatever that uplink's health" in found[0].defeats
    assert "connections that stick to fibre" in found[1].defeats


# rounds the agent could not judge -------------------------------------------------------


def test_a_round_whose_probes_raised_counts_neither_way() -> None:
    clock = up_and_running(config())
    before = clock.state.healths["fibre"]
    broken = tuple(
        mwa.ProbeResult(t, False, reason="agent error: KeyError", inconclusive=True) for t in TARGETS
    )
    for i in range(10):
        clock.now += 1
        clock.apply(mwa.on_round(clock.state, mwa.RoundResult("fibre", 9 + i, clock.now, broken), clock.now))
    health = clock.state.healths["fibre"]
    assert health.state is mwa.State.UP and health.bad_rounds == 0 and health.samples == before.samples
    assert clock.state.probe_errors == {"fibre": 20}
    # one probe of two raised: the round is judged on the other
    half = (broken[0], mwa.ProbeResult(TARGETS[1], False, reason="timeout"))
    for i in range(3):
        clock.now += 1
        clock.apply(mwa.on_round(clock.state, mwa.RoundResult("fibre", 30 + i, clock.now, half), clock.now))
    assert clock.state.healths["fibre"].state is mwa.State.DOWN and clock.selected() == "lte"


# time ---------------------------------------------------------------------------------


def test_next_wake_is_the_earliest_of_hysteresis_retry_and_resync() -> None:
    clock = up_and_running(config())
    assert clock.intents[-1].wake_at == clock.state.resync_at
    clock.rounds("fibre", False, 3)
    clock.rounds("fibre", True, 3)
    assert clock.intents[-1].wake_at == clock.state.wake_at < clock.state.resync_at
    resync = clock.tick(clock.state.resync_at)
    assert resync.refresh_links


# route work answered late ---------------------------------------------------------------


def test_a_release_waits_for_the_route_work_that_moved_its_traffic() -> None:
    clock = up_and_running(config(extra_fibre='release_flows = "on_down"'))
    clock.state, stale = mwa._route_work(clock.state)  # a resync's work, still being reconciled
    for _ in range(3):
        clock.now += 1
        failover = clock.apply(mwa.on_round(clock.state, round_("fibre", False, clock.now), clock.now))
    assert clock.selected() == "lte" and failover.routes.generation > stale.generation
    # the stale work's answer comes first: table 200 still pointed at fibre then
    early = clock.reconcile(work=stale)
    assert early.releases == () and "fibre" in clock.state.owed_releases
    done = clock.reconcile(work=failover.routes)
    assert [r.uplink for r in done.releases] == ["fibre"]


BALANCED = '[[uplink]]\nname = "cable"\ninterface = "wan2"\npriority = 1\nrelease_flows = "on_down"\n'


def test_a_release_waits_for_the_live_nft_steering_or_its_time_bound() -> None:
    cable_if = mwa.Interface("wan2", 4, True, True, "203.0.113.10", "203.0.113.9")
    clock = Clock(config(tail=BALANCED))
    clock.apply(mwa.on_links(clock.state, {**INTERFACES, "wan2": cable_if}, clock.now))
    clock.reconcile()
    for _ in range(3):
        clock.now += 1
        for name in ("fibre", "lte", "cable"):
            clock.apply(mwa.on_round(clock.state, round_(name, True, clock.now), clock.now))
            clock.reconcile()
    group = clock.state.steering
    assert dict(group.balance[4]) == {"fibre": 1, "cable": 1}
    clock.apply(mwa.on_nft(clock.state, mwa.NftStatus(group, True), clock.now))  # the table steers to both
    for _ in range(3):
        clock.now += 1
        clock.apply(mwa.on_round(clock.state, round_("cable", False, clock.now), clock.now))
    assert clock.reconcile().releases == ()  # routes are done, but nft still balances onto cable
    owed_at = clock.state.owed_releases["cable"].since
    # the nft edge loads the new steering: the release starts
    live = mwa.on_nft(clock.state, mwa.NftStatus(clock.state.steering, True), clock.now)
    assert [r.uplink for r in live[1].releases] == ["cable"]
    # ... or, with nft hung, once the wait is over (the core asked to be woken for it)
    assert clock.intents[-1].wake_at <= owed_at + mwa.RELEASE_STEERING_WAIT_S
    late = clock.tick(owed_at + mwa.RELEASE_STEERING_WAIT_S)
    assert [r.uplink for r in late.releases] == ["cable"]


def test_a_reload_drops_owed_releases_it_no_longer_asks_for() -> None:
    clock = up_and_running(config(extra_fibre='release_flows = "on_down"'))
    clock.rounds("lte", False, 3)
    clock.state, stale = mwa._route_work(clock.state)
    for _ in range(3):
        clock.now += 1
        clock.apply(mwa.on_round(clock.state, round_("fibre", False, clock.now), clock.now))
    assert "fibre" in clock.state.owed_releases  # stranded: fibre still carries, it waits
    same = clock.apply(
        mwa.on_reload(clock.state, config(extra_fibre='release_flows = "on_down"'), [], [], "", clock.now)
    )
    assert "fibre" in clock.state.owed_releases and same.events[0].changed is False
    clock.apply(
        mwa.on_reload(clock.state, config(extra_fibre='release_flows = "on_failback"'), [], [], "", clock.now)
    )
    assert clock.state.owed_releases == {}


# health that cannot be judged, tasks that die ---------------------------------------------


def test_rounds_that_judge_nothing_for_fall_rounds_are_said_once_loudly() -> None:
    clock = up_and_running(config())
    broken = tuple(
        mwa.ProbeResult(t, False, reason="agent error: KeyError", inconclusive=True) for t in TARGETS
    )
    seen = []
    for i in range(6):
        clock.now += 1
        seen += clock.apply(
            mwa.on_round(clock.state, mwa.RoundResult("fibre", 50 + i, clock.now, broken), clock.now)
        ).events
    (event,) = seen
    assert isinstance(event, mwa.HealthUnjudged) and event.rounds == 3 and event.state is mwa.State.UP
    assert clock.state.unjudged["fibre"] == 6
    clock.now += 1
    again = clock.apply(mwa.on_round(clock.state, round_("fibre", True, clock.now), clock.now))
    assert [type(e) for e in again.events] == [mwa.HealthJudgedAgain] and clock.state.unjudged["fibre"] == 0


def test_a_dead_conntrack_task_owes_its_running_release_again() -> None:
    clock = up_and_running(config(extra_fibre='release_flows = "on_down"'))
    clock.rounds("fibre", False, 3)
    assert "fibre" in clock.state.releasing
    died = clock.apply(mwa.on_task_died(clock.state, "conntrack", "ValueError: x", clock.now))
    assert died.refresh_links and clock.state.releasing == {} and "fibre" in clock.state.owed_releases
    assert [r.uplink for r in clock.reconcile().releases] == ["fibre"]
    prober = clock.apply(mwa.on_task_died(clock.state, "prober lte", "KeyError: 'x'", clock.now))
    assert [type(e) for e in prober.events] == [mwa.ProberDied]


def test_probers_keep_their_rounds_unless_what_they_probe_changed() -> None:
    started: list[str] = []
    cancelled: list[str] = []

    class Supervisor:
        def start(self, name: str, factory: object, restart: str = "limited") -> None:
            started.append(name)

        def cancel(self, name: str) -> None:
            cancelled.append(name)

    probers = mwa.ProberSet(Supervisor(), lambda name: None, lambda result: None, False)  # type: ignore[arg-type]
    probers.sync(config())
    assert started == ["prober fibre", "prober lte"]
    started.clear()
    cancelled.clear()
    probers.sync(config(extra_fibre="weight = 3", extra_lte='release_flows = "on_down"'))
    assert started == [] and cancelled == []
    probers.sync(config(extra_lte='[uplink.check]\ntimeout = "500ms"'))
    assert started == ["prober lte"]
    probers.sync(
        config(extra_lte='[uplink.check]\ntimeout = "500ms"').__class__(
            "agent.toml", config().agent, (config().uplinks[0],)
        )
    )
    assert "prober lte" in cancelled


# operator drains --------------------------------------------------------------------------


def command(clock: Clock, cmd: mwa.Command) -> mwa.Intent:
    intent = clock.apply(mwa.on_command(clock.state, cmd, clock.now, 1_800_000_000.0))
    if intent.routes is not None:
        clock.reconcile()
    return intent


def test_a_drain_moves_new_traffic_and_an_undrain_of_an_uplink_that_stayed_up_owes_no_hysteresis() -> None:
    clock = up_and_running(config())
    drained = command(clock, mwa.DrainCommand("fibre"))
    assert drained.reply == mwa.Reply(
        True,
        "fibre is drained: new traffic leaves through other uplinks; its probes go on; "
        "its established flows stay",
    )
    assert clock.selected() == "lte" and clock.state.drained["fibre"] == mwa.Drain(1_800_000_000.0)
    (switch,) = [e for e in drained.events if isinstance(e, mwa.SelectionChanged)]
    assert (
        switch.reason == "fibre is drained by the operator; lte is the best uplink up"
        and switch.evidence_at is None
    )
    assert clock.releases() == []  # without --release its flows stay
    clock.rounds("fibre", True, 5)  # probes go on, it stays up
    assert clock.selected() == "lte"
    back = command(clock, mwa.UndrainCommand("fibre"))
    assert back.reply.ok and clock.selected() == "fibre"  # at once: it never failed


def test_drain_release_releases_its_flows_without_release_flows_configured() -> None:
    clock = up_and_running(config())
    command(clock, mwa.DrainCommand("fibre", release=True))
    (release,) = clock.releases()
    assert release.uplink == "fibre" and release.families == frozenset({4})
    assert clock.state.releasing["fibre"].kind == "drain"
    # undrained while it runs: cancelled
    undrain = clock.apply(mwa.on_command(clock.state, mwa.UndrainCommand("fibre"), clock.now, 0.0))
    assert undrain.cancel_releases == ("fibre",)


def test_draining_the_last_uplink_up_is_refused_unless_forced() -> None:
    clock = up_and_running(config())
    clock.rounds("lte", False, 3)
    refused = command(clock, mwa.DrainCommand("fibre"))
    assert not refused.reply.ok and refused.reply.message.startswith(
        "refused: fibre is the last uplink up for IPv4"
    )
    assert clock.state.drained == {} and refused.routes is None
    forced = command(clock, mwa.DrainCommand("fibre", force=True))
    assert (
        forced.reply.ok
        and "(forced): no other uplink is up for IPv4, so its route stays" in forced.reply.message
    )
    assert clock.selected() == "fibre" and clock.state.decisions[4].stranded  # the route is kept, as said
    # already drained: adding --release is no new refusal
    again = command(clock, mwa.DrainCommand("fibre", release=True))
    assert again.reply.ok and clock.state.drained["fibre"].release
    unknown = command(clock, mwa.DrainCommand("dsl"))
    assert unknown.reply == mwa.Reply(False, "no uplink named 'dsl' (uplinks: fibre, lte)")


def test_drains_survive_a_reload_and_a_restart() -> None:
    clock = up_and_running(config())
    command(clock, mwa.DrainCommand("lte", release=True))
    clock.apply(mwa.on_reload(clock.state, config(extra_fibre="weight = 2"), [], [], "", clock.now))
    assert "lte" in clock.state.drained
    restarted = Clock(config(), routes=[SELECTION_ROUTE])
    state, _ = mwa.start_agent(config(), INTERFACES, [], None, "b1", 0.0, dict(clock.state.drained))
    assert state.drained == clock.state.drained and restarted.state.drained == {}


def test_a_recovery_after_an_outage_is_no_detection() -> None:
    clock = up_and_running(config())
    clock.rounds("lte", False, 3)
    fibre_down = clock.rounds("fibre", False, 3)
    assert not [
        e for i in fibre_down for e in i.events if isinstance(e, mwa.SelectionChanged)
    ]  # stranded, kept
    clock.rounds("lte", True, 3)  # lte recovers: fibre (down for a while) is left, but that is no failover
    (switch,) = [e for e in clock.intents[-8:] for e in e.events if isinstance(e, mwa.SelectionChanged)]
    assert switch.new == "lte" and switch.evidence_at is None
    clock2 = up_and_running(config())
    failover = clock2.rounds("fibre", False, 3)
    (switch,) = [e for i in failover for e in i.events if isinstance(e, mwa.SelectionChanged)]
    assert switch.evidence_at == 104.0  # the first failed round


def test_a_reload_that_removes_the_selected_uplink_while_nothing_else_is_up_selects_none() -> None:
    """Found by tests/test_properties.py: the stranded selection kept the removed uplink's
    name, which then stayed among the carrying uplinks and in status."""
    clock = Clock(config())
    clock.rounds("lte", True, 3)
    assert clock.selected() == "lte" and clock.state.healths["fibre"].state is mwa.State.DOWN
    clock.rounds("lte", False, 3)
    assert clock.selected() == "lte" and clock.state.decisions[4].stranded
    only_fibre = mwa.parse_config(
        '[agent]\nhysteresis = "5s"\n[check]\ntargets = ["198.18.1.1"]\n'
        '[[uplink]]\nname = "fibre"\ninterface = "wan0"\npriority = 1\n',
        "agent.toml",
    )
    intent = clock.apply(mwa.on_reload(clock.state, only_fibre, [], [], "", clock.now))
    assert intent.refresh_links
    clock.apply(mwa.on_links(clock.state, INTERFACES, clock.now))
    decision = clock.state.decisions[4]
    assert decision.selected is None and decision.stranded
    assert decision.reason == "no uplink is up; lte is no longer configured"
    assert clock.state.carrying == frozenset()


# health per family ---------------------------------------------------------------

DUAL = ("198.18.1.1", "198.18.1.2", "2001:db8:ffff::1", "2001:db8:ffff::2")
DUAL_INTERFACES = {
    "wan0": dataclasses.replace(FIBRE_IF, address6="2001:db8:1::2", ra_gateway="fe80::1"),
    "wan1": dataclasses.replace(LTE_IF, address6="2001:db8:2::2", ra_gateway="fe80::1"),
}


def dual_stack(extra_fibre: str = "", extra_lte: str = "") -> Clock:
    """fibre (priority 1) and lte, both probing two targets in each family, both up."""
    cfg = mwa.parse_config(
        '[agent]\nhysteresis = "5s"\n'
        f"[check]\ntargets = {json.dumps(DUAL)}\nfall = 3\nrise = 3\n"
        f'[[uplink]]\nname = "fibre"\ninterface = "wan0"\npriority = 1\n{extra_fibre}'
        f'[[uplink]]\nname = "lte"\ninterface = "wan1"\npriority = 2\n{extra_lte}',
        "agent.toml",
    )
    clock = Clock(cfg)
    clock.targets = {"fibre": DUAL, "lte": DUAL}
    clock.apply(mwa.on_links(clock.state, DUAL_INTERFACES, clock.now))
    clock.reconcile()
    clock.both(True, True, 3)
    assert (clock.state.selected(4), clock.state.selected(6)) == ("fibre", "fibre")
    return clock


def urgent_families(clock: Clock, since: int) -> set[int]:
    """The families whose selected default was replaced in the intents after `since`."""
    return {
        c.route.family
        for i in clock.intents[since:]
        if i.routes is not None
        for c in i.routes.urgent
        if c.route is not None
    }


@pytest.mark.parametrize(("dead", "alive"), [(6, 4), (4, 6)])
def test_one_family_failing_moves_that_family_only(dead: int, alive: int) -> None:
    clock = dual_stack()
    mark = len(clock.intents)
    clock.rounds("fibre", (dead != 4, dead != 6), 3)
    assert clock.state.selected(dead) == "lte" and clock.state.selected(alive) == "fibre"
    assert urgent_families(clock, mark) == {dead}  # the other family's route is not touched
    healths = clock.state.uplink_healths("fibre")
    assert healths[dead].state is mwa.State.DOWN and healths[alive].state is mwa.State.UP
    assert "3 consecutive failed rounds" in healths[dead].reason
    assert clock.state.healths["fibre"].state is mwa.State.UP  # the best family speaks for it
    (transition,) = [t for t in clock.events(mwa.Transition) if t.new is mwa.State.DOWN]
    assert (transition.uplink, transition.family) == ("fibre", dead)
    record = mwa.event_record(transition, 1000.0, clock.now)
    assert record["event"] == "uplink_down" and record["family"] == mwa.FAMILY_NAME[dead]
    (switch,) = [e for i in clock.intents[mark:] for e in i.events if isinstance(e, mwa.SelectionChanged)]
    assert switch.family == dead and switch.evidence_at is not None
    doc = mwa.status_document(
        clock.state, running=True, dry_run=False, boot_id=None, mono_now=clock.now, wall_now=1000.0
    )
    fibre = doc["uplinks"]["fibre"]
    assert fibre["state"] == "up"
    assert fibre["health"][mwa.FAMILY_NAME[dead]]["state"] == "down"
    assert (
        fibre["health"][mwa.FAMILY_NAME[alive]] | {"state": "up", "selected": True}
        == fibre["health"][mwa.FAMILY_NAME[alive]]
    )
    assert f"fibre up ({mwa.FAMILY_NAME[dead]} down)" in mwa.status_summary(clock.state)
    metrics = mwa.Metrics().render(clock.state, 0, clock.now)
    assert f'multiwan_uplink_family_up{{uplink="fibre",family="{mwa.FAMILY_NAME[dead]}"}} 0' in metrics
    # It comes back, per family: rise good rounds, then the hysteresis, then the failback.
    clock.rounds("fibre", True, 3)
    assert clock.state.uplink_healths("fibre")[dead].state is mwa.State.UP
    assert clock.state.selected(dead) == "lte"  # proving itself
    clock.tick(clock.now + 5.0)
    assert clock.state.selected(dead) == "fibre"


def test_both_families_failing_move_both() -> None:
    clock = dual_stack()
    clock.rounds("fibre", False, 3)
    assert (clock.state.selected(4), clock.state.selected(6)) == ("lte", "lte")
    assert clock.state.healths["fibre"].state is mwa.State.DOWN
    assert {t.family for t in clock.events(mwa.Transition) if t.new is mwa.State.DOWN} == {4, 6}


def test_carrier_loss_takes_every_family_down_at_once() -> None:
    clock = dual_stack()
    no_carrier = {**DUAL_INTERFACES, "wan0": dataclasses.replace(DUAL_INTERFACES["wan0"], carrier=False)}
    intent = clock.apply(mwa.on_links(clock.state, no_carrier, clock.now))
    assert {(t.family, t.new) for t in intent.events if isinstance(t, mwa.Transition)} == {
        (4, mwa.State.DOWN),
        (6, mwa.State.DOWN),
    }
    assert intent.routes is not None and {c.route.family for c in intent.routes.urgent if c.route} == {4, 6}
    assert (clock.state.selected(4), clock.state.selected(6)) == ("lte", "lte")


def test_a_lost_ipv6_gateway_takes_ipv6_down_only() -> None:
    """The RA client's default went away (a broken RA): IPv6 moves, IPv4 stays."""
    clock = dual_stack()
    no_ra = {**DUAL_INTERFACES, "wan0": dataclasses.replace(DUAL_INTERFACES["wan0"], ra_gateway=None)}
    clock.apply(mwa.on_links(clock.state, no_ra, clock.now))
    assert (clock.state.selected(4), clock.state.selected(6)) == ("fibre", "lte")
    six = clock.state.uplink_healths("fibre")[6]
    assert six.state is mwa.State.DOWN and six.reason == "no default route from RA on wan0 yet"


def test_a_late_reply_counts_in_its_own_familys_window() -> None:
    clock = dual_stack()
    clock.now += 1.0
    half = round_("fibre", (True, False), clock.now, seq=9, targets=DUAL)
    clock.apply(mwa.on_round(clock.state, half, clock.now))
    clock.apply(mwa.on_late(clock.state, "fibre", 9, 300.0, clock.now, 6))
    healths = clock.state.uplink_healths("fibre")
    assert healths[6].samples[-1].late == 1 and healths[4].samples[-1].late == 0


def test_an_ipv4_only_uplink_reports_as_before() -> None:
    """No family in its transitions, log lines or records: nothing changes for IPv4-only configs."""
    clock = up_and_running(config())
    clock.rounds("fibre", False, 3)
    (transition,) = [t for t in clock.events(mwa.Transition) if t.new is mwa.State.DOWN]
    assert transition.family is None
    assert "family" not in mwa.event_record(transition, 1000.0, clock.now)
    assert clock.state.uplink_healths("fibre") == {4: clock.state.healths["fibre"]}


def test_a_lan_prefix_leaves_by_its_uplink_only_while_it_carries_ipv6() -> None:
    clock = dual_stack(
        'lan_prefixes6 = ["2001:db8:10::/56"]\nlan_prefix_failover = "nat66"\n',
        'lan_prefixes6 = ["2001:db8:20::/56"]\n',
    )
    assert mwa.lan_routed(clock.state) == {"fibre", "lte"}
    intents = clock.rounds("fibre", (True, False), 3)
    # fibre's IPv6 died: its prefix now takes the IPv6 selection (lte, masqueraded there);
    # lte's ("none") always stays on lte; IPv4 is not concerned
    assert mwa.lan_routed(clock.state) == {"lte"}
    work = next(i.routes for i in intents if i.routes is not None)
    assert [r.source for r in work.plan.rules if r.priority == 6000] == ["2001:db8:20::/56"]
    doc = mwa.status_document(
        clock.state, running=True, dry_run=False, boot_id=None, mono_now=clock.now, wall_now=1000.0
    )
    assert doc["uplinks"]["fibre"]["lan_prefixes_here"] is False
    assert doc["uplinks"]["lte"]["lan_prefixes6"] == ["2001:db8:20::/56"]
    clock.rounds("fibre", True, 3)
    assert mwa.lan_routed(clock.state) == {"fibre", "lte"}  # back as soon as it is up again
