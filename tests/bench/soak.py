#!/usr/bin/env python3
"""Soak: the agent under random faults for N minutes, watched for leaks.

Builds the lab (tests/lab.py), runs the agent in the router namespace with short
intervals (200 ms probes, fall 3, rise 3, hysteresis 1 s) and, every 1-4 s (seeded),
injects one random fault on either uplink: carrier loss, a silent upstream blackhole,
a dead gateway, 30% loss, the recovery of that uplink, or a reload (SIGHUP with an
alternating good config, one time in four a bad one). Every `--sample` seconds it
reads the agent's RSS, open fds and threads from /proc and its asyncio task count
from status.json. At the end it mends every fault, restores the config and checks:

- the agent never died, and its log holds no traceback;
- a least-squares slope over the samples after the warm-up (not last minus first):
  RSS under 1 MB per 10 minutes; fds, threads and tasks: fitted growth over the run
  under one of each;
- the agent settles on the preferred uplink (fibre) with lte up beside it.

Needs root; never touches the root namespace.

    sudo .venv/bin/python tests/bench/soak.py --minutes 30 [--seed 1] [--sample 30]
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AgentProcess, lab_config  # noqa: E402
from lab import Lab  # noqa: E402

ISPS: Final = ("isp1", "isp2")
FAULTS: Final = ("carrier", "blackhole", "dead_gateway", "loss", "recovery", "reload")
#: Pause between two faults, s (drawn uniformly).
FAULT_GAP_S: Final = (1.0, 4.0)
#: RSS bar: the fitted slope, in bytes per second (1 MB per 10 minutes).
RSS_SLOPE_MAX_B_PER_S: Final = 1024 * 1024 / 600
#: Fitted growth over the run allowed for fds, threads and tasks (less than one of each).
COUNT_GROWTH_MAX: Final = 1.0
#: Samples in the first part of the run are warm-up (allocator arenas, caches filling).
WARMUP_FRACTION: Final = 0.2


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    rss_bytes: int
    fds: int
    threads: int
    tasks: int


@dataclass(frozen=True, slots=True)
class SoakResult:
    seconds: float
    faults: dict[str, int]
    samples: tuple[Sample, ...]
    slopes_per_s: dict[str, float]
    problems: tuple[str, ...]
    rss_bar_b_per_s: float

    def report(self) -> str:
        kept = self.samples[_warmup_count(len(self.samples)) :]
        lines = [
            f"soak {self.seconds / 60:.1f} min, {len(self.samples)} samples ({len(kept)} after warm-up), "
            f"faults: " + ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())),
            f"  rss slope {self.slopes_per_s['rss_bytes'] * 600 / 1024:+.1f} KiB/10min "
            f"(bar {self.rss_bar_b_per_s * 600 / 1024:.0f}); "
            f"rss {kept[0].rss_bytes / 1024:.0f}->{kept[-1].rss_bytes / 1024:.0f} KiB",
            "  rss MiB: " + " ".join(f"{s.rss_bytes / 1048576:.1f}" for s in self.samples),
        ]
        for name in ("fds", "threads", "tasks"):
            values = [getattr(s, name) for s in kept]
            lines.append(
                f"  {name} slope {self.slopes_per_s[name] * 600:+.3f}/10min, "
                f"growth over the run {self.slopes_per_s[name] * (kept[-1].t - kept[0].t):+.2f} "
                f"(range {min(values)}-{max(values)})"
            )
        lines.extend(f"  PROBLEM: {p}" for p in self.problems)
        return "\n".join(lines)


def slope(ts: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over ts (0 for fewer than two points)."""
    n = len(ts)
    if n < 2:
        return 0.0
    mean_t = sum(ts) / n
    mean_y = sum(ys) / n
    var = sum((t - mean_t) ** 2 for t in ts)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var


def _warmup_count(n: int) -> int:
    return min(int(n * WARMUP_FRACTION), max(0, n - 3))


def read_sample(agent: AgentProcess, t: float) -> Sample | None:
    pid = agent.proc.pid
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except OSError:
        return None
    status = agent.status()
    tasks = status.get("tasks") if status else None
    if not isinstance(tasks, int):
        return None
    return Sample(
        t=t,
        rss_bytes=int(fields["VmRSS"].split()[0]) * 1024,
        fds=fds,
        threads=int(fields["Threads"]),
        tasks=tasks,
    )


def mend(lab: Lab, isp: str) -> None:
    lab.carrier(isp, True)
    lab.silent_drop(isp, False)
    lab.gateway_dead(isp, False)
    lab.loss(isp, 0)


def inject(lab: Lab, agent: AgentProcess, rng: random.Random, configs: Sequence[str], bad: str) -> str:
    fault = rng.choice(FAULTS)
    isp = rng.choice(ISPS)
    if fault == "carrier":
        lab.carrier(isp, False)
    elif fault == "blackhole":
        lab.silent_drop(isp, True)
    elif fault == "dead_gateway":
        lab.gateway_dead(isp, True)
    elif fault == "loss":
        lab.loss(isp, 30)
    elif fault == "recovery":
        mend(lab, isp)
    else:
        agent.config_path.write_text(bad if rng.random() < 0.25 else rng.choice(configs))
        agent.signal(signal.SIGHUP)
    return fault


def soak(
    minutes: float,
    seed: int,
    sample_s: float,
    workdir: Path,
    rss_slope_max_b_per_s: float = RSS_SLOPE_MAX_B_PER_S,
) -> SoakResult:
    """`rss_slope_max_b_per_s`: the RSS bar; a run of a few minutes still sees the allocator's
    warm-up (caches, arenas) and can only be held to a looser one than the soak's."""
    rng = random.Random(seed)
    faults: dict[str, int] = dict.fromkeys(FAULTS, 0)
    samples: list[Sample] = []
    problems: list[str] = []
    with Lab() as lab:
        good = lab_config(workdir / "state", hysteresis="1s", interval="200ms", timeout="200ms")
        # a real reload: lte's check changes (its prober restarts), fibre's weight too
        other = good.replace("priority = 2\n", 'priority = 2\n[uplink.check]\ntimeout = "150ms"\n').replace(
            "priority = 1\n", "priority = 1\nweight = 2\n"
        )
        bad = lab_config(workdir / "state", interval="soon")
        agent = AgentProcess(lab, workdir, good)
        try:
            agent.wait_both_up(timeout=20)
            began = time.monotonic()
            end = began + minutes * 60
            next_sample = began
            next_fault = began + rng.uniform(*FAULT_GAP_S)
            while (now := time.monotonic()) < end:
                if agent.proc.poll() is not None:
                    problems.append(f"agent exited with {agent.proc.returncode}")
                    break
                if now >= next_sample:
                    sample = read_sample(agent, now - began)
                    if sample is not None:
                        samples.append(sample)
                    next_sample += sample_s
                if now >= next_fault:
                    faults[inject(lab, agent, rng, (good, other), bad)] += 1
                    next_fault = now + rng.uniform(*FAULT_GAP_S)
                time.sleep(max(0.0, min(next_sample, next_fault, end) - time.monotonic()))
            seconds = time.monotonic() - began
            if not problems:
                for isp in ISPS:
                    mend(lab, isp)
                agent.config_path.write_text(good)
                agent.signal(signal.SIGHUP)
                try:
                    agent.wait_both_up(timeout=20)
                except AssertionError as err:
                    problems.append(f"did not settle on fibre with lte up: {str(err)[:400]}")
                final = read_sample(agent, time.monotonic() - began)
                if final is not None:
                    samples.append(final)
        finally:
            agent.stop()
        log = agent.log()
    if "Traceback" in log:
        start = log.index("Traceback")
        problems.append(f"traceback in the agent log: {log[start : start + 2000]}")
    kept = samples[_warmup_count(len(samples)) :]
    ts = [s.t for s in kept]
    slopes = {
        name: slope(ts, [getattr(s, name) for s in kept]) for name in ("rss_bytes", "fds", "threads", "tasks")
    }
    if len(kept) < 3:
        problems.append(f"only {len(kept)} samples after the warm-up")
    else:
        if slopes["rss_bytes"] >= rss_slope_max_b_per_s:
            problems.append(f"RSS grows {slopes['rss_bytes'] * 600 / 1024:.0f} KiB per 10 minutes")
        span = ts[-1] - ts[0]
        for name in ("fds", "threads", "tasks"):
            if slopes[name] * span >= COUNT_GROWTH_MAX:
                problems.append(f"{name} grow {slopes[name] * span:.2f} over {span:.0f}s")
    return SoakResult(seconds, faults, tuple(samples), slopes, tuple(problems), rss_slope_max_b_per_s)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="soak length (default 3, max 1440)")
    parser.add_argument(
        "--rss-bar", type=float, default=1024.0, help="RSS slope bar, KiB per 10 minutes (default 1024)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault sequence (default 1)")
    parser.add_argument(
        "--sample", type=float, default=None, help="s between samples (default 30; 5 for runs under 10 min)"
    )
    args = parser.parse_args()
    # SIGTERM (the suite stopping a soak it runs beside its tests) unwinds through the
    # lab's context manager, so that no namespace is left behind.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    minutes = max(0.5, min(args.minutes, 1440.0))
    sample_s = args.sample if args.sample is not None else (30.0 if minutes >= 10 else 5.0)
    with tempfile.TemporaryDirectory(prefix="mwsoak-") as tmp:
        result = soak(minutes, args.seed, max(1.0, sample_s), Path(tmp), args.rss_bar * 1024 / 600)
    print(result.report())
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
