"""Config fuzzing: a mutated valid config loads, or fails with one ConfigError naming a key path.

A seeded random walk over the valid configs (the example, tests/data/config/valid and one that
uses every table) swaps types, writes huge and negative numbers, 400-digit durations, NUL and
control characters, deep nesting, huge lists, unknown keys and empty tables; each mutation is
parsed in-process (bounded in time) and a sample goes through `check` in a subprocess. A
hypothesis property test then feeds arbitrary TOML documents, and mutations of the valid ones.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiwan_agent as mwa

ROOT = Path(__file__).parent.parent
DATA = Path(__file__).parent / "data" / "config"

#: A config that uses every table the agent reads, so that mutations reach every reader.
EVERY_TABLE = """
[agent]
state_dir = "/run/multiwan-fuzz"
hysteresis = "2s"
sticky = "source"
sticky_timeout = "10m"
control_group = "root"
metrics_listen = "127.0.0.1:9367"
metrics_textfile = "/var/lib/node-exporter/multiwan.prom"
keepalived_track_file = "/run/multiwan-fuzz/track"

[check]
method = ["icmp", "dns"]
query_name = "example.com"
query_type = "AAAA"
targets = ["198.18.1.1", "198.18.1.2", "2001:db8:ffff::1"]
interval = "500ms"
timeout = "400ms"
timeout_min = "50ms"
burst_spacing = "50ms"
passive_timeout = "300ms"
passive_destinations = 3
reliability = 2
window = 10
max_loss = 30
max_rtt = "off"
max_jitter = "50ms"

[[uplink]]
name = "fibre"
interface = "wan0"
gateway = "203.0.113.1"
gateway6 = "2001:db8::1"
priority = 1
weight = 2
nat = true
nat_exclude = ["198.51.100.0/24", "2001:db8:100::/48"]
release_flows = ["on_down", "on_failback"]
initial_state = "up"

[[uplink]]
name = "lte"
interface = "wwan0"
priority = 1
table = 300
mark = 0x200
[uplink.check]
method = "https"
url = "https://check.example.net:8443/generate_204"
expect_status = [204, 200]
tls_verify = false
targets = ["198.18.1.3"]

[[policy]]
name = "voip"
match = { protocol = "udp", dst_port = [5060, "10000-20000"], src = ["198.51.100.50/32"], iif = "lan0" }
uplinks = ["fibre", "lte"]
fallback = "drop"

[[hook]]
exec = ["/usr/local/bin/notify", "--urgent"]
events = ["switch", "uplink_down"]
timeout = "5s"

[[webhook]]
url = "https://hooks.example.net/multiwan"
events = "switch"
headers = { X-Team = "net" }
bearer_token_file = "/etc/multiwan-agent/token"
timeout = "3s"
"""

SEEDS: dict[str, str] = {
    "example": (ROOT / "multiwan.toml.example").read_text(),
    "every-table": EVERY_TABLE,
    **{p.stem: p.read_text() for p in sorted((DATA / "valid").glob("*.toml"))},
}
DOCUMENTS: dict[str, dict[str, Any]] = {name: mwa.tomllib.loads(text) for name, text in SEEDS.items()}
#: Longest one parse may take (the slowest of the fuzz takes milliseconds).
PARSE_BOUND_S = 2.0
#: How many mutations the deterministic fuzz tries, and how many of them go through `check`.
MUTATIONS = 600
CLI_SAMPLE = 24


# A TOML writer for any value (tomli-w refuses some, and recurses on deep ones) ----------


def toml_string(text: str) -> str:
    # JSON's escapes are TOML's, but TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Deep):
        return "[" * value.depth + toml_value(value.leaf) + "]" * value.depth
    return toml_string(str(value))  # dates and times: as strings


def toml_document(document: dict[str, Any]) -> str:
    """Every top-level key as `key = <inline value>`: valid TOML for any tree."""
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in document.items())


class Deep:
    """A value nested `depth` arrays deep, written without recursion."""

    def __init__(self, depth: int, leaf: Any) -> None:
        self.depth = depth
        self.leaf = leaf


# Mutations -----------------------------------------------------------------------


def leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every (path, value) of the tree, tables and arrays included."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, (*path, index))


def put(document: Any, path: tuple[Any, ...], value: Any) -> None:
    node = document
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


CONTROL = ["\0", "\n", "\r", "\t", "\x1b", "\x7f", "\u2028", "\ufeff"]


def odd_values(rng: random.Random, old: Any) -> list[Any]:
    """Values that broke or could break a reader: other types, extremes, bad characters."""
    text = old if isinstance(old, str) and old else "x"
    return [
        "1" * 400 + "s",
        "1" * 400 + ".5ms",
        "0." + "0" * 400 + "1s",
        "9" * 30 + "h",
        "-1s",
        "0s",
        "inf",
        "1e400s",
        "\u0661s",  # an Arabic-Indic digit
        10**18,
        -(10**18),
        2**63,
        -1,
        0,
        float("inf"),
        float("-inf"),
        float("nan"),
        1e308,
        -0.0,
        True,
        False,
        "",
        " ",
        text + rng.choice(CONTROL),
        rng.choice(CONTROL) + text,
        text[: len(text) // 2] + "\0" + text[len(text) // 2 :],
        text * 100,
        "x" * 5000,
        [old],
        [[old]],
        [],
        {},
        {"x": old},
        [old] * rng.choice([2, 1000]),
        Deep(rng.choice([50, 200, 400]), old if not isinstance(old, (dict, list)) else 1),
        5,
        [5],
        "/",
        "/tmp/" + "d" * 200,
        "198.51.100.1",
        "2001:db8::1",
        "198.51.100.0/24",
        "::/0",
        "169.254.1.1",
        "auto",
        "none",
        "up",
        "drop",
    ]


def plausible(rng: random.Random, old: Any) -> Any:
    """Another value of the kind `old` is: a flipped flag, a small number, a duration, the list cut."""
    if isinstance(old, bool):
        return not old
    if isinstance(old, int):
        return rng.choice([0, 1, 2, 3, 5, 100, 256, 1000, 65535, old + 1, old * 2])
    if isinstance(old, float):
        return rng.choice([0.0, 0.5, 99.9, old / 2])
    if isinstance(old, str) and mwa.DURATION_RE.match(old):
        return rng.choice(["50ms", "100ms", "1s", "2.5s", "10m", "1h", "7d", "168h"])
    if isinstance(old, list) and old:
        return old[: rng.randrange(1, len(old) + 1)][::-1]
    if isinstance(old, str):
        return rng.choice([old.upper(), old + "2", old[:1], "wan9", "198.18.9.9", "198.51.100.0/25"])
    return old


def mutate(rng: random.Random, document: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One mutation of a deep copy of `document`, and what it did."""
    document = json.loads(json.dumps(document, default=str))
    paths = [(p, v) for p, v in leaves(document) if p]
    path, old = rng.choice(paths)
    where = ".".join(str(p) for p in path)
    kind = rng.randrange(12)
    if kind >= 10:  # a plausible value of the same type: most of these still load
        value = plausible(rng, old)
        put(document, path, value)
        return f"{where} = {toml_value(value)[:60]}", document
    if kind < 6:
        value = rng.choice(odd_values(rng, old))
        put(document, path, value)
        return f"{where} = {toml_value(value)[:60]}", document
    if kind == 6:  # an unknown key beside it, or in the table it is
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict):
            parent[rng.choice(["typo", "Name", "name\n", "\0", "k" * 300])] = 1
            return f"unknown key beside {where}", document
        put(document, path, {"unknown": 1})
        return f"{where} = {{unknown = 1}}", document
    if kind == 7:  # drop it
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
        return f"del {where}", document
    if kind == 8:  # empty its table or array, or duplicate an array's items
        if isinstance(old, list) and old:
            put(document, path, old * rng.choice([2, 300]))
            return f"{where} repeated", document
        put(document, path, {} if isinstance(old, dict) else [])
        return f"{where} emptied", document
    # a huge list of distinct items of the kind it holds
    count = rng.choice([100, 3000, 30_000])
    put(document, path, [f"198.18.{i // 256 % 256}.{i % 256}" for i in range(count)])
    return f"{where} = [{count} addresses]", document


def fuzz_cases(count: int, seed: int = 12) -> list[tuple[str, str, str]]:
    """(seed config, what was mutated, TOML text); 1 to 3 mutations each."""
    rng = random.Random(seed)
    names = sorted(DOCUMENTS)
    cases = []
    for _ in range(count):
        name = rng.choice(names)
        document = DOCUMENTS[name]
        done = []
        for _ in range(rng.choice([1, 1, 1, 2])):
            what, document = mutate(rng, document)
            done.append(what)
        cases.append((name, "; ".join(done), toml_document(document)))
    return cases


def judge(text: str) -> tuple[mwa.Config | mwa.ConfigError, float]:
    """Parse once: a Config or the one ConfigError; any other exception fails the test."""
    started = time.perf_counter()
    try:
        result: mwa.Config | mwa.ConfigError = mwa.parse_config(text, "fuzz.toml")
    except mwa.ConfigError as err:
        result = err
    return result, time.perf_counter() - started


def assert_names_a_key_path(err: mwa.ConfigError, text: str) -> None:
    """A rejection names the file, and a key path unless the TOML itself does not parse."""
    assert str(err).startswith("fuzz.toml: ")
    if not err.key_path:
        assert err.message.startswith("invalid TOML") or err.message.startswith("expected at most"), err
        return
    assert not mwa._has_control(err.key_path), err  # on one line, control characters quoted
    if err.key_path.startswith('"'):
        first = json.JSONDecoder().raw_decode(err.key_path)[0]
    else:
        first = err.key_path.split(".")[0].split("[")[0]
    document = mwa.tomllib.loads(text)
    assert first in document or first in ("agent", "uplink"), err


def runs_through_start(config: mwa.Config) -> None:
    """What `check` and `run` do with a config before the first probe, minus the kernel."""
    mwa.describe_plan(config)
    mwa.log_effective_config(config, dry_run=True)
    state, _ = mwa.start_agent(config, {}, [], None, "fuzz", 0.0)
    document = mwa.status_document(
        state, running=True, dry_run=True, boot_id="fuzz", mono_now=0.0, wall_now=0.0
    )
    json.dumps(document, allow_nan=False)  # a status.json any JSON reader takes


def test_fuzzed_configs_load_or_fail_with_one_config_error() -> None:
    cases = fuzz_cases(MUTATIONS)
    accepted = rejected = 0
    slowest = (0.0, "")
    nft_texts: dict[str, str] = {}
    for name, what, text in cases:
        result, elapsed = judge(text)
        assert elapsed < PARSE_BOUND_S, f"{name}: {what}: took {elapsed:.1f}s"
        slowest = max(slowest, (elapsed, f"{name}: {what}"))
        if isinstance(result, mwa.ConfigError):
            rejected += 1
            assert_names_a_key_path(result, text)
            continue
        accepted += 1
        # What `run` needs of an accepted config: its plan, its log, its status, its nft table.
        runs_through_start(result)
        nft_texts.setdefault(mwa.render_nft(result, mwa.steering_when_all_up(result)), f"{name}: {what}")
    print(
        f"\nfuzz: {len(cases)} mutations, {accepted} accepted, {rejected} rejected, 0 tracebacks, "
        f"slowest load {slowest[0] * 1000:.1f} ms ({slowest[1][:80]}); "
        f"{len(nft_texts)} distinct nft tables"
    )
    assert accepted > 50 and rejected > 200
    if shutil.which("nft") is None:
        return
    for script, case in nft_texts.items():
        # `nft -c` changes nothing; labels may be missing on this kernel (the agent copes).
        proc = subprocess.run(
            ["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True, timeout=10
        )
        if proc.returncode != 0 and "label" in proc.stderr:
            continue
        assert proc.returncode == 0, f"{case}: nft -c refuses the accepted config's table: {proc.stderr}"


def test_fuzzed_configs_through_check_exit_0_or_2_without_traceback(tmp_path: Path) -> None:
    # The fuzz's sample, and three that gave tracebacks before (OverflowError, TypeError) or
    # passed `check` and broke `run` (a NUL in state_dir).
    example = DOCUMENTS["example"]
    known = [
        ("example", "hysteresis of 400 digits", {**example, "agent": {"hysteresis": "1" * 400 + "s"}}),
        ("example", "query_type = [A]", {**example, "check": {**example["check"], "query_type": ["A"]}}),
        ("example", "NUL in state_dir", {**example, "agent": {"state_dir": "/run/m\0"}}),
    ]
    cases = [(n, w, toml_document(d)) for n, w, d in known] + fuzz_cases(CLI_SAMPLE, seed=1212)
    for index, (name, what, text) in enumerate(cases):
        path = tmp_path / f"case{index}.toml"
        path.write_text(text)
        expected = judge(text)[0]
        proc = subprocess.run(
            [sys.executable, str(ROOT / "multiwan_agent.py"), "check", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "Traceback" not in proc.stderr, f"{name}: {what}: {proc.stderr}"
        if isinstance(expected, mwa.ConfigError):
            assert proc.returncode == 2, f"{name}: {what}: {proc.returncode} {proc.stderr}"
            assert f"error: {path}: {expected.key_path}" in proc.stderr, proc.stderr
        else:
            assert proc.returncode == 0, f"{name}: {what}: {proc.stderr}"


# Property: any TOML document --------------------------------------------------------

SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["1s", "250ms", "1" * 400 + "s", "auto", "198.18.1.1", "198.51.100.0/24", "wan0", "a\n"]),
)
KEYS = st.one_of(
    st.sampled_from(
        [
            "agent",
            "check",
            "uplink",
            "policy",
            "hook",
            "webhook",
            "name",
            "interface",
            "targets",
            "state_dir",
            "hysteresis",
            "method",
            "query_type",
            "nat_exclude",
            "match",
            "exec",
            "url",
        ]
    ),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=20,
)


@st.composite
def mutated_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with 0 to 3 of its values replaced (by any value, or one of its kind)
    or deleted: enough of them still load for the property to cover accepted configs too."""
    document = json.loads(json.dumps(DOCUMENTS[draw(st.sampled_from(sorted(DOCUMENTS)))], default=str))
    for _ in range(draw(st.integers(0, 3))):
        found = [(p, v) for p, v in leaves(document) if p]
        if not found:
            break
        path, old = draw(st.sampled_from(found))
        how = draw(st.sampled_from(["any", "kind", "delete"]))
        if how == "delete":
            parent = document
            for step in path[:-1]:
                parent = parent[step]
            del parent[path[-1]]
        else:
            value = draw(VALUES) if how == "any" else plausible(random.Random(draw(st.integers())), old)
            put(document, path, value)
    return document


DOCUMENTS_STRATEGY = st.one_of(st.dictionaries(KEYS, VALUES, max_size=6), mutated_documents())


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS_STRATEGY)
def test_any_toml_document_loads_or_yields_one_config_error(document: dict[str, Any]) -> None:
    text = toml_document(document)
    result, elapsed = judge(text)
    assert elapsed < PARSE_BOUND_S
    if isinstance(result, mwa.ConfigError):
        assert_names_a_key_path(result, text)
    else:
        runs_through_start(result)
        mwa.render_nft(result, mwa.steering_when_all_up(result))
