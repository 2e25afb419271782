"""The probing engine's pure parts, driven with a fake clock: the adaptive timeout, the
confirmation bursts, late replies, inconclusive rounds and passive health."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math

import pytest
from test_agent_core import Clock, config

import multiwan_agent as mwa

CHECK = mwa.CheckConfig(targets=("198.18.1.1",), interval_s=1.0, timeout_s=1.0, fall=3, rise=3)


# The adaptive timeout (RFC 6298) ------------------------------------------------


def test_the_first_sample_sets_srtt_and_half_of_it_as_variation() -> None:
    estimate = mwa.rtt_sample(mwa.RttEstimate(), 20.0, CHECK)
    assert (estimate.srtt_ms, estimate.rttvar_ms) == (20.0, 10.0)
    estimate = mwa.rtt_sample(estimate, 28.0, CHECK)
    # RTTVAR first, with the old SRTT: 3/4 x 10 + 1/4 x |20 - 28|; SRTT: 7/8 x 20 + 1/8 x 28.
    assert estimate.rttvar_ms == pytest.approx(9.5)
    assert estimate.srtt_ms == pytest.approx(21.0)


@pytest.mark.parametrize("absurd", [0.0, -3.0, math.inf, math.nan, 1000.1, 1e9])
def test_absurd_samples_are_discarded(absurd: float) -> None:
    estimate = mwa.rtt_sample(mwa.RttEstimate(), 20.0, CHECK)
    assert mwa.rtt_sample(estimate, absurd, CHECK) == estimate


def test_before_any_sample_a_probe_waits_the_configured_timeout() -> None:
    assert mwa.probe_timeout_s(mwa.RttEstimate(), CHECK) == 1.0


def test_a_very_stable_path_keeps_the_floors_not_a_zero_variation() -> None:
    estimate = mwa.RttEstimate()
    for _ in range(500):
        estimate = mwa.rtt_sample(estimate, 1.0, CHECK)
    assert estimate.rttvar_ms < 1e-6
    assert mwa.probe_timeout_s(estimate, CHECK) == CHECK.timeout_min_s
    # Without the timeout floor, the variation's floor still holds: SRTT + 4 x 5 ms.
    unfloored = dataclasses.replace(CHECK, timeout_min_s=0.01)
    assert mwa.probe_timeout_s(estimate, unfloored) == pytest.approx((1.0 + 4 * mwa.RTTVAR_FLOOR_MS) / 1000)


def test_a_slow_jittery_path_gets_srtt_plus_four_variations_under_the_ceiling() -> None:
    estimate = mwa.RttEstimate()
    for rtt in [300.0, 340.0] * 50:
        estimate = mwa.rtt_sample(estimate, rtt, CHECK)
    expected = (estimate.srtt_ms + 4 * estimate.rttvar_ms) / 1000
    assert 0.35 < expected < 1.0
    assert mwa.probe_timeout_s(estimate, CHECK) == pytest.approx(expected)
    slow = mwa.RttEstimate(900.0, 100.0)
    assert mwa.probe_timeout_s(slow, CHECK) == 1.0  # the configured timeout is the ceiling
    assert mwa.probe_timeout_s(estimate, dataclasses.replace(CHECK, adaptive_timeout=False)) == 1.0


def test_a_floor_above_the_ceiling_is_no_error_the_ceiling_wins() -> None:
    short = dataclasses.replace(CHECK, timeout_s=0.1, timeout_min_s=0.2)
    assert mwa.probe_timeout_s(mwa.RttEstimate(1.0, 0.0), short) == 0.1


def test_config_reads_the_probing_keys_and_their_bounds() -> None:
    cfg = config(
        extra_fibre=(
            '[uplink.check]\ntimeout_min = "150ms"\nburst_spacing = "50ms"\npassive_timeout = "400ms"\n'
            "passive_destinations = 4\nburst = false\npassive = false\nadaptive_timeout = false\n"
        )
    )
    check = cfg.uplinks[0].check
    assert (check.timeout_min_s, check.burst_spacing_s, check.passive_timeout_s) == (0.15, 0.05, 0.4)
    assert (check.passive_destinations, check.burst, check.passive, check.adaptive_timeout) == (
        4,
        False,
        False,
        False,
    )
    lte = cfg.uplinks[1].check
    assert (lte.burst, lte.passive, lte.adaptive_timeout) == (True, True, True)
    with pytest.raises(mwa.ConfigError, match=r"uplink\[0\]\.check\.burst_spacing"):
        config(extra_fibre='[uplink.check]\nburst_spacing = "1ms"\n')
    with pytest.raises(mwa.ConfigError, match=r"uplink\[0\]\.check\.passive_destinations"):
        config(extra_fibre="[uplink.check]\npassive_destinations = 0\n")


# Confirmation bursts ------------------------------------------------------------


class Prober:
    """A prober's schedule replayed: rounds sent when due, results after `rtt_s`."""

    def __init__(self, check: mwa.CheckConfig = CHECK, rtt_s: float = 0.2) -> None:
        self.check = check
        self.rtt_s = rtt_s
        self.now = 0.0
        self.plan = mwa.plan_start(check, self.now)
        self.sent: list[tuple[float, mwa.Burst | None]] = []
        self.pending: list[tuple[float, mwa.Burst | None]] = []

    def run(self, until: float, outcome) -> None:
        """Advance to `until`; `outcome(sent_at)` is True, False or None (inconclusive)."""
        for _ in range(100_000):
            due = mwa.plan_due(self.plan)
            back = min((at + self.rtt_s for at, _ in self.pending), default=math.inf)
            step = min(due, back)
            if step > until:
                self.now = until
                return
            self.now = max(self.now, step)
            if back <= due:
                entry = min(self.pending, key=lambda p: p[0])
                self.pending.remove(entry)
                sent_at, burst = entry
                self.plan = mwa.plan_result(
                    self.plan, outcome(sent_at), burst is not None, self.check, self.now
                )
            else:
                self.plan, burst = mwa.plan_sent(self.plan, self.check, self.now)
                self.sent.append((self.now, burst))
                self.pending.append((self.now, burst))
        raise AssertionError("the schedule did not advance")

    def bursts(self) -> list[float]:
        return [at for at, burst in self.sent if burst is not None]


def test_steady_state_sends_one_round_per_interval_and_no_burst() -> None:
    prober = Prober()
    prober.run(100.0, lambda _at: True)
    assert len(prober.sent) == 101 and not prober.bursts()
    assert all(
        b - a == pytest.approx(1.0) for (a, _), (b, _) in zip(prober.sent, prober.sent[1:], strict=False)
    )


def test_a_failed_round_is_confirmed_by_fall_minus_one_burst_rounds_at_short_spacing() -> None:
    prober = Prober()
    fault_at = 10.5
    prober.run(30.0, lambda at: at < fault_at)
    bursts = prober.bursts()
    # The round at 11.0 fails (back at 11.2): two more rounds, at once and 100 ms later.
    assert bursts[:2] == [pytest.approx(11.2), pytest.approx(11.3)]
    assert prober.plan.last_ok is False
    # Confirmed: the normal interval again (and no burst while it stays down).
    regular = [at for at, burst in prober.sent if burst is None and at > 11.3]
    assert regular[0] == pytest.approx(11.5 + 1.0)
    assert len(bursts) == 2


def test_one_success_ends_a_burst_and_the_schedule_returns_to_the_interval() -> None:
    prober = Prober()
    prober.run(20.0, lambda at: not (10.9 < at < 11.1))  # one lost round
    assert len(prober.bursts()) == 2  # both were already out when the first answered
    assert prober.plan.burst is None and prober.plan.last_ok is True
    gaps = [b - a for (a, _), (b, _) in zip(prober.sent[-5:], prober.sent[-4:], strict=False)]
    assert gaps == [pytest.approx(1.0)] * 4


def test_a_good_round_after_failures_starts_a_bounded_rise_burst() -> None:
    prober = Prober()
    prober.run(40.0, lambda at: not 10.5 < at < 30.5)
    rise = [at for at, burst in prober.sent if burst is not None and burst.kind is mwa.BurstKind.RISE]
    assert len(rise) == CHECK.rise - 1 and rise[0] == pytest.approx(30.5 + 0.2)  # the round at 30.5, back


def test_an_inconclusive_burst_round_never_counts_and_is_replaced_within_the_budget() -> None:
    prober = Prober()
    # The path dies at 10.5; the burst rounds' own timeouts are late (the agent, not the path).
    prober.run(12.0, lambda at: None if 11.1 < at < 11.25 else at < 10.5)
    kinds = [burst.kind for _, burst in prober.sent if burst is not None]
    assert kinds and set(kinds) == {mwa.BurstKind.FALL}
    assert prober.plan.last_ok is False
    # The inconclusive one was not counted: three failed rounds still needed a replacement.
    assert len(kinds) == 3


def test_a_flapping_or_lossy_link_cannot_raise_the_probe_rate_for_long() -> None:
    prober = Prober()
    prober.run(1000.0, lambda at: int(at) % 2 == 0)  # fails every other round, forever
    extra = len(prober.bursts())
    # The bucket: 2 x (fall + rise) at first, then one round per BURST_REFILL_ROUNDS intervals.
    assert extra <= mwa.burst_tokens(CHECK) + 1000 / mwa.BURST_REFILL_ROUNDS + 1
    # A burst replaces regular rounds (the interval starts again after it): never more in all.
    assert len(prober.sent) <= 1001 + extra


def test_bursts_can_be_turned_off() -> None:
    prober = Prober(dataclasses.replace(CHECK, burst=False))
    prober.run(30.0, lambda at: at < 10.5)
    assert not prober.bursts()


def test_passive_suspicion_starts_a_burst_of_fall_rounds_at_once() -> None:
    prober = Prober()
    prober.run(10.5, lambda _at: True)
    prober.plan = mwa.plan_suspect(prober.plan, CHECK, prober.now, "after passive suspicion")
    assert mwa.plan_due(prober.plan) == 10.5
    prober.run(12.0, lambda at: at < 10.4)
    assert prober.bursts()[:3] == [pytest.approx(10.5), pytest.approx(10.6), pytest.approx(10.7)]
    # Down, or a burst running: suspicion asks for nothing more.
    assert mwa.plan_suspect(prober.plan, CHECK, prober.now, "again") == prober.plan


def test_a_burst_confirmed_down_says_which_evidence_decided() -> None:
    health = mwa.Health("fibre", mwa.State.UP, suspicion="4 of 4 new connections unanswered")
    probes = (mwa.ProbeResult("198.18.1.1", False, reason="timeout"),)
    for seq in range(1, 4):
        result = mwa.RoundResult(
            "fibre", seq, float(seq), probes, gateway_ok=True, burst_trigger="after passive suspicion"
        )
        health, transitions = mwa.observe_round(health, result, CHECK, float(seq))
    assert health.state is mwa.State.DOWN
    assert transitions[0].reason == (
        "burst confirmed 3/3 after passive suspicion (4 of 4 new connections unanswered): "
        "upstream unreachable (timeout)"
    )


def test_a_late_reply_is_late_not_lost_in_the_quality_window() -> None:
    health = mwa.Health("fibre", mwa.State.UP)
    for seq in range(1, 11):
        ok = seq != 5
        probes = (mwa.ProbeResult("198.18.1.1", ok, 2.0 if ok else None, "ok" if ok else "timeout"),)
        health, _ = mwa.observe_round(health, mwa.RoundResult("fibre", seq, float(seq), probes), CHECK, seq)
    assert health.loss_pct == pytest.approx(10.0)
    health = mwa.observe_late(health, 5, 450.0)
    assert health.loss_pct == 0.0 and sum(s.late for s in health.samples) == 1
    assert mwa.observe_late(health, 5, 460.0) == health  # answered already
    assert mwa.observe_late(health, 99, 1.0) == health  # not in the window


def test_the_core_asks_for_a_burst_on_suspicion_of_an_up_uplink_only() -> None:
    clock = Clock(config())
    clock.both(True, True, 3)
    suspicion = mwa.Suspicion("fibre", "5 of 5 new connections to 3 destinations unanswered", clock.now)
    intent = clock.apply(mwa.on_suspect(clock.state, suspicion, clock.now))
    assert intent.bursts == (("fibre", "after passive suspicion"),)
    assert [type(e) for e in intent.events] == [mwa.Suspected]
    assert intent.routes is None and clock.selected() == "fibre"  # suspicion alone changes nothing
    clock.rounds("lte", False, 3)
    intent = clock.apply(mwa.on_suspect(clock.state, dataclasses.replace(suspicion, uplink="lte"), clock.now))
    assert intent.bursts == () and not intent.events


# Passive health -------------------------------------------------------------------

UPLINKS = config().uplinks


def passive() -> mwa.PassiveHealth:
    health = mwa.PassiveHealth()
    health.configure(UPLINKS)
    return health


def connections(health, uplink: str, destinations, start: float, answered: bool, conn0: int, gap=0.02):
    for i, destination in enumerate(destinations):
        at = start + i * gap
        health.connection_new(conn0 + i, uplink, destination, at)
        if answered:
            health.connection_answered(conn0 + i, at + 0.01)
    return start + len(destinations) * gap


def judge_until(health: mwa.PassiveHealth, start: float, end: float) -> list[tuple[float, mwa.Suspicion]]:
    found = []
    now = start
    while now <= end:
        found += [(now, s) for s in health.judge(now)]
        now += mwa.PASSIVE_TICK_S
    return found


def test_new_connections_unanswered_to_several_destinations_make_an_uplink_suspect() -> None:
    health = passive()
    connections(health, "fibre", [f"198.51.100.{i}" for i in range(20)], 0.0, True, 1)
    assert judge_until(health, 0.0, 1.0) == []
    assert health.view("fibre", 1.0).state == "answered"
    # The path dies at 2.0: three new connections to three destinations, no reply.
    connections(health, "fibre", ["198.51.100.1", "198.51.100.2", "198.51.100.3"], 2.0, False, 100, gap=0.05)
    found = judge_until(health, 2.0, 3.0)
    assert len(found) == 1
    at, suspicion = found[0]
    assert suspicion.uplink == "fibre" and 2.1 + 0.3 <= at <= 2.1 + 0.3 + mwa.PASSIVE_TICK_S + 1e-9
    assert "to 3 destinations, unanswered within 300ms" in suspicion.evidence
    assert health.view("fibre", at).state == "suspect"
    # Held off: more of the same does not raise it again at once.
    connections(health, "fibre", [f"198.51.100.{i}" for i in range(10, 20)], 3.0, False, 200)
    assert judge_until(health, 3.0, 5.0) == []


def test_one_dead_server_or_a_scan_of_one_host_is_not_a_dead_uplink() -> None:
    health = passive()
    connections(health, "fibre", ["203.0.113.9"] * 1000, 0.0, False, 1, gap=0.001)
    assert judge_until(health, 0.0, 3.0) == []
    # A scan of closed ports is answered (RST): nothing at all.
    connections(health, "fibre", ["203.0.113.10"] * 1000, 4.0, True, 2000, gap=0.001)
    assert judge_until(health, 4.0, 7.0) == []


def test_a_lan_whose_connections_fail_everywhere_vetoes_the_suspicion() -> None:
    health = passive()
    dead = [f"198.51.100.{i}" for i in range(6)]
    connections(health, "fibre", dead, 0.0, False, 1)
    connections(health, "lte", dead, 0.0, False, 100)
    assert judge_until(health, 0.0, 1.5) == []


def test_a_lan_with_many_unanswered_connections_needs_a_sharp_rise_above_them() -> None:
    health = passive()
    now = 0.0
    for i in range(300):  # 40 % of its connections never get an answer, for a long time
        health.connection_new(i, "fibre", f"198.51.100.{i % 50}", now)
        if i % 5 >= 2:
            health.connection_answered(i, now + 0.01)
        now += 0.1
        health.judge(now)
    view = health.view("fibre", now)
    assert 30 <= view.baseline_pct <= 50
    assert judge_until(health, now, now + 2) == []


def test_an_idle_uplink_has_no_passive_signal_and_an_uplink_with_passive_off_none() -> None:
    health = mwa.PassiveHealth()
    health.configure(
        [UPLINKS[0], dataclasses.replace(UPLINKS[1], check=dataclasses.replace(CHECK, passive=False))]
    )
    assert health.view("fibre", 0.0) == mwa.PassiveView()
    assert health.view("lte", 0.0) is None
    health.connection_new(1, "lte", "198.51.100.1", 0.0)  # not watched: ignored
    assert not health.busy


def test_lost_events_forget_what_was_pending() -> None:
    health = passive()
    connections(health, "fibre", [f"198.51.100.{i}" for i in range(5)], 0.0, False, 1)
    health.forget()
    assert judge_until(health, 0.0, 2.0) == []


def test_a_late_reply_to_a_failing_run_ends_it_the_path_is_slow_not_silent() -> None:
    health = mwa.Health("fibre", mwa.State.UP)
    lost = (mwa.ProbeResult("198.18.1.1", False, reason="timeout"),)
    for seq in (7, 8):
        health, _ = mwa.observe_round(health, mwa.RoundResult("fibre", seq, float(seq), lost), CHECK, seq)
    assert (health.bad_rounds, health.failing_seq) == (2, 7)
    health = mwa.observe_late(health, 7, 420.0)
    assert (health.bad_rounds, health.failing_since, health.failing_seq) == (0, None, None)
    # A reply to a probe from before the run proves nothing about it.
    for seq in (9, 10):
        health, _ = mwa.observe_round(health, mwa.RoundResult("fibre", seq, float(seq), lost), CHECK, seq)
    assert mwa.observe_late(health, 6, 420.0).bad_rounds == 2
    plan = mwa.ProbePlan(
        grid_at=0.0, last_ok=False, burst=mwa.Burst(mwa.BurstKind.FALL, "after a failed round", 2)
    )
    assert mwa.plan_late(plan, CHECK, 5.0) == mwa.ProbePlan(grid_at=6.0, last_ok=True)


def test_a_round_cancelled_when_its_prober_stops_ends_silently() -> None:
    """A reload restarts a prober while a round is in flight (a soak found a traceback from
    a loop callback there): its probe tasks are cancelled, the round is never judged, and
    nothing reaches the loop's exception handler."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        prober = object.__new__(mwa.UplinkProber)
        prober._rounds = set()

        def judged(*_args: object) -> None:
            raise AssertionError("a cancelled round was judged")

        prober._finish_round = judged  # type: ignore[method-assign]
        plan = mwa._RoundPlan((("198.18.1.1", mwa.Method.TCP),), ("198.18.1.1",), 0, ())
        round_ = mwa._Round(1, 0.0, None, plan, ())
        task = loop.create_task(asyncio.sleep(10))
        round_.tasks.append(task)  # type: ignore[arg-type]
        task.add_done_callback(functools.partial(prober._task_done, round_, 0))
        prober._rounds.add(round_)
        prober._probe_done(round_, -1, None)  # launched; the TCP probe is still out
        task.cancel()  # as run()'s finally does when the prober stops
        for _ in range(3):
            await asyncio.sleep(0)
        assert task.cancelled() and round_.results == [None] and not errors

    asyncio.run(scenario())
