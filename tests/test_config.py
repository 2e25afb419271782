"""Config parsing: every invalid file gives exactly its expected message."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import multiwan_agent as mwa

DATA = Path(__file__).parent / "data" / "config"
ROOT = Path(__file__).parent.parent
INVALID = sorted((DATA / "invalid").glob("*.toml"))
VALID = sorted((DATA / "valid").glob("*.toml"))


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_config_message(path: Path) -> None:
    expected = path.with_suffix(".err").read_text().strip()
    with pytest.raises(mwa.ConfigError) as caught:
        mwa.parse_config(path.read_text(), "multiwan.toml")
    assert str(caught.value) == expected


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_config_parses(path: Path) -> None:
    config = mwa.parse_config(path.read_text(), path.name)
    assert config.uplinks


def test_defaults_and_overrides() -> None:
    config = mwa.parse_config((DATA / "valid" / "full.toml").read_text(), "full.toml")
    assert config.agent == mwa.AgentConfig(
        state_dir="/tmp/mwa",
        hysteresis_s=1.5,
        default_table=1000,
        rule_priority=7000,
        route_protocol=99,
        mark_mask=0xF0000,
    )
    vpn, isp = config.uplinks
    assert vpn.gateway == "none" and vpn.table == 1001 and vpn.mark == 0x10000
    assert vpn.check.methods == (mwa.Method.TCP,) and vpn.check.port == 443
    assert vpn.check.interval_s == 0.25 and vpn.check.timeout_s == 0.2
    assert (vpn.check.fall, vpn.check.rise, vpn.check.reliability) == (2, 4, 2)
    # per-uplink overrides inherit the rest of [check]
    assert isp.check.methods == (mwa.Method.ICMP,) and isp.check.targets == ("198.18.1.3",)
    assert isp.check.interval_s == 0.25 and isp.check.reliability == 1
    assert (isp.table, isp.mark, isp.gateway) == (1234, 0x50000, "203.0.113.1")


def test_probe_options() -> None:
    config = mwa.parse_config((DATA / "valid" / "probes.toml").read_text(), "probes.toml")
    (fibre,) = config.uplinks
    check = fibre.check
    assert check.methods == (mwa.Method.ICMP, mwa.Method.HTTPS, mwa.Method.DNS)
    assert check.port_for(mwa.Method.HTTPS) == 8443 and check.port_for(mwa.Method.DNS) == 53
    assert check.expect_status == (204, 200) and check.tls_verify is False
    assert (check.query_name, check.query_type) == ("example.com", "AAAA")
    assert (check.window, check.max_loss_pct, check.max_rtt_s, check.max_jitter_s) == (30, 10.5, None, 0.04)
    assert check.gateway_check is False and fibre.initial_state == "up"
    assert fibre.families == (4, 6)


def test_minimal_defaults() -> None:
    config = mwa.parse_config((DATA / "valid" / "minimal.toml").read_text(), "m.toml")
    (fibre,) = config.uplinks
    assert (fibre.gateway, fibre.priority, fibre.table, fibre.mark) == ("auto", 1, 201, 0x100)
    assert config.agent.hysteresis_s == 30.0
    assert fibre.check == mwa.CheckConfig(targets=("198.18.1.1",))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1s", 1.0), ("2m", 120.0), ("1.5s", 1.5), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert mwa.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["fast", "1", "", "1 sec", "-1s", 5])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        mwa.parse_duration(text)


def test_check_command_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "multiwan.toml"
    bad.write_text((DATA / "invalid" / "interval-not-duration.toml").read_text())
    run = subprocess.run(
        [sys.executable, str(ROOT / "multiwan_agent.py"), "check", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert f"{bad}: uplink[1].check.interval: expected a duration" in run.stderr
    good = subprocess.run(
        [sys.executable, str(ROOT / "multiwan_agent.py"), "check", "-c", str(ROOT / "multiwan.toml.example")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert good.returncode == 0, good.stderr
    assert "5000: from all lookup main suppress_prefixlength 0" in good.stdout
    assert "6023: from all lookup 200" in good.stdout


def test_run_with_bad_config_exits_2_before_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nhysteresis = 'soon'\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "multiwan_agent.py"), "run", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert 'agent.hysteresis: expected a duration such as "500ms" or "2s", got "soon"' in run.stderr


def test_missing_file() -> None:
    with pytest.raises(mwa.ConfigError, match="cannot read"):
        mwa.load_config("/nonexistent/multiwan.toml")


def test_steering_options() -> None:
    config = mwa.parse_config((DATA / "valid" / "steering.toml").read_text(), "steering.toml")
    assert config.agent.sticky == "source" and config.agent.sticky_timeout_s == 600
    fibre, cable, lte = config.uplinks
    assert (fibre.weight, cable.weight, lte.weight) == (2, 1, 1)
    assert lte.release_flows == {"on_down", "on_failback"} and not fibre.release_flows
    voip, guests = config.policies
    assert voip.match.protocol == "udp" and voip.match.dst_port == ("5060", "10000-20000")
    assert voip.match.families == (4, 6) and voip.uplinks == ("fibre", "lte") and voip.fallback == "drop"
    assert guests.match.iif == ("lan1",) and guests.match.families == (4,) and guests.fallback == "default"
    assert guests.match.dst_port == ("443", "8443")  # a port may be written as a string too


def test_toml_that_would_overflow_the_parser_is_a_config_error() -> None:
    with pytest.raises(mwa.ConfigError, match="t.toml: invalid TOML: nested too deeply"):
        mwa.parse_config("x = " + "[" * 100_000, "t.toml")
    with pytest.raises(mwa.ConfigError, match="t.toml: invalid TOML: "):
        mwa.parse_config("x = 1" + "0" * 5000, "t.toml")


# Many uplinks: the rule block has 256 slots per kind; tables skip the reserved ids -------


def many_uplinks(count: int, agent: str = "", extra: dict[int, str] | None = None) -> str:
    """A config of `count` uplinks u0.. on wan0..; `extra` adds lines to some of them."""
    lines = [agent, "[check]", 'targets = ["198.18.1.1"]']
    for i in range(count):
        lines += ["[[uplink]]", f'name = "u{i}"', f'interface = "wan{i}"', (extra or {}).get(i, "")]
    return "\n".join(lines)


def test_250_uplinks_get_free_tables_and_marks_of_their_own() -> None:
    config = mwa.parse_config(many_uplinks(250), "t.toml")
    tables = [u.table for u in config.uplinks]
    # today's ids up to the 51st (201-251), then on past the reserved 252-255
    assert tables == list(range(201, 252)) + list(range(256, 455))
    assert [u.mark for u in config.uplinks] == [(i + 1) << 8 for i in range(250)]
    assert config.uplinks[-1].mark == 0xFA00


def test_auto_tables_of_configs_that_fit_today_do_not_move() -> None:
    for count in (1, 29, 51):
        config = mwa.parse_config(many_uplinks(count), "t.toml")
        assert [u.table for u in config.uplinks] == [201 + i for i in range(count)]
    moved = mwa.parse_config(many_uplinks(3, "[agent]\ndefault_table = 1000"), "t.toml")
    assert [u.table for u in moved.uplinks] == [1001, 1002, 1003]


def test_auto_tables_skip_the_tables_set_explicitly() -> None:
    # u1 sets 203: u2 (203 by position) moves on to 204, and u3 to 205
    config = mwa.parse_config(many_uplinks(4, extra={1: "table = 203"}), "t.toml")
    assert [u.table for u in config.uplinks] == [201, 203, 204, 205]
    # a table set further down is never given to an uplink before it
    config = mwa.parse_config(many_uplinks(3, extra={2: "table = 201"}), "t.toml")
    assert [u.table for u in config.uplinks] == [202, 203, 201]
    # below the selection table: explicit ids keep today's checks
    with pytest.raises(mwa.ConfigError) as caught:
        mwa.parse_config(many_uplinks(2, extra={1: "table = 200"}), "t.toml")
    assert str(caught.value) == (
        "t.toml: uplink[1].table: expected a table id other than the reserved ones and 200, got 200"
    )


def test_more_uplinks_than_the_rule_block_has_slots_are_refused() -> None:
    wide = "[agent]\nmark_mask = 0xffff00"
    config = mwa.parse_config(many_uplinks(mwa.MAX_UPLINKS, wide), "t.toml")
    assert len(config.uplinks) == 256 and config.uplinks[-1].mark == 0x10000
    with pytest.raises(mwa.ConfigError) as caught:
        mwa.parse_config(many_uplinks(257, wide), "t.toml")
    assert str(caught.value) == (
        "t.toml: uplink: expected at most 256 uplinks (the agent's rule block has a slot per uplink "
        "for each kind of rule), got 257"
    )


def test_the_default_mark_mask_has_room_for_255_uplinks() -> None:
    assert len(mwa.parse_config(many_uplinks(255), "t.toml").uplinks) == 255
    with pytest.raises(mwa.ConfigError) as caught:
        mwa.parse_config(many_uplinks(256), "t.toml")
    assert str(caught.value) == (
        "t.toml: agent.mark_mask: expected room for a mark per uplink (256 uplinks), got 0xff00, "
        "which has room for 255"
    )


def test_the_highest_rule_priority_ends_the_block_just_below_main() -> None:
    text = many_uplinks(1, "[agent]\nrule_priority = 31742")
    config = mwa.parse_config(text, "t.toml")
    assert config.agent.rule_priority + mwa.RULE_BLOCK - 1 == 32765  # main's rule is 32766


# Regressions from the config fuzz (issue 12): each was a traceback, or a config that
# `check` accepted and `run` could not finish ----------------------------------------


def one_uplink(agent: str = "", check: str = "", uplink: str = "", tail: str = "") -> str:
    return "\n".join(
        [
            "[agent]",
            agent,
            "[check]",
            'targets = ["198.18.1.1"]',
            check,
            "[[uplink]]",
            'name = "fibre"',
            'interface = "wan0"',
            uplink,
            tail,
        ]
    )


def config_error(text: str) -> mwa.ConfigError:
    with pytest.raises(mwa.ConfigError) as caught:
        mwa.parse_config(text, "t.toml")
    return caught.value


def test_a_400_digit_duration_is_refused_not_infinite() -> None:
    # 400 digits are past float's range (infinity): not a duration at all
    err = config_error(one_uplink(agent=f'hysteresis = "{"1" * 400}s"'))
    assert err.key_path == "agent.hysteresis" and err.message.startswith("expected a duration such as")
    with pytest.raises(ValueError):
        mwa.parse_duration("1" * 400 + "s")
    # 300 are a finite duration, past every bound
    err = config_error(one_uplink(agent=f'hysteresis = "{"1" * 300}s"'))
    assert err.message == f'expected a duration from 0ms to 604800s, got "{"1" * 300}s"'
    assert config_error(one_uplink(check='interval = "1e400s"')).key_path == "check.interval"


def test_an_infinite_or_huge_sticky_timeout_is_refused() -> None:
    for value in ("1" * 400 + "s", "169h"):
        err = config_error(one_uplink(agent=f'sticky = "source"\nsticky_timeout = "{value}"'))
        assert err.key_path == "agent.sticky_timeout", err
    config = mwa.parse_config(one_uplink(agent='sticky = "source"\nsticky_timeout = "168h"'), "t.toml")
    assert "timeout 604800s" in mwa.render_nft(config, mwa.steering_when_all_up(config))


def test_query_type_and_method_of_the_wrong_type_are_config_errors() -> None:
    err = config_error(one_uplink(check='query_type = ["A"]'))
    assert str(err) == 't.toml: check.query_type: expected "A" or "AAAA", got an array'
    for method in ('["icmp", ["tcp"]]', "[{x = 1}]", "[1, 1]"):
        assert config_error(one_uplink(check=f"method = {method}")).key_path == "check.method"


def test_values_nested_1000_deep_are_config_errors() -> None:
    # ip_network shows (repr) what it refuses: a list nested 1,000 deep raised RecursionError
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(TypeError):
        mwa._network(deep)
    nested = "[" * 200 + "1" + "]" * 200
    for text, key_path in (
        (one_uplink(uplink=f"nat_exclude = {nested}"), "uplink[0].nat_exclude[0]"),
        (one_uplink(check=f"method = {nested}"), "check.method"),
        (one_uplink(check=f"query_type = {nested}"), "check.query_type"),
        (one_uplink(tail=f'[[policy]]\nname = "p"\nuplinks = "fibre"\nmatch = {{ dst = {nested} }}'), ""),
    ):
        assert config_error(text).key_path.startswith(key_path or "policy[0].match.dst")
    assert config_error("x = " + "[" * 1000 + "]" * 1000).message == "invalid TOML: nested too deeply"


def test_a_nul_in_state_dir_or_a_path_is_refused() -> None:
    err = config_error(one_uplink(agent='state_dir = "/run/mwa\\u0000x"'))
    expected = 'expected an absolute path without control characters, got "/run/mwa\\u0000x"'
    assert str(err) == f"t.toml: agent.state_dir: {expected}"
    assert config_error(one_uplink(agent='state_dir = "/run/mwa\\n"')).key_path == "agent.state_dir"
    for key, value in (
        ("keepalived_track_file", "/run/track\\u0000"),
        ("metrics_textfile", "/var/lib/x\\u0000.prom"),
    ):
        assert config_error(one_uplink(agent=f'{key} = "{value}"')).key_path == f"agent.{key}"
    webhook = '[[webhook]]\nurl = "https://hooks.example.net/x"\nbearer_token_file = "/etc/t\\u0000"'
    assert config_error(one_uplink(tail=webhook)).key_path == "webhook[0].bearer_token_file"
    hook = '[[hook]]\nexec = ["/usr/bin/no\\ntify"]'
    assert config_error(one_uplink(tail=hook)).key_path == "hook[0].exec"


def test_a_state_dir_too_long_for_the_control_socket_is_refused() -> None:
    fits = "/" + "d" * (mwa.SUN_PATH_MAX - len("/control.sock") - 1)
    assert mwa.parse_config(one_uplink(agent=f'state_dir = "{fits}"'), "t.toml").agent.state_dir == fits
    err = config_error(one_uplink(agent=f'state_dir = "{fits}d"'))
    assert err.key_path == "agent.state_dir" and "control.sock" in err.message


def test_names_and_interfaces_with_a_trailing_newline_are_refused() -> None:
    text = one_uplink()
    assert config_error(text.replace('"fibre"', '"fibre\\n"')).key_path == "uplink[0].name"
    assert config_error(text.replace('"wan0"', '"wan0\\n"')).key_path == "uplink[0].interface"
    policy = '[[policy]]\nname = "p\\n"\nuplinks = "fibre"\nmatch = { iif = "lan0" }'
    assert config_error(one_uplink(tail=policy)).key_path == "policy[0].name"
    policy = '[[policy]]\nname = "p"\nuplinks = "fibre"\nmatch = { iif = "lan0\\n" }'
    assert config_error(one_uplink(tail=policy)).key_path == "policy[0].match.iif"
    assert config_error(one_uplink(check='interval = "1s\\n"')).key_path == "check.interval"
    policy = '[[policy]]\nname = "p"\nuplinks = "fibre"\nmatch = { protocol = "tcp", dst_port = "443\\n" }'
    assert config_error(one_uplink(tail=policy)).key_path == "policy[0].match.dst_port"


def test_integers_are_not_networks() -> None:
    err = config_error(one_uplink(uplink="nat_exclude = [5]"))
    assert str(err) == 't.toml: uplink[0].nat_exclude[0]: expected a network such as "10.0.0.0/8", got 5'
    policy = '[[policy]]\nname = "p"\nuplinks = "fibre"\nmatch = { dst = 5 }'
    assert config_error(one_uplink(tail=policy)).key_path == "policy[0].match.dst"


def test_huge_lists_are_refused_at_once_and_duplicates_found_in_linear_time() -> None:
    targets = ", ".join(f'"198.18.{i // 256 % 256}.{i % 256}"' for i in range(330_000))
    started = time.perf_counter()
    err = config_error(
        one_uplink(check=f"targets = [{targets}]").replace('targets = ["198.18.1.1"]\n', "", 1)
    )
    assert time.perf_counter() - started < 2.0
    assert str(err).startswith("t.toml: ") and err.key_path == ""  # more than CONFIG_MAX_CHARS
    many = [f"198.18.0.{i}" for i in range(1, mwa.MAX_TARGETS + 2)]
    err = config_error(
        one_uplink(check=f"targets = {json.dumps(many)}").replace('targets = ["198.18.1.1"]\n', "", 1)
    )
    assert str(err) == f"t.toml: check.targets: expected at most 64 IP addresses, got {len(many)}"
    dup = json.dumps([*many[:63], many[0]])
    err = config_error(one_uplink(check=f"targets = {dup}").replace('targets = ["198.18.1.1"]\n', "", 1))
    assert str(err) == "t.toml: check.targets[63]: duplicate target 198.18.0.1"
    ports = ", ".join(["443"] * (mwa.MAX_LIST + 1))
    policy = (
        f'[[policy]]\nname = "p"\nuplinks = "fibre"\nmatch = {{ protocol = "tcp", dst_port = [{ports}] }}'
    )
    assert config_error(one_uplink(tail=policy)).key_path == "policy[0].match.dst_port"


def test_an_unknown_key_of_control_characters_is_shown_on_one_line() -> None:
    err = config_error(one_uplink(agent='"a\\nb" = 1'))
    assert str(err) == 't.toml: agent."a\\nb": unknown key'


def test_commands_that_only_read_state_dir_refuse_a_nul_in_it(tmp_path: Path) -> None:
    # status, history and reload fall back to the raw state_dir of a config that does not
    # validate; one with a NUL made status and history die in os.open.
    bad = tmp_path / "nul.toml"
    bad.write_text(one_uplink(agent='state_dir = "/run/mwa\\u0000x"'))
    for command in ("status", "history", "reload"):
        run = subprocess.run(
            [sys.executable, str(ROOT / "multiwan_agent.py"), command, "-c", str(bad)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 2 and "Traceback" not in run.stderr, (command, run.stderr)
        assert f"error: {bad}: agent.state_dir: expected an absolute path" in run.stderr
