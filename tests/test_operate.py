"""Operating the agent, without a kernel: event records, hooks (real programs), webhooks (a
real HTTP server on loopback), the metrics exposition (parsed by prometheus_client), the
control socket (a real unix socket), init's config and check's warnings."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import multiwan_agent as mwa

CONFIG = mwa.parse_config(
    '[check]\ntargets = ["198.18.1.1", "198.18.1.2"]\n'
    '[[uplink]]\nname = "fibre"\ninterface = "wan0"\npriority = 1\n'
    '[[uplink]]\nname = "lte"\ninterface = "wan1"\npriority = 2\n',
    "agent.toml",
)
INTERFACES = {
    "wan0": mwa.Interface("wan0", 2, True, True, "203.0.113.2", "203.0.113.1"),
    "wan1": mwa.Interface("wan1", 3, True, True, "203.0.113.6", "203.0.113.5"),
}
DOWN = mwa.Transition("fibre", mwa.State.UP, mwa.State.DOWN, "3 consecutive failed rounds: upstream", 10.0)
SWITCH = mwa.SelectionChanged(4, "fibre", "lte", "fibre is down; lte is the best uplink up", 10.0, 8.0)


def record(event: mwa.Event = DOWN) -> dict:
    return mwa.event_record(event, wall_now=1_800_000_000.0, mono_now=20.0)


# event records ----------------------------------------------------------------------------


def test_every_event_has_a_hook_name_and_a_reason() -> None:
    events = [
        DOWN,
        SWITCH,
        mwa.NoUplinkUp(4, "lte", "no uplink is up; keeping lte", 1.0),
        mwa.Drained("lte", True, (4,), 1.0),
        mwa.Undrained("lte", 1.0),
        mwa.Reloaded("a.toml", 2, "", False, 1.0),
        mwa.ReloadRejected("bad", 1.0),
        mwa.FlowsReleased("lte", frozenset({4}), "it went down", 0x200, 0xFF00, mwa.Released(3), 1.0),
        mwa.ForeignAppeared(mwa.ForeignObject("ipv4 rule 5050", "it precedes"), 1.0),
        mwa.ProberDied("lte", "KeyError", 1.0),
    ]
    for event in events:
        rec = record(event)
        assert rec["event"] in mwa.HOOK_EVENTS and rec["reason"], rec
        json.dumps(rec)  # one JSON object
    down = record(DOWN)
    assert down == {
        "event": "uplink_down",
        "uplink": "fibre",
        "state": "down",
        "previous": "up",
        "reason": "3 consecutive failed rounds: upstream",
        "time": 1_799_999_990.0,
        "monotonic": 10.0,
    }
    assert record(SWITCH)["selected"] == "lte" and record(SWITCH)["family"] == "ipv4"


# hooks ----------------------------------------------------------------------------------


def hook_config(tmp_path: Path, script: str, timeout: str = "2s") -> mwa.Config:
    program = tmp_path / "hook.sh"
    program.write_text("#!/bin/sh\n" + script + "\n")
    program.chmod(0o755)
    return mwa.parse_config(
        '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
        f'[[hook]]\nexec = ["{program}", "--flag"]\nevents = ["uplink_down", "switch"]\n'
        f'timeout = "{timeout}"\n',
        "hooks.toml",
    )


async def run_notifications(notifications: mwa.Notifications, until, timeout_s: float = 10.0) -> None:
    task = asyncio.ensure_future(notifications.run())
    deadline = time.monotonic() + timeout_s
    try:
        while not until() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_hook_gets_the_event_in_its_environment_and_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the last file appears whole (mv), so the test never reads one half written
    script = f'env | grep ^MULTIWAN_ | sort > "{out}.env"; cat > "{out}.json"; echo "$1" > "{out}.tmp"'
    config = hook_config(tmp_path, script + f'; mv "{out}.tmp" "{out}"')

    async def main() -> None:
        notifications = mwa.Notifications(config)
        notifications.submit(record(DOWN))
        notifications.submit(record(mwa.Undrained("fibre", 1.0)))  # not asked for: not run
        await run_notifications(notifications, lambda: out.exists())

    asyncio.run(main())
    assert out.read_text().strip() == "--flag"
    env = dict(line.split("=", 1) for line in Path(f"{out}.env").read_text().splitlines())
    assert env == {
        "MULTIWAN_EVENT": "uplink_down",
        "MULTIWAN_UPLINK": "fibre",
        "MULTIWAN_FAMILY": "",
        "MULTIWAN_STATE": "down",
        "MULTIWAN_PREVIOUS": "up",
        "MULTIWAN_SELECTED": "",
        "MULTIWAN_REASON": "3 consecutive failed rounds: upstream",
    }
    assert json.loads(Path(f"{out}.json").read_text()) == record(DOWN)


def test_a_hook_that_hangs_is_killed_with_its_children(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pids = tmp_path / "pids"
    config = hook_config(
        tmp_path, f'sleep 1000 & echo $! >> "{pids}"; echo $$ >> "{pids}"; wait', timeout="300ms"
    )

    async def main() -> None:
        notifications = mwa.Notifications(config)
        notifications.submit(record(DOWN))
        await run_notifications(notifications, lambda: "killed" in caplog.text)

    with caplog.at_level(logging.WARNING, logger="multiwan"):
        asyncio.run(main())
    assert "event=uplink_down killed: still running after its 300ms timeout" in caplog.text
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid), pid


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


def test_a_burst_of_1000_events_queues_boundedly_and_never_blocks(tmp_path: Path) -> None:
    config = hook_config(tmp_path, "sleep 1000", timeout="200ms")

    async def main() -> float:
        notifications = mwa.Notifications(config)
        began = time.perf_counter()
        for _ in range(1000):
            notifications.submit(record(DOWN))
        took = time.perf_counter() - began
        assert len(notifications._hook_queue) == mwa.HOOK_QUEUE
        assert notifications.dropped == 1000 - mwa.HOOK_QUEUE
        await run_notifications(notifications, lambda: False, timeout_s=0.5)
        return took

    assert asyncio.run(main()) < 0.5  # submit is queueing only


# webhooks -------------------------------------------------------------------------------


class Receiver:
    """An HTTP server on loopback that answers `codes` in turn (None: never answers)."""

    def __init__(self, codes: list[int | None]) -> None:
        self.codes = codes
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        code = self.codes.pop(0) if self.codes else 200
        if code is None:
            await asyncio.sleep(60)
        writer.write(f"HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()


def test_a_webhook_posts_retries_500_and_a_silent_receiver_and_never_logs_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cr3t-token\n")
    monkeypatch.setattr(mwa, "WEBHOOK_RETRY_S", 0.05)
    receiver = Receiver([500, None, 200])

    async def main() -> None:
        server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = mwa.parse_config(
            '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
            f'[[webhook]]\nurl = "http://127.0.0.1:{port}/hook?key=querysecret"\n'
            f'events = ["switch"]\ntimeout = "300ms"\nbearer_token_file = "{token}"\n'
            'headers = { X-Api-Key = "h3ader-secret" }\n',
            "t",
        )
        notifications = mwa.Notifications(config)
        notifications.submit(record(SWITCH))
        notifications.submit(record(DOWN))  # not asked for
        await run_notifications(notifications, lambda: len(receiver.requests) >= 3)
        server.close()
        assert "h3ader-secret" not in mwa.describe_plan(config) and "querysecret" not in mwa.describe_plan(
            config
        )

    with caplog.at_level(logging.DEBUG, logger="multiwan"):
        asyncio.run(main())
    assert len(receiver.requests) == 3  # 500, no answer, 200: delivered once it could be
    head, body = receiver.requests[-1].split(b"\r\n\r\n", 1)
    assert b"POST /hook?key=querysecret HTTP/1.1" in head and b"Authorization: Bearer s3cr3t-token" in head
    assert b"X-Api-Key: h3ader-secret" in head and json.loads(body)["event"] == "switch"
    for secret in ("s3cr3t-token", "h3ader-secret", "querysecret"):
        assert secret not in caplog.text
    assert "webhook=http://127.0.0.1:" in caplog.text and "retrying with back-off" in caplog.text


def test_a_dead_receiver_costs_only_its_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mwa, "WEBHOOK_RETRY_S", 0.01)
    config = mwa.parse_config(
        '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
        '[[webhook]]\nurl = "http://127.0.0.1:9/"\ntimeout = "100ms"\n',
        "t",
    )

    async def main() -> None:
        notifications = mwa.Notifications(config)
        for _ in range(500):
            notifications.submit(record(DOWN))
        (sender,) = notifications._senders.values()
        assert len(sender._queue) == mwa.WEBHOOK_QUEUE and notifications.dropped == 500 - mwa.WEBHOOK_QUEUE
        await run_notifications(notifications, lambda: len(sender._queue) < mwa.WEBHOOK_QUEUE, timeout_s=5)
        assert len(sender._queue) < mwa.WEBHOOK_QUEUE  # it gave events up after their attempts

    asyncio.run(main())


# metrics --------------------------------------------------------------------------------


def test_every_metric_line_parses_and_matches_the_state() -> None:
    state, _ = mwa.start_agent(CONFIG, INTERFACES, [], None, "b", 100.0)
    for i in range(3):
        for name in ("fibre", "lte"):
            probes = (
                mwa.ProbeResult("198.18.1.1", True, 1.5),
                mwa.ProbeResult("198.18.1.2", False, reason="unreachable (from 203.0.113.1)"),
            )
            result = mwa.RoundResult(name, i, 100.0 + i, probes, 1)
            state, _ = mwa.on_round(state, result, 100.0 + i)
    metrics = mwa.Metrics()
    metrics.on_round(result)
    metrics.submit(record(SWITCH))
    metrics.submit(record(DOWN))
    metrics.on_switch_done(4, 1.2, 0.004)
    state = mwa.dataclasses.replace(
        state, drained={"lte": mwa.Drain(1.0)}, connections={"fibre": 7, "lte": 0}
    )
    text = metrics.render(state, dropped=3)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) >= {
        "multiwan_build_info", "multiwan_uplink_up", "multiwan_uplink_state", "multiwan_uplink_selected",
        "multiwan_uplink_drained", "multiwan_uplink_state_changes", "multiwan_probe_rtt_seconds",
        "multiwan_probe_loss_ratio", "multiwan_probe_requests", "multiwan_probe_failures",
        "multiwan_switches",
        "multiwan_detection_seconds", "multiwan_route_change_seconds", "multiwan_flows_released",
        "multiwan_tracked_connections", "multiwan_config_last_reload_successful",
    }  # fmt: skip

    def value(name: str, **labels: str) -> float:
        (sample,) = [
            s
            for f in families.values()
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sample.value

    assert value("multiwan_uplink_up", uplink="fibre") == 1
    assert value("multiwan_uplink_state", uplink="fibre", state="up") == 1
    assert value("multiwan_uplink_state", uplink="fibre", state="down") == 0
    assert value("multiwan_uplink_selected", uplink="fibre", family="ipv4") == 1
    assert value("multiwan_uplink_drained", uplink="lte") == 1
    assert value("multiwan_tracked_connections", uplink="fibre") == 7
    assert value("multiwan_switches_total", family="ipv4") == 1
    assert (
        value(
            "multiwan_probe_failures_total",
            uplink="lte",
            target="198.18.1.2",
            method="icmp",
            reason="unreachable",
        )
        == 1
    )
    assert value("multiwan_detection_seconds_count", family="ipv4") == 1
    assert value("multiwan_detection_seconds_bucket", family="ipv4", le="2.0") == 1
    assert value("multiwan_notifications_dropped_total") == 3
    allowed = {"uplink", "family", "target", "method", "state", "le", "reason", "version"}
    for f in families.values():
        for s in f.samples:
            assert set(s.labels) <= allowed, s


# the control socket -----------------------------------------------------------------------


def test_the_control_socket_answers_garbage_with_errors_and_bounds_clients(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def answer(request: dict) -> dict:
        return {"ok": True, "cmd": request["cmd"]}

    async def main() -> None:
        server = mwa.ControlServer(path, "root", answer)
        task = asyncio.ensure_future(server.run())
        for _ in range(100):
            if path.exists():
                break
            await asyncio.sleep(0.01)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        reader, writer = await asyncio.open_unix_connection(str(path))
        for line, expected in (
            (b'{"cmd": "status"}\n', {"ok": True, "cmd": "status"}),
            (b"garbage\n", "expected one JSON object per line"),
            (b"[1, 2]\n", 'expected an object with a "cmd"'),
            (b'{"cmd": 5}\n', 'expected an object with a "cmd"'),
            (b"[" * 3000 + b"\n", "expected one JSON object per line"),
        ):
            writer.write(line)
            reply = json.loads(await reader.readline())
            assert reply == expected if isinstance(expected, dict) else expected in reply["error"], reply
        writer.write(b"x" * 10_000 + b"\n")
        reply = json.loads(await reader.readline())
        assert "at most 4096 bytes" in reply["error"]
        writer.close()
        # idle clients up to the limit, then one more is told so; the first still gets answers
        idle = [await asyncio.open_unix_connection(str(path)) for _ in range(mwa.CONTROL_MAX_CLIENTS)]
        await asyncio.sleep(0.05)
        extra_reader, _ = await asyncio.open_unix_connection(str(path))
        assert "busy" in json.loads(await extra_reader.readline())["error"]
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.05)
        reply = await asyncio.get_running_loop().run_in_executor(
            None, mwa.control_request, str(tmp_path), {"cmd": "status"}
        )
        assert reply == {"ok": True, "cmd": "status"}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not path.exists()

    asyncio.run(main())


# init and check -------------------------------------------------------------------------


HAS_TOMLI_W = importlib.util.find_spec("tomli_w") is not None


def test_init_writes_a_config_that_check_accepts_with_its_reasons() -> None:
    if not HAS_TOMLI_W:  # OpenWrt's library set: init says what it needs instead
        with pytest.raises(ImportError):
            mwa.render_init([mwa.HostUplink("wan0", "auto", "auto", 1, (4,), "")], None)
        return
    uplinks = [
        mwa.HostUplink("wan0", "auto", "auto", 100, (4, 6), "IPv4: its default route comes from DHCP"),
        mwa.HostUplink(
            "wan1", "203.0.113.5", "none", 200, (4,), "IPv4: a static default route via 203.0.113.5"
        ),
        mwa.HostUplink("ppp0", "none", "none", 300, (4,), "IPv4: no gateway: point-to-point"),
    ]
    text = mwa.render_init(uplinks, None)
    config = mwa.parse_config(text, "init.toml")
    assert [(u.name, u.interface, u.gateway, u.priority) for u in config.uplinks] == [
        ("wan0", "wan0", "auto", 1),
        ("wan1", "wan1", "203.0.113.5", 2),
        ("ppp0", "ppp0", "none", 3),
    ]
    assert config.uplinks[0].check.targets == ("1.1.1.1", "9.9.9.9", "2606:4700:4700::1111", "2620:fe::fe")
    assert "# wan1: IPv4: a static default route via 203.0.113.5; metric 200 in main, so priority 2" in text
    assert mwa.parse_config(mwa.render_init(uplinks[:1], ["198.18.1.1"]), "t").uplinks[0].check.targets == (
        "198.18.1.1",
    )


def test_each_check_warning() -> None:
    config = mwa.parse_config(
        '[agent]\ncontrol_group = "nosuchgroup"\n[check]\ntargets = ["198.18.1.1"]\ninterval = "50ms"\n'
        '[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
        '[[uplink]]\nname = "lte"\ninterface = "wan9"\ngateway = "198.51.100.77"\n',
        "t",
    )
    facts = mwa.HostFacts(
        {"wan0": ("203.0.113.2/30",), "wan1": ("203.0.113.6/30",)},
        sysctl={
            "net.ipv4.ip_forward": "0",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.wan0.rp_filter": "1",
        },
        nft_problem="nft is not installed",
        missing_groups=("nosuchgroup",),
    )
    warnings = mwa.check_warnings(config, facts)
    expected = [
        "uplink[0] (fibre): strict reverse-path filtering on wan0",
        "uplink[1] (lte): interface wan9 does not exist on this host",
        "net.ipv4.ip_forward = 0",
        "nft is not installed: connection stickiness",
        "every uplink probes the one target 198.18.1.1",
        "198.18.1.1 gets 40 probes a second",
        "agent.control_group: no group 'nosuchgroup'",
    ]
    for start in expected:
        assert sum(w.startswith(start) for w in warnings) == 1, (start, warnings)
    assert len(warnings) == len(expected)
    on_link = mwa.HostFacts({"wan0": ("203.0.113.2/30",), "wan9": ("203.0.113.6/30",)})
    (gateway,) = [w for w in mwa.check_warnings(config, on_link) if "on-link" in w]
    assert gateway.startswith("uplink[1] (lte).gateway: 198.51.100.77 is not on-link on wan9")


def test_check_does_not_trace_back_into_a_closed_pipe(tmp_path: Path) -> None:
    import subprocess

    agent = Path(__file__).parent.parent / "multiwan_agent.py"
    example = Path(__file__).parent.parent / "multiwan.toml.example"
    out = subprocess.run(
        f"{sys.executable} {agent} check -c {example} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": os.environ.get("PATH", "")},
    )
    assert (
        out.stdout.startswith("config ") and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
    )


def test_a_webhook_url_with_credentials_is_refused_without_showing_them() -> None:
    with pytest.raises(mwa.ConfigError) as err:
        mwa.parse_config(
            '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
            '[[webhook]]\nurl = "https://user:s3cret@h.example/x?token=abc"\n',
            "t",
        )
    assert "expected no user:password@" in str(err.value) and "s3cret" not in str(err.value)
    with pytest.raises(mwa.ConfigError) as err:
        mwa.parse_config(
            '[check]\ntargets = ["198.18.1.1"]\n[[uplink]]\nname = "fibre"\ninterface = "wan0"\n'
            '[[webhook]]\nurl = "https://h.example:99999/x?token=abc"\n',
            "t",
        )
    assert "token=abc" not in str(err.value)


def test_metric_values_are_exact_and_removed_uplinks_leave_the_exposition() -> None:
    state, _ = mwa.start_agent(CONFIG, INTERFACES, [], None, "b", 100.0)
    metrics = mwa.Metrics()
    metrics.requests[(("uplink", "fibre"), ("target", "198.18.1.1"), ("method", "icmp"))] = 1234567
    metrics.requests[(("uplink", "gone"), ("target", "198.18.1.1"), ("method", "icmp"))] = 5
    text = metrics.render(state, dropped=0)
    assert 'multiwan_probe_requests_total{uplink="fibre",target="198.18.1.1",method="icmp"} 1234567' in text
    assert 'uplink="gone"' not in text
