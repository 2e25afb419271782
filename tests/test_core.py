"""The pure core, driven with a fake clock: no sleeps, no sockets."""

from __future__ import annotations

import dataclasses
import re

import multiwan_agent as mwa

CHECK = mwa.CheckConfig(targets=("198.18.1.1", "198.18.1.2"), fall=3, rise=3)


def uplink(name: str, priority: int, index: int) -> mwa.UplinkConfig:
    return mwa.UplinkConfig(name, f"wan{index}", "auto", priority, 201 + index, (index + 1) << 8, CHECK)


UPLINKS = (uplink("fibre", 1, 0), uplink("lte", 2, 1))


def round_(ok: bool, name: str = "fibre", reason: str = "timeout", at: float = 0.0) -> mwa.RoundResult:
    probes = tuple(
        mwa.ProbeResult(t, ok, rtt_ms=5.0 if ok else None, reason="ok" if ok else reason)
        for t in CHECK.targets
    )
    return mwa.RoundResult(name, 1, at, probes)


def feed(
    health: mwa.Health, results: list[bool], start: float = 0.0
) -> tuple[mwa.Health, list[mwa.Transition]]:
    transitions: list[mwa.Transition] = []
    for i, ok in enumerate(results):
        health, new = mwa.observe_round(health, round_(ok, health.name, at=start + i), CHECK, start + i)
        transitions += new
    return health, transitions


def test_initially_down_goes_up_after_rise_good_rounds_without_owing_hysteresis() -> None:
    health = mwa.initial_health(UPLINKS[0], 0.0)
    assert health.state is mwa.State.DOWN and health.reason == "not yet confirmed"
    health, transitions = feed(health, [True, True])
    assert health.state is mwa.State.DOWN and not transitions
    health, transitions = feed(health, [True], start=2)
    assert health.state is mwa.State.UP and health.since == 2
    assert [(t.old, t.new) for t in transitions] == [(mwa.State.DOWN, mwa.State.UP)]
    assert transitions[0].reason == "3 consecutive good rounds"
    assert not health.recovered  # an assumption at start is not a failure


def test_initial_state_up_is_assumed_until_fall_failed_rounds() -> None:
    uplink = dataclasses.replace(UPLINKS[0], initial_state="up")
    health = mwa.initial_health(uplink, 0.0)
    assert health.state is mwa.State.UP
    health, transitions = feed(health, [False] * 3)
    assert health.state is mwa.State.DOWN and len(transitions) == 1


def test_up_goes_down_after_fall_failed_rounds_with_reason() -> None:
    health, _ = feed(mwa.Health("fibre"), [True] * 3)
    health, transitions = feed(health, [False, False, True, False, False], start=10)
    assert health.state is mwa.State.UP and not transitions  # the good round reset the count
    health, transitions = feed(health, [False], start=20)
    assert health.state is mwa.State.DOWN
    assert transitions[0].reason == "3 consecutive failed rounds: unreachable (timeout)"


def test_down_needs_rise_rounds_and_is_marked_recovered() -> None:
    health = mwa.Health("fibre", state=mwa.State.DOWN, has_failed=True)
    health, transitions = feed(health, [True, True, False, True, True])
    assert health.state is mwa.State.DOWN and not transitions
    health, transitions = feed(health, [True], start=5)
    assert health.state is mwa.State.UP and health.recovered
    assert transitions[0].old is mwa.State.DOWN


def test_down_stays_down_and_says_nothing_while_rounds_fail() -> None:
    health, transitions = feed(mwa.Health("fibre"), [False] * 10)
    assert health.state is mwa.State.DOWN and not transitions


def test_one_event_per_transition_not_per_round() -> None:
    health, transitions = feed(mwa.Health("fibre"), [True] * 10 + [False] * 10 + [True] * 10)
    assert [t.new for t in transitions] == [mwa.State.UP, mwa.State.DOWN, mwa.State.UP]
    assert transitions[2].old is mwa.State.DOWN


def test_link_loss_is_immediate_and_return_restarts_rise() -> None:
    health, _ = feed(mwa.Health("fibre"), [True] * 3)
    health, transitions = mwa.observe_link(health, mwa.LinkObservation(False, "carrier lost on wan0"), 7.0)
    assert health.state is mwa.State.DOWN and health.since == 7.0
    assert transitions[0].reason == "carrier lost on wan0"
    # rounds in flight while the link is down change nothing
    health, transitions = feed(health, [True] * 5, start=8)
    assert health.state is mwa.State.DOWN and not transitions
    health, transitions = mwa.observe_link(health, mwa.LinkObservation(True), 9.0)
    assert health.state is mwa.State.DOWN and not transitions and health.good_rounds == 0
    health, transitions = feed(health, [True] * 3, start=10)
    assert health.state is mwa.State.UP and health.recovered


def test_link_loss_of_down_uplink_updates_reason_only() -> None:
    health = mwa.Health("fibre", state=mwa.State.DOWN, reason="3 consecutive failed rounds (timeout)")
    health, transitions = mwa.observe_link(health, mwa.LinkObservation(False, "interface wan0 is gone"), 1.0)
    assert not transitions and health.reason == "interface wan0 is gone"


def test_loss_and_rtt_window() -> None:
    health, _ = feed(mwa.Health("fibre", state=mwa.State.UP), [True, False, True, True])
    assert health.loss_pct == 25.0
    assert health.rtt_ms == 5.0
    assert health.quality is not None and health.quality.rtt_ms == 5.0 and health.quality.jitter_ms == 0.0


def test_round_reliability_and_reason() -> None:
    probes = (
        mwa.ProbeResult("198.18.1.1", True, 1.0),
        mwa.ProbeResult("198.18.1.2", False, reason="unreachable (from 203.0.113.1)"),
    )
    assert mwa.RoundResult("f", 1, 0.0, probes, required=1).ok
    assert not mwa.RoundResult("f", 1, 0.0, probes, required=2).ok
    assert mwa.RoundResult("f", 1, 0.0, probes).reason == "unreachable (from 203.0.113.1)"


def healths(**states: tuple[mwa.State, float, bool]) -> dict[str, mwa.Health]:
    return {n: mwa.Health(n, state=s, since=t, recovered=r) for n, (s, t, r) in states.items()}


def test_select_best_priority_up() -> None:
    h = healths(fibre=(mwa.State.UP, 0, False), lte=(mwa.State.UP, 0, False))
    assert mwa.select(h, UPLINKS, None, 30, 100).selected == "fibre"


def test_select_leaves_down_uplink_immediately() -> None:
    h = healths(fibre=(mwa.State.DOWN, 50, False), lte=(mwa.State.UP, 0, False))
    decision = mwa.select(h, UPLINKS, "fibre", 30, 50)
    assert decision.selected == "lte" and "fibre is down" in decision.reason


def test_failback_waits_for_hysteresis() -> None:
    h = healths(fibre=(mwa.State.UP, 100, True), lte=(mwa.State.UP, 0, False))
    decision = mwa.select(h, UPLINKS, "lte", 30, 129.9)
    assert decision.selected == "lte" and decision.wake_at == 130
    decision = mwa.select(h, UPLINKS, "lte", 30, 130.0)
    assert decision.selected == "fibre"


def test_at_start_backup_carries_then_preferred_takes_over_once_confirmed() -> None:
    h = healths(fibre=(mwa.State.DOWN, 0, False), lte=(mwa.State.UP, 1, False))
    assert mwa.select(h, UPLINKS, None, 30, 1).selected == "lte"
    h = healths(fibre=(mwa.State.UP, 3, False), lte=(mwa.State.UP, 1, False))
    assert mwa.select(h, UPLINKS, "lte", 30, 3).selected == "fibre"


def test_nothing_up_keeps_last_route_and_says_so() -> None:
    h = healths(fibre=(mwa.State.DOWN, 5, False), lte=(mwa.State.DOWN, 6, False))
    decision = mwa.select(h, UPLINKS, "lte", 30, 7)
    assert decision.selected == "lte" and decision.stranded
    assert decision.reason == "no uplink is up; keeping lte"
    assert mwa.select(h, UPLINKS, None, 30, 7).selected is None


def test_equal_priority_keeps_current() -> None:
    uplinks = (uplink("a", 1, 0), uplink("b", 1, 1))
    h = healths(a=(mwa.State.UP, 0, False), b=(mwa.State.UP, 0, False))
    assert mwa.select(h, uplinks, "b", 30, 10).selected == "b"


def test_worse_uplink_recovering_never_takes_over() -> None:
    h = healths(fibre=(mwa.State.UP, 0, False), lte=(mwa.State.UP, 100, True))
    assert mwa.select(h, UPLINKS, "fibre", 30, 200).selected == "fibre"


def test_full_failover_and_failback_timeline() -> None:
    """Drive the state machine and the selection together with a fake clock."""
    interval, hysteresis = 1.0, 10.0
    hs = {u.name: mwa.initial_health(u, 0.0) for u in UPLINKS}
    selected = None
    switches: list[tuple[float, str | None]] = []
    fibre_ok = lambda now: not (20 <= now < 30)  # noqa: E731 - fibre fails silently from 20 s to 30 s
    for step in range(80):
        now = step * interval
        for name in hs:
            ok = fibre_ok(now) if name == "fibre" else True
            hs[name], _ = mwa.observe_round(hs[name], round_(ok, name, at=now), CHECK, now)
        decision = mwa.select(hs, UPLINKS, selected, hysteresis, now)
        if decision.selected != selected:
            switches.append((now, decision.selected))
            selected = decision.selected
    assert switches == [(2.0, "fibre"), (22.0, "lte"), (42.0, "fibre")]
    # failover: fall rounds after the failure; failback: rise rounds + hysteresis after recovery
    assert switches[1][0] - 20 == CHECK.fall - 1
    assert switches[2][0] - 30 == CHECK.rise - 1 + hysteresis


def test_remap_health_on_reload() -> None:
    health = dataclasses.replace(mwa.Health("fibre"), good_rounds=4, bad_rounds=2)
    remapped = mwa.remap_health(health, dataclasses.replace(CHECK, rise=2, fall=2))
    assert (remapped.good_rounds, remapped.bad_rounds) == (1, 1)


def test_a_stale_round_completing_late_is_ignored() -> None:
    """Round 1 times out after round 2 answered: round 2 is the newer evidence."""
    health = mwa.Health("fibre", state=mwa.State.DOWN)
    good = round_(True, at=2.0)
    health, _ = mwa.observe_round(health, good, CHECK, 2.001)
    stale = round_(False, at=1.0)
    health, transitions = mwa.observe_round(health, stale, CHECK, 2.002)
    assert health.good_rounds == 1 and health.bad_rounds == 0 and not transitions


QUALITY = dataclasses.replace(CHECK, window=10, max_loss_pct=20.0, max_rtt_s=0.05, max_jitter_s=0.02)


def lossy_round(answered: int, at: float, rtt: float = 5.0) -> mwa.RoundResult:
    probes = tuple(
        mwa.ProbeResult(
            t, i < answered, rtt_ms=rtt if i < answered else None, reason="ok" if i < answered else "timeout"
        )
        for i, t in enumerate(CHECK.targets)
    )
    return mwa.RoundResult("fibre", 1, at, probes)


def run(
    health: mwa.Health, rounds: list[mwa.RoundResult], check: mwa.CheckConfig = QUALITY
) -> tuple[mwa.Health, list[mwa.Transition]]:
    transitions: list[mwa.Transition] = []
    for r in rounds:
        health, new = mwa.observe_round(health, r, check, r.started_at)
        transitions += new
    return health, transitions


def test_loss_degrades_after_a_full_window_and_fall_rounds_then_recovers() -> None:
    health = mwa.Health("fibre", state=mwa.State.UP)
    # one of two probes lost each round: 50% loss, yet every round is good (reliability 1)
    health, transitions = run(health, [lossy_round(1, float(i)) for i in range(9)])
    assert health.state is mwa.State.UP and not transitions  # window not full yet: no verdict
    health, transitions = run(health, [lossy_round(1, float(i)) for i in range(9, 12)])
    assert [t.new for t in transitions] == [mwa.State.DEGRADED]
    assert transitions[0].at == 11.0  # window full at round 10, then fall = 3 judged rounds
    assert transitions[0].reason == "loss 50% > 20% over the last 10 rounds"
    # clean rounds: the window drains below 20%, then rise rounds
    health, transitions = run(health, [lossy_round(2, float(i)) for i in range(12, 30)])
    assert [t.new for t in transitions] == [mwa.State.UP]
    assert health.recovered and transitions[0].reason.startswith("quality back within the thresholds")


def test_rtt_and_jitter_thresholds() -> None:
    health = mwa.Health("fibre", state=mwa.State.UP)
    health, transitions = run(health, [lossy_round(2, float(i), rtt=80.0) for i in range(12)])
    assert transitions[0].reason == "median rtt 80.0ms > 50ms over the last 10 rounds"
    health = mwa.Health("fibre", state=mwa.State.UP)
    jittery = [lossy_round(2, float(i), rtt=5.0 if i % 2 else 60.0) for i in range(12)]
    health, transitions = run(health, jittery, dataclasses.replace(QUALITY, max_rtt_s=None))
    assert transitions[0].reason.startswith("jitter 55.0ms > 20ms")


def test_degraded_goes_down_on_fall_failed_rounds_and_window_resets() -> None:
    health = mwa.Health("fibre", state=mwa.State.DEGRADED, samples=(mwa.RoundSample(2, 1, (5.0,)),) * 10)
    health, transitions = run(health, [lossy_round(0, float(i)) for i in range(3)])
    assert [t.new for t in transitions] == [mwa.State.DOWN] and health.samples == ()


def test_single_slow_reply_never_flaps() -> None:
    health = mwa.Health("fibre", state=mwa.State.UP)
    rounds = [lossy_round(2, float(i), rtt=900.0 if i == 15 else 5.0) for i in range(40)]
    health, transitions = run(health, rounds)
    assert not transitions


def test_gateway_check_names_where_it_failed() -> None:
    probes = tuple(mwa.ProbeResult(t, False, reason="timeout") for t in CHECK.targets)
    at_gateway = mwa.RoundResult("fibre", 1, 0.0, probes, gateway="203.0.113.1", gateway_ok=False)
    upstream = mwa.RoundResult("fibre", 1, 0.0, probes, gateway="203.0.113.1", gateway_ok=True)
    assert at_gateway.where == "gateway 203.0.113.1 unreachable"
    assert upstream.where == "upstream unreachable"
    health = mwa.Health("fibre", state=mwa.State.UP)
    for i in range(3):
        health, transitions = mwa.observe_round(
            health, dataclasses.replace(at_gateway, started_at=float(i)), CHECK, i
        )
    assert health.failure == "gateway"
    assert transitions[0].reason == "3 consecutive failed rounds: gateway 203.0.113.1 unreachable (timeout)"


def test_every_method_must_answer() -> None:
    icmp_ok = mwa.ProbeResult("198.18.1.10", True, 1.0, method=mwa.Method.ICMP)
    http_302 = mwa.ProbeResult("198.18.1.10", False, reason="status 302", method=mwa.Method.HTTP)
    result = mwa.RoundResult("fibre", 1, 0.0, (icmp_ok, http_302))
    assert not result.ok and result.reason == "http status 302"


def test_selection_prefers_up_over_degraded_and_uses_degraded_as_last_resort() -> None:
    h = healths(fibre=(mwa.State.DEGRADED, 10, False), lte=(mwa.State.UP, 0, False))
    decision = mwa.select(h, UPLINKS, "fibre", 30, 10)
    assert decision.selected == "lte" and "fibre is degraded" in decision.reason
    h = healths(fibre=(mwa.State.DEGRADED, 10, False), lte=(mwa.State.DOWN, 0, False))
    decision = mwa.select(h, UPLINKS, "lte", 30, 10)
    assert decision.selected == "fibre" and "last resort" in decision.reason and not decision.stranded
    # a recovered fibre still owes the hysteresis before taking over again
    h = healths(fibre=(mwa.State.UP, 10, True), lte=(mwa.State.UP, 0, False))
    assert mwa.select(h, UPLINKS, "lte", 30, 20).selected == "lte"


def test_boot_without_link_does_not_owe_hysteresis() -> None:
    """A lease or carrier that arrives after the agent starts is no failure."""
    health = mwa.initial_health(UPLINKS[0], 0.0)
    health, transitions = mwa.observe_link(
        health, mwa.LinkObservation(False, "no default route from DHCP"), 1.0
    )
    assert not transitions
    health, _ = mwa.observe_link(health, mwa.LinkObservation(True), 2.0)
    health, transitions = feed(health, [True] * 3, start=3)
    assert health.state is mwa.State.UP and not health.recovered


def test_a_round_begun_before_a_link_change_proves_nothing() -> None:
    health = mwa.Health("fibre", state=mwa.State.DOWN, link_usable=False)
    health, _ = mwa.observe_link(health, mwa.LinkObservation(True), 5.0)
    health, _ = mwa.observe_round(health, round_(True, at=4.9), CHECK, 5.1)
    assert health.good_rounds == 0


def test_selection_keeps_the_last_route_when_the_current_uplink_vanishes() -> None:
    h = healths(fibre=(mwa.State.DOWN, 5, True), lte=(mwa.State.DOWN, 6, True))
    # fibre cannot route at all now (not among the candidates), and nothing is up
    decision = mwa.select(h, UPLINKS[1:], "fibre", 30, 7)
    assert decision.selected == "fibre" and decision.stranded


def test_a_round_needs_every_family_to_answer() -> None:
    v4 = mwa.ProbeResult("198.18.1.1", False, reason="timeout")
    v6 = mwa.ProbeResult("2001:db8:ffff::1", True, 1.0)
    assert not mwa.RoundResult("fibre", 1, 0.0, (v4, v6)).ok


def test_missing_capabilities() -> None:
    root = "CapEff:\t000001ffffffffff\n"
    assert mwa.missing_capabilities(root, dry_run=False) == []
    raw_only = f"CapEff:\t{1 << 13:016x}\n"
    assert mwa.missing_capabilities(raw_only, dry_run=False) == ["CAP_NET_ADMIN"]
    assert mwa.missing_capabilities(raw_only, dry_run=True) == []
    assert mwa.missing_capabilities("CapEff:\t0000000000000000\n", dry_run=True) == ["CAP_NET_RAW"]


def test_reload_refuses_moved_ids() -> None:
    text = (
        '[check]\ntargets = ["198.18.1.1"]\n'
        '[[uplink]]\nname = "a"\ninterface = "w0"\n'
        '[[uplink]]\nname = "b"\ninterface = "w1"\n'
    )
    old = mwa.parse_config(text, "t")
    new = mwa.parse_config(text.split('[[uplink]]\nname = "b"')[0].replace('name = "a"', 'name = "b"'), "t")
    assert mwa.reload_problem(old, old) is None
    assert "table/mark would change from 202/0x200 to 201/0x100" in (mwa.reload_problem(old, new) or "")


def test_a_stale_round_still_counts_in_the_quality_window() -> None:
    health = mwa.Health("fibre", state=mwa.State.UP)
    health, _ = mwa.observe_round(health, round_(True, at=2.0), CHECK, 2.001)
    health, _ = mwa.observe_round(health, round_(False, at=1.0), CHECK, 2.002)
    assert health.loss_pct == 50.0 and health.bad_rounds == 0


GROUP = (
    dataclasses.replace(uplink("fibre", 1, 0), weight=2),
    uplink("cable", 1, 1),
    uplink("lte", 2, 2),
)


def test_balance_group_is_the_selected_priority_by_weight() -> None:
    h = healths(fibre=(mwa.State.UP, 0, False), cable=(mwa.State.UP, 0, False), lte=(mwa.State.UP, 0, False))
    assert mwa.balance_group(h, GROUP, "fibre", 30, 10) == mwa.BalanceGroup((("fibre", 2), ("cable", 1)))
    # one member alone balances nothing (the selection table's route carries it all)
    h["cable"] = mwa.Health("cable", state=mwa.State.DOWN, since=5)
    assert mwa.balance_group(h, GROUP, "fibre", 30, 10).members == (("fibre", 2),)
    # a degraded selection is a last resort, never a group
    h = healths(fibre=(mwa.State.DEGRADED, 0, False), cable=(mwa.State.DEGRADED, 0, False))
    assert mwa.balance_group(h, GROUP, "fibre", 30, 10).members == ()
    assert mwa.balance_group(h, GROUP, None, 30, 10).members == ()


def test_a_recovered_member_rejoins_only_after_the_hysteresis() -> None:
    h = healths(fibre=(mwa.State.UP, 0, False), cable=(mwa.State.UP, 100, True), lte=(mwa.State.UP, 0, False))
    waiting = mwa.balance_group(h, GROUP, "fibre", 30, 110)
    assert waiting == mwa.BalanceGroup((("fibre", 2),), wake_at=130)
    assert mwa.balance_group(h, GROUP, "fibre", 30, 130).members == (("fibre", 2), ("cable", 1))


def test_policy_takes_its_first_usable_uplink_and_falls_back_when_none_is() -> None:
    policy = mwa.PolicyConfig("voip", mwa.PolicyMatch(protocol="udp"), ("lte", "fibre"), "drop")
    h = healths(fibre=(mwa.State.UP, 0, False), cable=(mwa.State.UP, 0, False), lte=(mwa.State.UP, 0, False))
    assert mwa.select_for_policy(policy, h, GROUP, None, 30, 10).selected == "lte"  # its order, not priority
    h["lte"] = mwa.Health("lte", state=mwa.State.DOWN, since=20)
    moved = mwa.select_for_policy(policy, h, GROUP, "lte", 30, 21)
    assert moved.selected == "fibre" and "lte is down" in moved.reason
    h["fibre"] = mwa.Health("fibre", state=mwa.State.DOWN, since=22)
    none = mwa.select_for_policy(policy, h, GROUP, "fibre", 30, 23)
    assert none.selected is None and none.reason == "none of lte, fibre is usable; its traffic is dropped"
    # its preferred uplink comes back after the hysteresis, like a failback
    h = healths(fibre=(mwa.State.UP, 0, False), lte=(mwa.State.UP, 100, True))
    assert mwa.select_for_policy(policy, h, GROUP, "fibre", 30, 110).selected == "fibre"
    assert mwa.select_for_policy(policy, h, GROUP, "fibre", 30, 131).selected == "lte"


def test_a_reload_keeps_only_the_steering_that_still_holds() -> None:
    config = mwa.parse_config(
        '[agent]\nsticky = "source"\n[check]\ntargets = ["198.18.1.1", "2001:db8:ffff::1"]\n'
        '[[uplink]]\nname = "fibre"\ninterface = "wan0"\nweight = 3\n'
        '[[uplink]]\nname = "lte"\ninterface = "wan1"\n[uplink.check]\ntargets = ["198.18.1.2"]\n'
        '[[policy]]\nname = "voip"\nmatch = { protocol = "udp" }\nuplinks = ["fibre"]\n',
        "new.toml",
    )
    running = mwa.Steering(
        {4: (("fibre", 1), ("lte", 1), ("cable", 1)), 6: (("fibre", 1), ("lte", 1))},
        {"voip": {4: "lte", 6: "fibre"}, "gone": {4: "fibre"}},
    )
    kept = mwa.carry_steering(running, config)
    # lte carries no IPv6 any more, cable is gone, weights are the new ones; lte is no uplink of voip
    assert kept == mwa.Steering({4: (("fibre", 3), ("lte", 1)), 6: (("fibre", 3),)}, {"voip": {6: "fibre"}})
    script = mwa.render_nft(config, kept)
    # every set and chain the table refers to, it declares (nft would refuse it otherwise)
    assert {f"source{f}_{n}" for f, n in re.findall(r"@source(\d)_(\w+)", script)} <= set(
        re.findall(r"set (\S+) \{", script)
    )
    assert set(re.findall(r"goto (\S+?)[ ,}]", script + " ")) <= set(re.findall(r"chain (\S+) \{", script))


# Flap damping ------------------------------------------------------------------

DAMPED = mwa.Hysteresis(30.0, penalty_s=30.0, half_life_s=300.0, max_s=600.0)


def test_a_failed_round_inside_the_hysteresis_restarts_it() -> None:
    h = healths(fibre=(mwa.State.UP, 100, True), lte=(mwa.State.UP, 0, False))
    h["fibre"], transitions = mwa.observe_round(h["fibre"], round_(False, at=120), CHECK, 120.0, DAMPED)
    assert not transitions and h["fibre"].proving_since == 120.0  # one failed round: below fall
    waiting = mwa.select(h, UPLINKS, "lte", DAMPED, 131.0)
    assert waiting.selected == "lte" and waiting.wake_at == 150.0
    assert waiting.reason == (
        "fibre is better but owes 19.0s more of 30s hysteresis; a failed round restarted it 11.0s ago"
    )
    assert mwa.select(h, UPLINKS, "lte", DAMPED, 150.0).selected == "fibre"


def test_a_failed_round_after_the_proof_restarts_nothing() -> None:
    fibre = mwa.Health("fibre", state=mwa.State.UP, since=100, recovered=True)
    fibre, _ = mwa.observe_round(fibre, round_(False, at=131), CHECK, 131.0, DAMPED)
    assert fibre.proving_since is None
    # nor without a hysteresis to judge by (the plain core, as before)
    fibre, _ = mwa.observe_round(fibre, round_(False, at=110), CHECK, 110.0)
    assert fibre.proving_since is None


def test_repeated_failures_owe_a_longer_hysteresis_that_decays_and_is_bounded() -> None:
    fibre = mwa.Health("fibre", state=mwa.State.UP, since=0)
    for down_at in (0.0, 10.0, 20.0):  # three failures in 20 s, each back up 3 s later
        fibre, _ = mwa.observe_link(fibre, mwa.LinkObservation(False, "carrier lost"), down_at)
        fibre, _ = mwa.observe_link(fibre, mwa.LinkObservation(True), down_at + 0.5)
        fibre, _ = feed(fibre, [True] * 3, start=down_at + 1)
    assert fibre.state is mwa.State.UP and fibre.recovered and fibre.failures == (0.0, 10.0, 20.0)
    assert fibre.since == 23.0
    # the figure of merit past 2, decayed to the proof's start: 2^(-23/300) + 2^(-13/300) + 2^(-3/300) - 2
    penalty = 30 * (0.5 ** (23 / 300) + 0.5 ** (13 / 300) + 0.5 ** (3 / 300) - 2)
    assert abs(mwa.owed_hysteresis_s(fibre, DAMPED) - (30 + penalty)) < 1e-9 and 27 < penalty < 28
    h = {"fibre": fibre, "lte": mwa.Health("lte", state=mwa.State.UP)}
    waiting = mwa.select(h, UPLINKS, "lte", DAMPED, 60.0)
    assert waiting.selected == "lte" and waiting.wake_at is not None
    assert abs(waiting.wake_at - (23.0 + 30 + penalty)) < 1e-9
    assert waiting.reason == (
        "fibre is better but owes 20.4s more of 57.4s hysteresis (30s + 27.4s flap penalty: "
        "3 failures in the last 60.0s)"
    )
    assert mwa.select(h, UPLINKS, "lte", DAMPED, waiting.wake_at).selected == "fibre"
    # an outage and its relapse cost nothing; and the whole hysteresis never exceeds its maximum
    assert mwa.owed_hysteresis_s(dataclasses.replace(fibre, failures=(10.0, 20.0)), DAMPED) == 30
    storm = dataclasses.replace(fibre, failures=tuple(float(t) for t in range(23)))
    assert mwa.owed_hysteresis_s(storm, dataclasses.replace(DAMPED, max_s=0.0)) == 30  # never below
    assert mwa.owed_hysteresis_s(storm, DAMPED) == 600
    assert mwa.owed_hysteresis_s(storm, dataclasses.replace(DAMPED, penalty_s=0.0)) == 30
    # an outage long after the flaps lets the penalty decay away
    late = dataclasses.replace(fibre, since=20.0 + 3600)
    assert mwa.owed_hysteresis_s(late, DAMPED) < 30.02


def test_only_leaving_up_counts_as_a_failure_and_memory_is_bounded() -> None:
    health = mwa.initial_health(UPLINKS[0], 0.0)  # down by assumption: no failure
    health, _ = mwa.observe_link(health, mwa.LinkObservation(False, "no carrier"), 1.0)
    assert health.failures == ()
    for i in range(mwa.FLAP_MEMORY + 5):
        health = dataclasses.replace(health, state=mwa.State.UP, link_usable=True)
        health, _ = mwa.observe_link(health, mwa.LinkObservation(False, "carrier lost"), float(i))
    assert len(health.failures) == mwa.FLAP_MEMORY and health.failures[-1] == mwa.FLAP_MEMORY + 4


def test_flap_damping_keys() -> None:
    base = '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "a"\ninterface = "w0"\n'
    agent = mwa.parse_config(base, "t").agent
    assert mwa.agent_hysteresis(agent) == mwa.Hysteresis(30, 30, 300, 600)  # the penalty: the hysteresis
    text = '[agent]\nhysteresis = "2s"\nflap_penalty = "1s"\n'
    text += 'flap_half_life = "10s"\nflap_max_hysteresis = "5s"\n'
    assert mwa.agent_hysteresis(mwa.parse_config(text + base, "t").agent) == mwa.Hysteresis(2, 1, 10, 5)
    # the maximum follows a long hysteresis when not given, and is refused below it
    assert mwa.parse_config('[agent]\nhysteresis = "20m"\n' + base, "t").agent.flap_max_hysteresis_s == 1200
    try:
        mwa.parse_config('[agent]\nhysteresis = "1m"\nflap_max_hysteresis = "30s"\n' + base, "t")
    except mwa.ConfigError as err:
        assert "agent.flap_max_hysteresis" in str(err) and "from 60s" in str(err)
    else:
        raise AssertionError("a maximum below the hysteresis was accepted")
