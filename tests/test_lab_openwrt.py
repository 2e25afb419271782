"""OpenWrt's realities in the netns lab: firewall4's reload and flush around the agent's
table, a kernel without conntrack labels, and keepalived's track file."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from agent_proc import AgentProcess, fake_tool_dir, lab_config
from lab import Lab

pytestmark = pytest.mark.lab

LTE_IP = "203.0.113.6"

#: A firewall4-shaped ruleset: what `fw4 reload` writes, in one transaction of its own
#: table (its `add table; delete table` prologue is how fw4 replaces it whole).
FW4 = """\
add table inet fw4
delete table inet fw4
table inet fw4 {
  chain input {
    type filter hook input priority filter; policy accept;
    ct state established,related accept
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan0" accept
  }
  chain mangle_forward { type filter hook forward priority mangle; policy accept; }
  chain srcnat {
    type nat hook postrouting priority srcnat; policy accept;
    oifname { "wan0", "wan1" } masquerade
  }
}
"""


def our_table(lab: Lab) -> str:
    return lab.run("router", "nft", "list", "table", "inet", "multiwan", check=False).stdout


def test_fw4_reload_leaves_the_agents_table_and_fw4_flush_gets_it_back_at_once(
    lab: Lab, tmp_path: Path
) -> None:
    lab.nft("router", FW4)
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"))
    agent.wait_log("nft: installed table inet multiwan (start)")
    agent.wait_both_up()
    before = our_table(lab)
    for _ in range(3):  # fw4 reload / restart: only `inet fw4` is written again
        lab.nft("router", FW4)
    time.sleep(0.5)  # would the agent react to another table's change? (it must not rewrite)
    assert our_table(lab) == before
    assert agent.log().count("nft: installed table") == 1 and "is gone" not in agent.log()
    # `service firewall stop` runs `fw4 flush`: every table goes, ours too
    flushed = time.monotonic()
    lab.run("router", "nft", "flush", "ruleset")
    deadline = flushed + 5
    while "chain prerouting" not in our_table(lab) and time.monotonic() < deadline:
        time.sleep(0.01)
    back = time.monotonic() - flushed
    assert back < 1.0, back  # within one interval of the shipped defaults (1 s)
    agent.wait_log("nft: table inet multiwan is gone; re-installing")
    lab.nft("router", FW4)  # the firewall starts again: its NAT is back
    assert lab.connect_once() == "203.0.113.2"
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    assert lab.connect_once() == LTE_IP


def test_a_kernel_without_conntrack_labels_gets_the_table_without_them(lab: Lab, tmp_path: Path) -> None:
    # This kernel has labels; a fake nft refuses what a kernel without nf_conntrack_labels refuses.
    refuse = (
        "script=$(cat)\n"
        'case "$script" in *"ct label"*) '
        'echo "Error: Could not process rule: No such file or directory" >&2; '
        'echo "  ct label set 127" >&2; exit 1;; esac\n'
        'printf "%s\\n" "$script" | exec /usr/sbin/nft "$@"'
    )
    env = fake_tool_dir(tmp_path, "nft", refuse)
    agent = AgentProcess(lab, tmp_path, lab_config(tmp_path / "state"), env=env)
    agent.wait_log("nft: conntrack labels are not available here")
    agent.wait_log("nft: installed table inet multiwan (start)")
    agent.wait_both_up()
    assert "ct label" not in our_table(lab) and "chain in_lte" in our_table(lab)
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    assert lab.connect_once() == LTE_IP
    assert agent.log().count("conntrack labels are not available") == 1  # one line, not a loop


def test_the_keepalived_track_file_says_when_no_uplink_carries_and_when_the_agent_stops(
    lab: Lab, tmp_path: Path
) -> None:
    track = tmp_path / "keepalived.track"
    config = lab_config(tmp_path / "state").replace(
        "[agent]\n", f'[agent]\nkeepalived_track_file = "{track}"\n'
    )
    agent = AgentProcess(lab, tmp_path, config)
    agent.wait_both_up()

    def value() -> str:
        deadline = time.monotonic() + 5
        while not track.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return track.read_text().strip()

    agent.wait_for(lambda s: value() == "0", 5, "track file 0")
    lab.silent_drop("isp1", True)
    agent.wait_selected("lte", timeout=5)
    assert value() == "0"  # lte carries: this router still has internet
    lab.silent_drop("isp2", True)
    agent.wait_for(lambda s: s["stranded"], 5, "no uplink up")
    agent.wait_for(lambda s: value() == "1", 5, "track file 1")
    lab.silent_drop("isp2", False)
    agent.wait_for(lambda s: value() == "0", 5, "track file 0 again")
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=10) == 0
    assert value() == "1"  # keepalived never reads "healthy" from an agent that is not there
