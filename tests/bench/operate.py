#!/usr/bin/env python3
"""Operating benchmark: how fast the agent answers and obeys its operator, in the netns lab.

  status     100 `status` requests on the control socket while the agent probes 16
             uplinks (fibre, lte and 14 more through isp1; 2 targets each every 1 s),
             timed from a client in the router namespace; and 20 runs of the
             `multiwan-agent status` command itself (a new interpreter each time)
  drain      `drain fibre` -> the first new LAN connection through lte, and
             `undrain fibre` -> the first one through fibre again (it stayed up: no
             hysteresis), from the command's start, with a connector every 2 ms
  notify     a silent failure of fibre while a hook sleeps forever on every event and a
             webhook receiver never answers: detection time against its bound

Needs root; never touches the root namespace.

    sudo .venv/bin/python tests/bench/operate.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_proc import AGENT, AgentProcess, lab_config  # noqa: E402
from lab import Lab  # noqa: E402

FIBRE_IP = "203.0.113.2"
LTE_IP = "203.0.113.6"

REQUEST = """\
import json, socket, sys, time
with socket.socket(socket.AF_UNIX) as s:
    s.connect(sys.argv[1])
    print(time.monotonic(), flush=True)
    s.sendall(sys.argv[2].encode() + b"\\n")
    data = b""
    while not data.endswith(b"\\n"):
        data += s.recv(1 << 16)
assert json.loads(data)["ok"], data
"""

CLIENT = """\
import json, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(count):
    began = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(b'{"cmd": "status"}\\n')
        data = b""
        while not data.endswith(b"\\n"):
            data += s.recv(1 << 16)
    assert json.loads(data)["ok"]
    times.append(time.perf_counter() - began)
print(json.dumps(times))
"""


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def status_latency(tmp: Path) -> None:
    with Lab() as lab:
        extra = lab.add_extra_uplinks(14)
        uplinks = "".join(
            f'\n[[uplink]]\nname = "u{i}"\ninterface = "{dev}"\npriority = {3 + i}\n'
            for i, (dev, _, _) in enumerate(extra)
        )
        config = lab_config(tmp / "state", interval="1s", timeout="1s", extra=uplinks)
        agent = AgentProcess(lab, tmp, config)
        agent.wait_for(lambda s: all(u["state"] == "up" for u in s["uplinks"].values()), 30, "16 uplinks up")
        out = lab.run(
            "router", sys.executable, "-c", CLIENT, str(tmp / "state" / "control.sock"), "100"
        ).stdout
        socket_times = json.loads(out)
        command_times = []
        for _ in range(20):
            began = time.perf_counter()
            done = lab.run(
                "router", sys.executable, str(AGENT), "status", "--state-dir", str(tmp / "state"), check=False
            )
            command_times.append(time.perf_counter() - began)
            assert done.returncode == 0, done
        cpu = agent_cpu(lab, agent.proc.pid, 10.0)
        agent.stop()
    print(
        f"status over the control socket, 16 uplinks: p50 {percentile(socket_times, 0.5) * 1000:.2f} ms, "
        f"p99 {percentile(socket_times, 0.99) * 1000:.2f} ms, max {max(socket_times) * 1000:.2f} ms "
        f"(100 calls; bar 50 ms p99)"
    )
    print(
        "`multiwan-agent status` command, start to exit: "
        f"p50 {percentile(command_times, 0.5) * 1000:.0f} ms, "
        f"max {max(command_times) * 1000:.0f} ms (20 runs; a new interpreter each)"
    )
    print(f"agent CPU with 16 uplinks x 2 targets at 1 s: {cpu:.2f} % of one core")


def agent_cpu(lab: Lab, pid: int, seconds: float) -> float:
    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    import os

    hz = os.sysconf("SC_CLK_TCK")
    before, began = ticks(), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (ticks() - before) / hz / (time.monotonic() - began)


def drain(tmp: Path, runs: int) -> None:
    """From the request on the control socket (the agent's part), and from the start of the
    `multiwan-agent drain` command (with its interpreter's start)."""
    figures: dict[tuple[str, str], list[float]] = {}
    with Lab() as lab:
        agent = AgentProcess(lab, tmp, lab_config(tmp / "state", hysteresis="5s"))
        agent.wait_both_up(timeout=15)
        control = str(tmp / "state" / "control.sock")
        for _ in range(runs):
            for how in ("socket", "command"):
                for command, source in (("drain", LTE_IP), ("undrain", FIBRE_IP)):
                    connector = lab.start_connector(duration_s=10, period_ms=2, timeout_ms=50)
                    time.sleep(0.3)
                    began = time.monotonic()
                    if how == "socket":
                        request = json.dumps({"cmd": command, "uplink": "fibre"})
                        out = lab.run("router", sys.executable, "-c", REQUEST, control, request).stdout
                        began = float(out.split()[0])
                    else:
                        cli = [
                            sys.executable,
                            str(AGENT),
                            command,
                            "fibre",
                            "--state-dir",
                            str(tmp / "state"),
                        ]
                        assert lab.run("router", *cli, check=False).returncode == 0
                    time.sleep(0.5)
                    attempts = connector.stop()
                    first = next(a.t for a in attempts if a.t >= began and a.ok and a.detail == source)
                    figures.setdefault((command, how), []).append(first - began)
        agent.stop()
    for (command, how), values in sorted(figures.items()):
        where = "lte" if command == "drain" else "fibre again"
        start = "the request on the control socket" if how == "socket" else "the command's start"
        print(
            f"{command} -> new connections via {where}: median {statistics.median(values) * 1000:.0f} ms, "
            f"max {max(values) * 1000:.0f} ms from {start} ({runs} runs; bar 100 ms)"
        )


def notify(tmp: Path, runs: int) -> None:
    hook = tmp / "hook.sh"
    hook.write_text("#!/bin/sh\nexec sleep 1000\n")
    hook.chmod(0o755)
    extra = (
        f'\n[[hook]]\nexec = ["{hook}"]\ntimeout = "1h"\n'
        '[[webhook]]\nurl = "http://127.0.0.1:8099/x"\ntimeout = "1h"\n'
    )
    detections: list[float] = []
    with Lab() as lab:
        sink = lab.popen(
            "router",
            [sys.executable, "-c", "import socket\ns=socket.create_server(('127.0.0.1', 8099))\n"
             "c=[]\nprint('ready', flush=True)\nwhile True: c.append(s.accept())"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        agent = AgentProcess(lab, tmp, lab_config(tmp / "state", interval="1s", timeout="1s", extra=extra))
        agent.wait_both_up(timeout=15)
        for _ in range(runs):
            fault = time.monotonic()
            lab.silent_drop("isp1", True)
            moved = agent.wait_selected("lte", timeout=20)
            detections.append(moved["uplinks"]["fibre"]["since_monotonic"] - fault)
            lab.silent_drop("isp1", False)
            agent.wait_selected("fibre", timeout=30)
        agent.stop()
    print(
        f"silent failure with a hook that never ends and a webhook that never answers: detection median "
        f"{statistics.median(detections):.3f} s, max {max(detections):.3f} s ({runs} runs; bound 4.5 s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs of drain and notify (max 20)")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 20))
    with tempfile.TemporaryDirectory(prefix="mwbench-") as tmp:
        for name, step in (("status", lambda d: status_latency(d)), ("drain", lambda d: drain(d, runs)),
                           ("notify", lambda d: notify(d, runs))):  # fmt: skip
            workdir = Path(tmp) / name
            workdir.mkdir()
            step(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
