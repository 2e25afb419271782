"""status.json as untrusted input, and the document the agent writes, without a kernel."""

from __future__ import annotations

import json
import time

import pytest

import multiwan_agent as mwa

CONFIG = mwa.parse_config(
    '[check]\ntargets = ["198.18.1.1"]\n'
    '[[uplink]]\nname = "fibre"\ninterface = "wan0"\npriority = 1\n'
    '[[uplink]]\nname = "lte"\ninterface = "wan1"\npriority = 2\n',
    "agent.toml",
)
INTERFACES = {
    "wan0": mwa.Interface("wan0", 2, True, True, "203.0.113.2", "203.0.113.1"),
    "wan1": mwa.Interface("wan1", 3, True, True, "203.0.113.6", "203.0.113.5"),
}


def written() -> dict:
    state, _ = mwa.start_agent(CONFIG, INTERFACES, [], None, "b1", time.monotonic())
    state = mwa.dataclasses.replace(
        state,
        foreign=(mwa.ForeignObject("ipv4 rule 5050: from all lookup main (protocol 0)", "it precedes"),),
    )
    return mwa.status_document(
        state, running=True, dry_run=False, boot_id="b1", mono_now=time.monotonic(), wall_now=time.time()
    )


def test_the_document_the_agent_writes_reads_back() -> None:
    document = written()
    assert mwa.parse_status(json.dumps(document), "status.json") == document
    previous = mwa.previous_run(document)
    assert previous.boot_id == "b1" and previous.uplinks["fibre"].state is mwa.State.DOWN
    text = mwa.render_status(document)
    assert "WARNING foreign ipv4 rule 5050" in text and "NOT RUNNING" not in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "status.json: nested too deeply"),
        ("[]", "status.json: expected dict, got an array"),
        ("42", "status.json: expected dict, got 42"),
        ("{", "status.json: not JSON: "),
        ("\x00\xff garbage", "status.json: not JSON: "),
        ('{"uplinks": []}', "status.json: version: is missing"),
        ("{}", "status.json: version: is missing"),
    ],
)
def test_any_content_is_an_error_with_a_reason_never_a_crash(text: str, message: str) -> None:
    with pytest.raises(mwa.StatusError) as err:
        mwa.parse_status(text, "status.json")
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("uplinks",), [], "uplinks: expected dict, got an array"),
        (
            ("uplinks", "fibre", "since"),
            "yesterday",
            'uplinks.fibre.since: expected int or float, got "yesterday"',
        ),
        (
            ("uplinks", "fibre", "state"),
            "sideways",
            'uplinks.fibre.state: expected "up", "degraded" or "down"',
        ),
        (("uplinks", "fibre", "selected"), 1, "uplinks.fibre.selected: expected bool, got 1"),
        (
            ("uplinks", "fibre", "rtt_ms"),
            True,
            "uplinks.fibre.rtt_ms: expected int or float or null, got true",
        ),
        (("uplinks", "lte"), "down", 'uplinks.lte: expected dict, got "down"'),
        (("version",), 2, "version: expected 1, got 2"),
        (("pid",), "12", 'pid: expected int, got "12"'),
        (("families", "ipv4", "balance"), [], "families.ipv4.balance: expected dict, got an array"),
        (("foreign",), [7], "foreign[0]: expected dict, got 7"),
        (("policies", "voip"), 3, "policies.voip: expected dict, got 3"),
    ],
)
def test_a_wrong_shape_names_its_key(path: tuple[str, ...], value: object, message: str) -> None:
    document = written()
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(mwa.StatusError) as err:
        mwa.parse_status(json.dumps(document), "status.json")
    assert str(err.value).startswith(f"status.json: {message}")


def test_an_oversized_file_is_refused_before_parsing() -> None:
    with pytest.raises(mwa.StatusError, match="expected at most"):
        mwa.parse_status(" " * (mwa.STATUS_MAX_BYTES + 1), "status.json")


def test_liveness_from_the_lock_the_pid_the_boot_and_the_age() -> None:
    document = {**written(), "boot_id": mwa.read_boot_id()}
    pid = document["pid"]
    assert mwa.status_liveness(document, True, pid) is None
    assert mwa.status_liveness(document, False, None) == "no agent holds the lock"
    assert "not by the running agent" in (mwa.status_liveness(document, True, pid + 1) or "")
    assert "earlier boot" in (mwa.status_liveness({**document, "boot_id": "other"}, True, pid) or "")
    old = {**document, "updated_monotonic": time.monotonic() - mwa.STATUS_STALE_S - 1}
    assert "has not been rewritten" in (mwa.status_liveness(old, True, pid) or "")
    assert "NOT RUNNING: no agent holds the lock" in mwa.render_status(
        document, stale="no agent holds the lock"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"since_monotonic": 1' + "0" * 400, "uplinks.fibre.since_monotonic: expected a finite number"),
        ('"since": 1' + "0" * 400, "uplinks.fibre.since: expected a finite number"),
        ('"reason": "\\ud800"', "uplinks.fibre.reason: expected text that is valid UTF-8"),
    ],
)
def test_values_that_json_takes_but_nothing_can_use_are_refused(text: str, message: str) -> None:
    document = json.dumps(written())
    key = text.split(":", 1)[0]
    start = document.index(key, document.index('"fibre": {'))
    end = document.index(",", start)
    with pytest.raises(mwa.StatusError) as err:
        mwa.parse_status(document[:start] + text + document[end:], "status.json")
    assert str(err.value) == f"status.json: {message}"
