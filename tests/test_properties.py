"""Properties of the pure core, checked by hypothesis over generated inputs: the selection
alone, and the agent core (AgentState driven through on_round, on_links, on_reload,
on_command, on_tick, on_routes and on_released) over generated sequences of observations,
with a fake clock and a pump that ticks when the core asks, as the daemon's does.

Each property runs 1,000 examples (settings below); the whole file takes ~50 s on this 2-core machine."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import multiwan_agent as mwa

EXAMPLES = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TARGETS = ("198.18.1.1", "198.18.1.2")
NAMES = ("fibre", "cable", "lte")
INTERFACES = {
    "wan0": mwa.Interface("wan0", 2, True, True, "203.0.113.2", "203.0.113.1"),
    "wan1": mwa.Interface("wan1", 3, True, True, "203.0.113.6", "203.0.113.5"),
    "wan2": mwa.Interface("wan2", 4, True, True, "203.0.113.10", "203.0.113.9"),
}


# The selection alone -------------------------------------------------------------


def uplink(name: str, priority: int, index: int) -> mwa.UplinkConfig:
    check = mwa.CheckConfig(targets=TARGETS)
    return mwa.UplinkConfig(name, f"wan{index}", "auto", priority, 201 + index, (index + 1) << 8, check)


times = st.floats(min_value=0.0, max_value=200.0, allow_nan=False)


@st.composite
def healths(draw: st.DrawFn) -> dict[str, mwa.Health]:
    out = {}
    for name in NAMES:
        failures = tuple(sorted(draw(st.lists(times, max_size=6))))
        since = draw(times)
        out[name] = mwa.Health(
            name,
            state=draw(st.sampled_from(mwa.State)),
            since=since,
            recovered=draw(st.booleans()),
            proving_since=draw(st.none() | st.floats(min_value=since, max_value=300.0)),
            failures=failures,
        )
    return out


hystereses = st.builds(
    mwa.Hysteresis,
    base_s=st.floats(min_value=0.0, max_value=60.0),
    penalty_s=st.floats(min_value=0.0, max_value=60.0),
    half_life_s=st.floats(min_value=1.0, max_value=600.0),
    max_s=st.floats(min_value=0.0, max_value=600.0),
)


@EXAMPLES
@given(
    healths(),
    st.lists(st.integers(1, 3), min_size=3, max_size=3),
    st.none() | st.sampled_from(NAMES),
    st.sets(st.sampled_from(NAMES)),
    hystereses,
    times,
)
def test_the_selection_never_picks_a_down_or_drained_uplink_while_one_is_up(
    h: dict[str, mwa.Health],
    priorities: list[int],
    current: str | None,
    drained: set[str],
    hysteresis: mwa.Hysteresis,
    now: float,
) -> None:
    uplinks = [uplink(n, p, i) for i, (n, p) in enumerate(zip(NAMES, priorities, strict=True))]
    candidates = [u for u in uplinks if u.name not in drained]
    unavailable = {n: "is drained by the operator" for n in drained}
    decision = mwa.select(h, candidates, current, hysteresis, now, unavailable)
    up = {u.name for u in candidates if h[u.name].state is mwa.State.UP}
    if up:
        assert decision.selected in up and not decision.stranded, decision
    elif any(h[u.name].state is mwa.State.DEGRADED for u in candidates):
        assert decision.selected in {u.name for u in candidates} and not decision.stranded, decision
    else:
        assert decision.stranded and decision.selected == current
    # A better uplink that recovered moves traffic back only once it has proven itself.
    if decision.selected != current and current in up:
        chosen = h[decision.selected or ""]
        ready_at = mwa.proof_ready_at(chosen, hysteresis)
        assert ready_at is None or ready_at <= now, (decision, ready_at)
    if decision.wake_at is not None:
        assert decision.wake_at > now
    owed = mwa.owed_hysteresis_s(h["fibre"], hysteresis)
    assert hysteresis.base_s <= owed <= max(hysteresis.base_s, hysteresis.max_s)


# The agent core, over sequences ------------------------------------------------------


def config(variant: int) -> mwa.Config:
    """A few configs a reload switches between: timing, damping, release_flows, priorities
    (fibre and cable share one: a balance group), and one without cable."""
    hysteresis, penalty, fall, rise = [("3s", "2s", 3, 3), ("5s", "0s", 2, 4), ("2s", "4s", 4, 2)][
        variant % 3
    ]
    lte_priority = 2 if variant != 3 else 1
    cable = (
        ""
        if variant == 4
        else '[[uplink]]\nname = "cable"\ninterface = "wan2"\npriority = 1\nrelease_flows = "on_failback"\n'
    )
    return mwa.parse_config(
        f'[agent]\nhysteresis = "{hysteresis}"\nflap_penalty = "{penalty}"\nflap_half_life = "20s"\n'
        'flap_max_hysteresis = "15s"\n'
        f'[check]\ntargets = ["198.18.1.1", "198.18.1.2"]\ninterval = "1s"\nfall = {fall}\nrise = {rise}\n'
        '[[uplink]]\nname = "fibre"\ninterface = "wan0"\npriority = 1\nrelease_flows = ["on_down"]\n'
        f'[[uplink]]\nname = "lte"\ninterface = "wan1"\npriority = {lte_priority}\n'
        'release_flows = ["on_down", "on_failback"]\n' + cable,
        f"variant{variant}.toml",
    )


CONFIGS = [config(v) for v in range(5)]
DT = st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5, 7.0, 20.0])

#: Steps: rounds of one uplink (a pattern of good and failed ones, a second or less apart,
#: some late enough to be stale), steady rounds of all (so uplinks come up and proofs end),
#: carrier changes, reloads, drains, undrains, finished releases and plain time.
steps = st.one_of(
    st.tuples(
        st.just("rounds"),
        st.sampled_from(NAMES),
        st.lists(st.booleans(), min_size=1, max_size=6),
        st.sampled_from([0.3, 1.0]),
        st.sampled_from([0.0, 0.0, 0.0, 1.5]),
    ),
    st.tuples(st.just("steady"), st.integers(1, 10), st.sets(st.sampled_from(NAMES))),
    st.tuples(st.just("steady"), st.integers(3, 12), st.just(frozenset())),
    # An outage of the priority-1 uplinks, or a storm of them: down and back `cycles` times.
    st.tuples(
        st.just("storm"),
        st.sampled_from([{"fibre"}, {"fibre", "cable"}]),
        st.integers(1, 4),
        st.integers(1, 3),
    ),
    st.tuples(st.just("carrier"), st.sampled_from(NAMES), st.booleans(), DT),
    st.tuples(st.just("reload"), st.integers(0, 4), DT),
    st.tuples(st.just("drain"), st.sampled_from(NAMES), st.booleans(), st.booleans(), DT),
    st.tuples(st.just("undrain"), st.sampled_from(NAMES), DT),
    st.tuples(st.just("released"), st.sampled_from(NAMES), DT),
    st.tuples(st.just("tick"), DT),
)


class Pump:
    """The daemon's pump without edges: the routes edge reconciles every route work at once,
    a link refresh answers with the interfaces of now, and the clock ticks the core when it
    asks (before any observation later than that)."""

    def __init__(self, variant: int) -> None:
        self.now = 100.0
        self.interfaces = dict(INTERFACES)
        self.intents: list[mwa.Intent] = []
        self.state, intent = mwa.start_agent(CONFIGS[variant], self.interfaces, [], None, "b1", self.now)
        self.carry(intent)

    def carry(self, intent: mwa.Intent) -> None:
        self.intents.append(intent)
        if intent.refresh_links:
            self.step(mwa.on_links(self.state, self.interfaces, self.now))
        if intent.routes is not None:
            self.step(mwa.on_routes(self.state, intent.routes, [], [], [], self.now))

    def step(self, result: tuple[mwa.AgentState, mwa.Intent]) -> None:
        self.state, intent = result
        self.carry(intent)

    def advance(self, dt: float, on_move: Any) -> None:
        """Time passes; the core is ticked at every wake-up it asked for on the way."""
        until = self.now + dt
        for _ in range(100):  # bounded: a wake-up at most every few ms of fake time
            wake = mwa.next_wake(self.state)
            if wake > until:
                break
            self.now = max(self.now, wake)
            before = self.snapshot()
            self.step(mwa.on_tick(self.state, self.now))
            on_move(before)
        self.now = until

    def snapshot(self) -> dict[str, Any]:
        return {"selected": self.state.selected(4), "healths": dict(self.state.healths)}


def round_result(name: str, ok: bool, started_at: float, seq: int) -> mwa.RoundResult:
    probes = tuple(mwa.ProbeResult(t, ok, 1.0 if ok else None, "ok" if ok else "timeout") for t in TARGETS)
    return mwa.RoundResult(name, seq, started_at, probes)


class ProofModel:
    """What the README promises of a recovered uplink, tracked apart from the core: its proof
    starts when it comes up, and any failed round while it proves itself restarts it; it is
    over after `hysteresis` plus the flap penalty of the failures it had then."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}

    def owed(self, health: mwa.Health, hysteresis: mwa.Hysteresis, start: float) -> float:
        merit = sum(0.5 ** ((start - t) / hysteresis.half_life_s) for t in health.failures if t <= start)
        penalty = hysteresis.penalty_s * max(merit - 2, 0) if len(health.failures) > 2 else 0.0
        return min(hysteresis.base_s + penalty, max(hysteresis.max_s, hysteresis.base_s))

    def ready_at(self, name: str, health: mwa.Health, hysteresis: mwa.Hysteresis) -> float:
        start = self.start.get(name, health.since)
        return start + self.owed(health, hysteresis, start)

    def failed_round(self, name: str, health: mwa.Health, hysteresis: mwa.Hysteresis, now: float) -> None:
        if (
            health.state is mwa.State.UP
            and health.recovered
            and now < self.ready_at(name, health, hysteresis)
        ):
            self.start[name] = now

    def observed(self, before: Mapping[str, mwa.Health], after: Mapping[str, mwa.Health]) -> None:
        for name, health in after.items():
            was = before.get(name)
            if was is None or was.since != health.since:  # a transition, or a health reset by a reload
                self.start.pop(name, None)


def check_consistent(pump: Pump, before: dict[str, Any], model: ProofModel, fresh: list[mwa.Intent]) -> None:
    state = pump.state
    config = state.config
    hysteresis = mwa.agent_hysteresis(config.agent)
    names = {u.name for u in config.uplinks}
    assert set(state.healths) == names
    for u in config.uplinks:
        h = state.healths[u.name]
        check = u.check
        if h.state is not mwa.State.DOWN:
            assert h.bad_rounds < check.fall, h
        elif h.link_usable:
            assert h.good_rounds < check.rise, h
        assert len(h.samples) <= check.window and len(h.failures) <= mwa.FLAP_MEMORY
        assert list(h.failures) == sorted(h.failures) and all(t <= pump.now for t in h.failures)
        assert h.proving_since is None or h.since <= h.proving_since <= pump.now, h
        assert hysteresis.base_s <= mwa.owed_hysteresis_s(h, hysteresis) <= hysteresis.max_s
        assert 0 <= state.unjudged.get(u.name, 0)
    for family in config.families:
        decision = state.decisions[family]
        candidates = mwa._candidates(state, family)
        up = {u.name for u in candidates if state.healths[u.name].state is mwa.State.UP}
        if up:
            assert decision.selected in up, (decision, up, state.drained)
        if not decision.stranded:
            selected = state.healths[decision.selected or ""]
            assert selected.state is not mwa.State.DOWN and decision.selected not in state.drained
            assert family in config.uplink(decision.selected or "").families
    for name, family in state.carrying:
        assert name in names and family in config.uplink(name).families
    for intent in fresh:
        for release in intent.releases:
            assert release.uplink in names
            assert all((release.uplink, f) not in state.carrying for f in release.families), (
                release,
                state.carrying,
            )
            assert release.uplink in state.releasing
            event(f"a release ({state.releasing[release.uplink].kind})")
    # A move back to a better uplink, from one still up and usable, waits for its proof.
    old, new = before["selected"], state.selected(4)
    if old != new and old in names and new is not None:
        old_candidate = any(u.name == old for u in mwa._candidates(state, 4))
        if old_candidate and state.healths[old].state is mwa.State.UP:
            chosen = state.healths[new]
            better = config.uplink(new).priority < config.uplink(old).priority
            if better and chosen.recovered:
                ready_at = model.ready_at(new, chosen, hysteresis)
                assert pump.now >= ready_at - 1e-9, (old, new, pump.now, ready_at, chosen)
                event("a failback after a proof" + (" restarted" if new in model.start else ""))
                if len(chosen.failures) > 2:
                    event("a failback after a flap penalty")


@EXAMPLES
@given(st.integers(0, len(CONFIGS) - 1), st.lists(steps, min_size=1, max_size=25))
def test_any_sequence_of_observations_reloads_and_drains_leaves_a_consistent_state(
    variant: int, sequence: list[tuple[Any, ...]]
) -> None:
    pump = Pump(variant)
    model = ProofModel()
    seq = 0

    def after(before: dict[str, Any], mark: int) -> None:
        model.observed(before["healths"], pump.state.healths)
        check_consistent(pump, before, model, pump.intents[mark:])

    def on_tick_move(before: dict[str, Any]) -> None:
        after(before, len(pump.intents) - 1)

    def feed(name: str, ok: bool, lag: float) -> None:
        nonlocal seq
        seq += 1
        before, mark = pump.snapshot(), len(pump.intents)
        state = pump.state
        result = round_result(name, ok, pump.now - lag, seq)
        health = state.healths.get(name)
        if health is not None and not ok and health.link_usable and result.started_at > health.last_round_at:
            model.failed_round(name, health, mwa.agent_hysteresis(state.config.agent), pump.now)
        pump.step(mwa.on_round(state, result, pump.now))
        after(before, mark)

    check_consistent(pump, pump.snapshot(), model, pump.intents)
    for step in sequence:
        kind = step[0]
        if kind == "rounds":
            _, name, oks, spacing, lag = step
            for ok in oks:
                pump.advance(spacing, on_tick_move)
                feed(name, ok, lag if not ok else 0.0)
            continue
        if kind == "steady":
            _, seconds, failing = step
            for _ in range(seconds):
                pump.advance(1.0, on_tick_move)
                for name in NAMES:
                    feed(name, name not in failing, 0.0)
            continue
        if kind == "storm":
            _, failing, cycles, seconds = step
            for _ in range(cycles):
                for phase in (failing, frozenset()):
                    for _ in range(seconds):
                        pump.advance(1.0, on_tick_move)
                        for name in NAMES:
                            feed(name, name not in phase, 0.0)
            continue
        pump.advance(step[-1], on_tick_move)
        before, mark = pump.snapshot(), len(pump.intents)
        state = pump.state
        if kind == "carrier":
            _, name, carrier, _ = step
            wan = ("wan0", "wan2", "wan1")[NAMES.index(name)]
            pump.interfaces[wan] = dataclasses.replace(INTERFACES[wan], carrier=carrier)
            pump.step(mwa.on_links(state, pump.interfaces, pump.now))
        elif kind == "reload":
            pump.step(mwa.on_reload(state, CONFIGS[step[1]], [], [], "", pump.now))
        elif kind == "drain":
            _, name, release, force, _ = step
            pump.step(mwa.on_command(state, mwa.DrainCommand(name, release, force), pump.now, 0.0))
        elif kind == "undrain":
            pump.step(mwa.on_command(state, mwa.UndrainCommand(step[1]), pump.now, 0.0))
        elif kind == "released":
            if step[1] in state.releasing:
                pump.step(mwa.on_released(state, step[1], mwa.Released(deleted=1), pump.now))
        else:
            pump.step(mwa.on_tick(state, pump.now))
        after(before, mark)
