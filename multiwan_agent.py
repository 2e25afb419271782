#!/usr/bin/python3
"""multiwan-agent: multi-uplink failover for Linux routers.

One asyncio process. Per uplink it probes through that uplink's interface
(ICMP echo or TCP connect, sockets bound with SO_BINDTODEVICE and the uplink's
address), runs a fall/rise state machine, selects the best healthy uplink by
priority with hysteresis, and steers traffic through netlink: a routing table
per uplink, source/fwmark/oif rules into it, and one default route in a
selection table that is only ever *replaced*. Everything it creates carries
its own route protocol id, lives in its own tables and its own rule priority
range, and nothing else is ever touched. Conntrack is never flushed.

The module reads in order, one banner per section, each opening with what it
owns:
- Constants, Errors, Config (dataclasses and validation);
- the pure core, which takes data and a clock and returns decisions: Core:
  health state machine, Core: selection, Core: steering, Core: route plan,
  Core: the agent (the one agent state, driven by on_round, on_links,
  on_routes, on_reload, on_tick, ... which return an Intent);
- the edges, each owning one kernel interface: Probes, Netlink (routes and
  rules), Conntrack, nftables, Status document, systemd notification;
- Daemon (the supervisor, the pump between the edges and the core, signals),
  Command line, main().
"""

from __future__ import annotations

import signal
import sys

#: Signals that arrived before the daemon's handlers were in place (see catch_early_signals).
_EARLY_SIGNALS: list[int] = []

#: The installed command, `multiwan-agent run`, imports this module before it calls main().
_INSTALLED_RUN = sys.argv[0].rsplit("/", 1)[-1] == "multiwan-agent" and sys.argv[1:2] == ["run"]

#: Set by SCRIPT_LOADER in the globals it runs this module in (see run_without_the_parse_tree).
_FROM_SCRIPT_LOADER: bool = globals().get("_FROM_SCRIPT_LOADER", False)

_EARLY_SIGNALS_SET = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

if __name__ == "__main__" or _INSTALLED_RUN:
    # Run as a script, or imported by the installed `multiwan-agent run`: before the
    # imports below (a tenth of a second), SIGHUP's default action would kill an agent
    # that a reload request reaches while it starts.
    for _signum in _EARLY_SIGNALS_SET:
        signal.signal(_signum, lambda signum, _frame: _EARLY_SIGNALS.append(signum))
    # Re-executed by run_without_the_parse_tree, which blocked them across the exec:
    # whatever arrived meanwhile is delivered now, to the handlers just set.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _EARLY_SIGNALS_SET)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import grp  # noqa: E402
import heapq  # noqa: E402
import ipaddress  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Iterator, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Final, Protocol, TypeVar  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__version__: Final = "0.1.0"

#: The type of a result that a helper passes through (a worker thread's, a timed wait's).
T = TypeVar("T")

log = logging.getLogger("multiwan")


#: The default of a compiled replacer's parameters: "keep this field as it is".
_KEEP: Final = object()
_REPLACERS: dict[type, Callable[..., Any]] = {}


def evolve(obj: T, /, **changes: Any) -> T:
    """dataclasses.replace(obj, **changes), for the frozen dataclasses of the core.

    The core replaces its state on every probe round (an AgentState has some 40 fields),
    and dataclasses.replace walks the fields and builds a dict each time: at 64 uplinks
    a tenth of the event loop. This compiles, once per class, the function replace would
    be if written out by hand (as dataclasses writes __init__): one call, no loop. An
    unknown field name is a TypeError, as it is for replace."""
    replacer = _REPLACERS.get(type(obj))
    if replacer is None:
        replacer = _REPLACERS[type(obj)] = _compile_replacer(type(obj))
    return replacer(obj, **changes)  # type: ignore[no-any-return]


def _compile_replacer(cls: type) -> Callable[..., Any]:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    parameters = "".join(f", {name}=_KEEP" for name in names)
    arguments = ", ".join(f"{name}=_obj.{name} if {name} is _KEEP else {name}" for name in names)
    namespace: dict[str, Any] = {"_cls": cls, "_KEEP": _KEEP}
    exec(f"def replace(_obj, *{parameters}):\n    return _cls({arguments})\n", namespace)
    return namespace["replace"]  # type: ignore[no-any-return]


# Constants ###################################################################
#
# Every number the agent runs by, with its unit in the name and why it is so.

#: Exit code of `run` when a task or thread could not be kept alive (systemd restarts it).
EXIT_FAILURE: Final = 1
#: Exit code for a configuration that does not validate (nothing was changed).
EXIT_CONFIG: Final = 2
#: Exit code when the agent refuses to start (collision, another agent, missing privilege).
EXIT_REFUSED: Final = 3
#: `check --strict`: the config is valid, but the host gave a warning.
EXIT_WARNINGS: Final = 1
#: drain, undrain, reload: the agent refused (the message says why).
EXIT_REFUSED_COMMAND: Final = 1
#: `status`: no uplink is up (the agent runs).
EXIT_NO_UPLINK: Final = 1
#: `status`: the agent is not running, or its status cannot be read.
EXIT_NOT_RUNNING: Final = 3

#: `check` warns when one target gets more probes a second than this from all uplinks.
PROBE_RATE_WARN_PER_S: Final = 10.0
#: Uplinks whose rounds start together (ProberSet.sync): 8 x 4 probes leave within a
#: millisecond or two, and their replies are read in one wake-up of the event loop.
PROBE_SLOT_UPLINKS: Final = 8
#: Where every command looks for the config unless told (-c).
DEFAULT_CONFIG: Final = "/etc/multiwan-agent/multiwan.toml"
#: Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
IFNAME_MAX: Final = 15
#: Tables the kernel reserves: unspec, compat, default, main, local.
RESERVED_TABLES: Final = frozenset({0, 252, 253, 254, 255})
#: Route protocol ids 0-4 belong to the kernel (unspec, redirect, kernel, boot, static).
FIRST_FREE_PROTOCOL: Final = 5
#: The rule priority block the agent owns: `rule_priority` to `rule_priority + RULE_BLOCK - 1`.
RULE_BLOCK: Final = 1024
#: Offsets inside that block (see plan_network for why this order), 256 slots per kind:
#: oif 100-355, source 356-611, fwmark 612-867, LAN prefixes 1000 (868-999, 1001-1022 free).
#: Agents before it owned a 100-long block (oif 10, source 40, fwmark 70, selection 99)
#: that the new one covers and shares only main's rule with: a restart over an old agent's
#: rules adds the new ones beside them, then deletes the old ones, highest first (see
#: diff_network).
RULE_MAIN_OFFSET: Final = 0
RULE_OIF_OFFSET: Final = 100
RULE_SOURCE_OFFSET: Final = 356
RULE_MARK_OFFSET: Final = 612
#: Every `from <LAN prefix> lookup <its uplink's table>` rule shares this one priority (they
#: differ by source): an uplink may have several prefixes, so a slot per uplink would not do.
RULE_PREFIX_OFFSET: Final = 1000
#: What happens to packets from an uplink's LAN prefixes while it cannot carry IPv6.
LAN_PREFIX_FAILOVER: Final = ("none", "nat66")
RULE_DEFAULT_OFFSET: Final = 1023
#: One rule slot per uplink and kind bounds the number of uplinks (mark_mask may bound it lower:
#: the default 0xff00 has room for 255 marks).
MAX_UPLINKS: Final = 256

#: The adaptive timeout's floor on RFC 6298's RTT variation: on a very stable path it goes
#: to zero and SRTT + 4 x RTTVAR would call the first slightly slow reply lost.
RTTVAR_FLOOR_MS: Final = 5.0
#: A burst round costs a token; the bucket holds BURST_BUCKET confirmations (fall + rise
#: rounds each) and refills by one round per BURST_REFILL_ROUNDS intervals: a link that
#: flaps for long adds at most a fifth to its probe rate, one that flaps a few times
#: (five faults and recoveries) is confirmed at burst speed every time.
BURST_BUCKET: Final = 5
BURST_REFILL_ROUNDS: Final = 5
#: A burst probe whose timeout fired this much (or half its timeout) late was not judged:
#: the agent itself was late (event-loop lag, a starved machine), not the path.
AGENT_LATE_S: Final = 0.05
#: Passive health: the window its shares are judged over; the least unanswered share, and
#: the rise over the uplink's long-run share, that make it suspect; the connections that
#: long-run share is averaged over; the time after a suspicion before another one; how
#: long status shows "suspect"; the connections tracked per uplink at most.
PASSIVE_WINDOW_S: Final = 2.0
PASSIVE_SHARE: Final = 0.5
PASSIVE_RISE: Final = 0.3
PASSIVE_BASELINE_CONNECTIONS: Final = 50
PASSIVE_HOLDOFF_S: Final = 10.0
PASSIVE_SUSPECT_SHOWN_S: Final = 2.0
PASSIVE_PENDING_MAX: Final = 4096
#: The newest connections with a known fate that a suspicion is judged on: at least this
#: many, and twice passive_destinations.
PASSIVE_RECENT_MIN: Final = 6
#: How often passive health is judged while connections wait for replies, and when idle.
PASSIVE_TICK_S: Final = 0.05
PASSIVE_IDLE_TICK_S: Final = 0.5

#: Status metrics (rtt, loss) are rewritten at most this often; transitions at once.
STATUS_METRICS_PERIOD_S: Final = 1.0
#: ... and less often when a write costs more than this share of a core: the document
#: grows with the uplinks (58 KB at 64, 190 KB at 250), its refresh must not.
STATUS_METRICS_CPU_SHARE: Final = 0.002
#: How often status counts the tracked connections marked for each uplink (a conntrack dump).
CONNTRACK_PERIOD_S: Final = 2.0
#: Up to this many uplinks, a dump per mark the kernel filters; past it, one dump for all.
CONNTRACK_FILTERED_MARKS_MAX: Final = 4
#: ... and the counts are spaced to take at most this share of a core (status only shows
#: them: a huge table, or the kernel's walk of its hash table, must not cost more).
CONNTRACK_COUNT_CPU_SHARE: Final = 0.005
#: How long a count of tracked connections waits for a reconcile to end (then goes on anyway).
CONNTRACK_PAUSE_MAX_S: Final = 2.0
#: How soon a thread that wants the GIL gets it (Python's default is 5 ms): see run_agent.
GIL_SWITCH_INTERVAL_S: Final = 0.0005
#: A full netlink reconcile also runs this often, to repair what events missed.
RESYNC_PERIOD_S: Final = 30.0
#: ... with up to this many uplinks; with more it is spaced in proportion (a resync dumps
#: every link, address, rule and route: at 64 uplinks a 30 s period was ~1 % of a core,
#: and its decode held the probes' sendto calls), at most RESYNC_PERIOD_MAX_S apart.
RESYNC_UPLINKS: Final = 16
RESYNC_PERIOD_MAX_S: Final = 600.0
#: Flap damping remembers this many of an uplink's newest failures: past the 20 that reach
#: the default flap_max_hysteresis, more would change nothing but the memory they take.
FLAP_MEMORY: Final = 32
#: The figure of merit that costs no penalty: two failures in a row are an outage and its
#: relapse, the third is flapping (Cisco's defaults, 1000 per flap and suppress at 2000, say so too).
FLAP_FREE_MERIT: Final = 2.0
#: A failure whose weight has decayed below this (4.3 half-lives) no longer counts as recent.
FLAP_FORGOTTEN: Final = 0.05

#: Longest an `nft` run may take before it is killed (a table load takes tens of ms).
NFT_TIMEOUT_S: Final = 5.0
#: `--cleanup` deletes our table at exit with this, shorter, timeout.
NFT_CLEANUP_TIMEOUT_S: Final = 2.0
#: An nft run still going this long past its timeout (the kill failed) fails the watchdog.
NFT_STUCK_GRACE_S: Final = 5.0
#: nft_run's exit codes for an nft that is not there and one that was killed at its timeout.
NFT_MISSING: Final = 127
NFT_TIMED_OUT: Final = 124
#: One conntrack answer is waited for at most this long (the kernel answers in microseconds).
CONNTRACK_RECV_TIMEOUT_S: Final = 1.0
#: A conntrack job that makes no progress this long fails the watchdog (each recv has a timeout).
CONNTRACK_STUCK_S: Final = 30.0
#: Observations left untaken this long fail the watchdog.
PUMP_STUCK_S: Final = 2.0
#: A supervised task that dies this many times within the window ends the agent (EXIT_FAILURE).
SUPERVISOR_MAX_DEATHS: Final = 5
SUPERVISOR_WINDOW_S: Final = 60.0
#: First restart delay of a task that died; it doubles with each death in the window.
SUPERVISOR_RESTART_S: Final = 1.0
#: At exit: how long tasks get to stop, and netlink to remove our objects (--cleanup).
SHUTDOWN_TASKS_S: Final = 0.5
SHUTDOWN_CLEANUP_S: Final = 3.0

#: status.json's format version, and the most of it a reader takes in.
STATUS_VERSION: Final = 1
STATUS_MAX_BYTES: Final = 4 << 20
#: Longest an owed flow release waits for the live nft table to stop steering to its uplink.
RELEASE_STEERING_WAIT_S: Final = NFT_TIMEOUT_S + 1.0
#: Longest a status write waits for the route work of the decision it shows.
STATUS_HOLD_S: Final = 1.0
#: status.json is rewritten at least this often, so that its age tells a dead agent.
STATUS_HEARTBEAT_S: Final = 5.0
#: `status` calls an agent whose status.json is older than this stale.
STATUS_STALE_S: Final = 3 * STATUS_HEARTBEAT_S
#: The lock in state_dir that makes one agent per state (flock; holds the pid).
LOCK_FILE: Final = "agent.lock"
#: History: events kept (state_dir/history.json), its format and size bounds, its write period.
HISTORY_SIZE: Final = 1000
HISTORY_VERSION: Final = 1
HISTORY_MAX_BYTES: Final = 4 << 20
HISTORY_WRITE_PERIOD_S: Final = 1.0
#: The control socket in state_dir, and its bounds: request size, clients at once, requests
#: per connection, the time a client may take, events per history reply, reply size read.
CONTROL_SOCKET: Final = "control.sock"
CONTROL_MAX_REQUEST: Final = 4096
CONTROL_MAX_CLIENTS: Final = 8
CONTROL_MAX_REQUESTS: Final = 100
CONTROL_TIMEOUT_S: Final = 5.0
CONTROL_MAX_EVENTS: Final = 1000
CONTROL_MAX_REPLY: Final = 8 << 20
#: How long the CLI waits for the agent's reply (a reload checks nft, up to NFT_TIMEOUT_S).
CONTROL_CLIENT_WAIT_S: Final = NFT_TIMEOUT_S + 5.0
#: Hooks: at most this many run at once; events waiting beyond HOOK_QUEUE drop the oldest.
HOOK_CONCURRENCY: Final = 4
HOOK_QUEUE: Final = 100
#: Webhooks: events waiting per webhook, attempts per event, and the retry back-off.
WEBHOOK_QUEUE: Final = 100
WEBHOOK_ATTEMPTS: Final = 8
WEBHOOK_RETRY_S: Final = 1.0
WEBHOOK_RETRY_MAX_S: Final = 60.0
#: The last bytes of a hook's stderr kept, to log its last line when it fails.
HOOK_STDERR_KEPT: Final = 4096
#: A dropped notification is logged at most this often.
NOTIFY_DROP_LOG_S: Final = 10.0
#: The metrics textfile is rewritten this often.
METRICS_TEXTFILE_PERIOD_S: Final = 5.0
#: Attempts to take it, and the pause between them (a `status` holds it shared for an instant).
LOCK_ATTEMPTS: Final = 10
LOCK_RETRY_S: Final = 0.02

# Kernel constants not exported by the socket module on every Python.
SO_BINDTODEVICE: Final = getattr(socket, "SO_BINDTODEVICE", 25)
NETLINK_ROUTE: Final = 0
NETLINK_NETFILTER: Final = 12
RTMGRP_LINK: Final = 0x1
RTMGRP_IPV4_IFADDR: Final = 0x10
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV4_RULE: Final = 0x80
RTMGRP_IPV6_IFADDR: Final = 0x100
RTMGRP_IPV6_ROUTE: Final = 0x400
#: RTNLGRP_IPV6_RULE (19) has no RTMGRP_ name; as a bind() bit it is 1 << 18.
RTMGRP_IPV6_RULE: Final = 1 << 18
IFF_UP: Final = 0x1
IFF_LOWER_UP: Final = 0x10000
IFA_F_SECONDARY: Final = 0x01
#: IPv6 addresses that must not source our probes: still in DAD, failed DAD, deprecated.
IFA_F_UNUSABLE6: Final = 0x40 | 0x08 | 0x20
RT_SCOPE_UNIVERSE: Final = 0
RT_TABLE_MAIN: Final = 254
RTN_UNREACHABLE: Final = 7
#: Conntrack status bit of a connection whose destination was NATed (a port forward).
IPS_DST_NAT: Final = 1 << 5
#: The conntrack label bit the agent sets on connections that came in from the internet.
INBOUND_LABEL: Final = 127
#: The metric our real defaults get (none is given; IPv6 makes 0 into 1024).
DEFAULT_METRIC: Final = {4: 0, 6: 1024}
NLMSG_HEADER: Final = struct.Struct("=IHHII")
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_DUMP: Final = 0x300
NLM_F_ACK: Final = 0x4
NLA_HEADER: Final = 4
NLA_TYPE_MASK: Final = 0x3FFF
#: ctnetlink: (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET / _DELETE, and the attributes we read.
CT_GET: Final = (1 << 8) | 1
CT_DELETE: Final = (1 << 8) | 2
CTA_TUPLE_ORIG: Final = 1
CTA_STATUS: Final = 3
CTA_MARK: Final = 8
CTA_ID: Final = 12
CTA_ZONE: Final = 18
CTA_MARK_MASK: Final = 21
CTA_LABELS: Final = 22
CTA_TUPLE_IP: Final = 1
CTA_IP_V4_DST: Final = 2
CTA_IP_V6_DST: Final = 4
CTA_TUPLE_PROTO: Final = 2
CTA_PROTO_NUM: Final = 1
CTA_PROTO_DST_PORT: Final = 3
#: ctnetlink's event message (IPCTNL_MSG_CT_NEW: new connections and updates alike), the
#: flag a new one carries, and the groups we listen to: NFNLGRP_CONNTRACK_NEW and _UPDATE.
CT_NEW_EVENT: Final = 1 << 8
NLM_F_CREATE: Final = 0x400
CT_EVENT_GROUPS: Final = 0x1 | 0x2
#: Conntrack status bit of a connection that has seen a reply.
IPS_SEEN_REPLY: Final = 1 << 1
#: Deletes sent in one datagram (their acks fit the receive buffer many times over).
CT_DELETE_BATCH: Final = 256

#: Address families, as the agent names them (4, 6), and their kernel constants.
FAMILIES: Final = (4, 6)
FAMILY_NAME: Final = {4: "ipv4", 6: "ipv6"}
FAMILY_TITLE: Final = {4: "IPv4", 6: "IPv6"}
ADDRESS_FAMILY: Final = {4: socket.AF_INET, 6: socket.AF_INET6}
DEFAULT_DST: Final = {4: "0.0.0.0/0", 6: "::/0"}
HOST_PREFIX: Final = {4: 32, 6: 128}

#: When an uplink's marked connections are deleted from conntrack (never a flush).
RELEASE_EVENTS: Final = ("on_down", "on_failback")
#: How new connections of a balance group are spread: per connection, or per LAN host.
STICKY_MODES: Final = ("connection", "source")
#: What a policy's matching traffic does when none of its uplinks is usable.
POLICY_FALLBACKS: Final = ("default", "drop")
#: Protocols a policy may match, as nft spells them, and the families they exist in.
POLICY_PROTOCOLS: Final = {"tcp": (4, 6), "udp": (4, 6), "icmp": (4,), "icmpv6": (6,)}
#: The metric of the `unreachable default` in each uplink table: below every real default.
UNREACHABLE_METRIC: Final = 0xFFFF0000

#: DNS record types a dns probe may ask for, by their wire value.
DNS_TYPES: Final = {"A": 1, "AAAA": 28}

#: ASCII digits only (`\d` takes "\u0661" too) and `\Z`, not `$`: `$` matches before a final
#: newline, so "wan0\n" passed as an interface and the nft table then failed to load.
DURATION_RE: Final = re.compile(r"^[ \t]*([0-9]+(?:\.[0-9]+)?)[ \t]*(ms|s|m|h)[ \t]*\Z")
DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: The longest duration any key takes: a 400-digit one parsed to infinity, which `check`
#: could not print and `run` could not hand to nft (sticky_timeout) or to a timer.
DURATION_MAX_S: Final = 7 * 86400.0
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}\Z")
#: Interface names as the agent accepts them: what nft takes unquoted-safe in a string.
IFNAME_RE: Final = re.compile(rf"^[A-Za-z0-9_.@-]{{1,{IFNAME_MAX}}}\Z")
IFNAME_EXPECTED: Final = f"an interface name (letters, digits, '_', '.', '@', '-'; at most {IFNAME_MAX})"
#: An HTTP status line's code (ASCII digits only: str.isdigit takes "²" too).
HTTP_STATUS_RE: Final = re.compile(rb"^HTTP/1\.[01] ([0-9]{3})[ \r\n]")
#: A group name, as [agent] control_group takes it.
GROUP_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,31}\Z")
#: An HTTP header name (RFC 9110 token).
HEADER_NAME_RE: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}\Z")
#: The events hooks and webhooks may subscribe to, as event_record names them.
HOOK_EVENTS: Final = (
    "uplink_up",
    "uplink_down",
    "uplink_degraded",
    "switch",
    "no_uplink",
    "failback_waiting",
    "balance",
    "policy",
    "drain",
    "undrain",
    "flows_released",
    "reload",
    "reload_rejected",
    "renumbered",
    "adopted",
    "route_change_failed",
    "route_change_recovered",
    "foreign_object",
    "foreign_object_gone",
    "health_unjudged",
    "health_judged",
    "prober_died",
    "suspect",
)
#: A port or a port range, as a policy takes them ("443", "10000-20000").
PORT_RE: Final = re.compile(r"^([0-9]{1,5})(?:-([0-9]{1,5}))?\Z")
#: Bounds on what a config may list, so that no list makes `check` or a reload slow (a
#: duplicate check over 330,000 targets ran for minutes) or `run` build a huge nft table.
CONFIG_MAX_CHARS: Final = 1 << 20
MAX_TARGETS: Final = 64
MAX_LIST: Final = 1024
MAX_POLICIES: Final = 256
MAX_HOOKS: Final = 64
#: The longest path the agent takes (PATH_MAX less room for the names it adds).
PATH_MAX: Final = 4000
#: AF_UNIX paths are at most 107 bytes (sun_path less its NUL): the control socket's must fit.
SUN_PATH_MAX: Final = 107


# Errors ######################################################################
#
# The errors that cross sections: a config that does not validate, a refused start.


class ConfigError(Exception):
    """A configuration problem, rendered as `file: key.path: message`."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        self.source = source
        self.key_path = key_path
        self.message = message
        where = f"{source}: {key_path}: " if key_path else f"{source}: "
        super().__init__(where + message)


class StartupRefused(Exception):
    """The agent will not touch the system (a collision, missing privilege)."""


# Config ######################################################################
#
# The TOML config as frozen dataclasses, and its validation: every error names
# the file, the key path and what was expected, before any side effect.


class Method(str, Enum):
    ICMP = "icmp"
    TCP = "tcp"
    HTTP = "http"
    HTTPS = "https"
    DNS = "dns"


@dataclass(frozen=True, slots=True)
class CheckConfig:
    #: Every method probes every target each round (see RoundResult.ok).
    methods: tuple[Method, ...] = (Method.ICMP,)
    targets: tuple[str, ...] = ()
    #: tcp: required; dns: default 53; http(s): default from `url`, else 80/443.
    port: int | None = None
    #: http(s): the URL whose host is sent as Host (and TLS server name); the
    #: connection goes to each target address, so no DNS lookup is needed.
    url: str | None = None
    #: http(s): acceptable status codes; empty means any 2xx.
    expect_status: tuple[int, ...] = ()
    tls_verify: bool = True
    #: dns: the name to ask each target (a resolver) about, and the record type.
    query_name: str | None = None
    query_type: str = "A"
    interval_s: float = 1.0
    #: The ceiling of a probe's wait: a reply later than this is lost (see adaptive_timeout).
    timeout_s: float = 1.0
    #: ICMP probes wait an RFC 6298 timeout (smoothed RTT + 4 x its variation), never
    #: less than timeout_min nor more than timeout; a reply between the two is late, not lost.
    adaptive_timeout: bool = True
    timeout_min_s: float = 0.2
    #: After a round that changes the verdict (a failure while answering, an answer while
    #: failing), confirm it with rounds this far apart instead of waiting intervals.
    burst: bool = True
    burst_spacing_s: float = 0.1
    #: Passive health: new forwarded connections of this uplink that get no reply within
    #: passive_timeout, to at least passive_destinations destinations, make it suspect.
    passive: bool = True
    passive_timeout_s: float = 0.3
    passive_destinations: int = 3
    fall: int = 3
    rise: int = 3
    reliability: int = 1
    #: Quality over the last `window` rounds; None disables a threshold.
    window: int = 20
    max_loss_pct: float | None = 20.0
    max_rtt_s: float | None = 0.5
    max_jitter_s: float | None = None
    #: Also ping the uplink's own gateway each round, to tell a local failure from an upstream one.
    gateway_check: bool = True

    @property
    def method_names(self) -> str:
        return "+".join(m.value for m in self.methods)

    def port_for(self, method: Method) -> int:
        if method is Method.DNS:
            return self.port or 53
        if method in (Method.HTTP, Method.HTTPS):
            explicit = urllib.parse.urlsplit(self.url or "").port
            return explicit or (443 if method is Method.HTTPS else 80)
        return self.port or 0


@dataclass(frozen=True, slots=True)
class UplinkConfig:
    name: str
    interface: str
    #: "auto" (follow the DHCP client's default route), "none" (point-to-point) or an IPv4 address.
    gateway: str
    priority: int
    table: int
    mark: int
    check: CheckConfig
    #: "auto" (follow the RA client's default route), "none" or an IPv6 address.
    gateway6: str = "auto"
    #: What to assume before the first rounds: "down" (prove it first) or "up".
    initial_state: str = "down"
    #: Masquerade what leaves through this uplink (the agent's NAT), except to these destinations.
    nat: bool = False
    nat_exclude: tuple[str, ...] = ()
    #: Share of new connections within its balance group (uplinks of one priority).
    weight: int = 1
    #: When its marked conntrack entries are deleted: a subset of RELEASE_EVENTS.
    release_flows: frozenset[str] = frozenset()
    #: IPv6 prefixes its ISP delegated, in use on the LAN: packets from them leave through
    #: this uplink while it is usable for IPv6 (its ISP drops them anywhere else, BCP38).
    lan_prefixes6: tuple[str, ...] = ()
    #: While it is not: "nat66" masquerades them to the uplink that carries IPv6 instead;
    #: "none" keeps them on this uplink (LAN hosts must move to another prefix's address).
    lan_prefix_failover: str = "none"
    #: The families this uplink carries: those its check has targets in (computed once:
    #: every decision asks, and parsing addresses each time cost a status 10 ms at 16 uplinks).
    families: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        versions = {ipaddress.ip_address(t).version for t in self.check.targets}
        object.__setattr__(self, "families", tuple(f for f in FAMILIES if f in versions))


@dataclass(frozen=True, slots=True)
class AgentConfig:
    state_dir: str = "/run/multiwan-agent"
    hysteresis_s: float = 30.0
    #: Flap damping (RFC 2439's idea): each failure of an uplink adds 1 to its figure of
    #: merit, which halves every flap_half_life; a recovered uplink owes the hysteresis plus
    #: flap_penalty (by default the hysteresis) per unit of merit past FLAP_FREE_MERIT, at
    #: most flap_max_hysteresis.
    flap_penalty_s: float | None = None
    flap_half_life_s: float = 300.0
    flap_max_hysteresis_s: float = 600.0
    default_table: int = 200
    rule_priority: int = 5000
    route_protocol: int = 240
    mark_mask: int = 0xFF00
    #: "connection": each new connection is placed by weight; "source": each LAN host.
    sticky: str = "connection"
    #: With sticky = "source": a host idle this long is placed afresh.
    sticky_timeout_s: float = 1800.0
    #: The group that may use the control socket (state_dir/control.sock, mode 0660).
    control_group: str = "root"
    #: Where the Prometheus metrics are served, (address, port); None: not served.
    metrics_listen: tuple[str, int] | None = None
    #: A node_exporter textfile (`*.prom`) the metrics are also written to; None: none.
    metrics_textfile: str | None = None
    #: A file for keepalived's track_file: the number of families no uplink carries (0: all
    #: well), and every family at stop; None: none.
    keepalived_track_file: str | None = None


@dataclass(frozen=True, slots=True)
class Hysteresis:
    """What a recovered uplink owes before traffic moves back to it: `base_s` with no failed
    round, plus the flap penalty (see owed_hysteresis_s), at most `max_s` in all."""

    base_s: float
    penalty_s: float = 0.0
    half_life_s: float = 300.0
    max_s: float = 0.0


def agent_hysteresis(agent: AgentConfig) -> Hysteresis:
    # Without a flap_penalty each unit of merit owes one more hysteresis: it scales with it.
    penalty_s = agent.hysteresis_s if agent.flap_penalty_s is None else agent.flap_penalty_s
    return Hysteresis(agent.hysteresis_s, penalty_s, agent.flap_half_life_s, agent.flap_max_hysteresis_s)


@dataclass(frozen=True, slots=True)
class HookConfig:
    """A program run, without a shell, on each of `events` (see HOOK_EVENTS)."""

    exec: tuple[str, ...]
    events: frozenset[str]
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """An HTTP(S) POST of each of `events`, as one JSON object, retried with back-off."""

    url: str
    events: frozenset[str]
    #: Extra headers (name, value): values may be secrets and are never logged or shown.
    headers: tuple[tuple[str, str], ...] = ()
    #: A file holding the token sent as `Authorization: Bearer ...` (read at start and reload).
    bearer_token_file: str | None = None
    timeout_s: float = 10.0
    tls_verify: bool = True

    @property
    def shown(self) -> str:
        """The URL as logs and `check` show it: without credentials, query or fragment."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


@dataclass(frozen=True, slots=True)
class PolicyMatch:
    """What a [[policy]] matches; empty fields match anything."""

    protocol: str | None = None
    src: tuple[str, ...] = ()
    dst: tuple[str, ...] = ()
    #: Ports and port ranges, as nft takes them ("5060", "10000-20000").
    src_port: tuple[str, ...] = ()
    dst_port: tuple[str, ...] = ()
    iif: tuple[str, ...] = ()

    def networks(self, key: str, family: int) -> tuple[str, ...]:
        nets: tuple[str, ...] = getattr(self, key)
        return tuple(n for n in nets if ipaddress.ip_network(n).version == family)

    #: The families this match can apply to (its addresses and protocol allow), computed once.
    families: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allowed = POLICY_PROTOCOLS.get(self.protocol or "", FAMILIES)
        families = tuple(
            f
            for f in allowed
            if (not self.src or self.networks("src", f)) and (not self.dst or self.networks("dst", f))
        )
        object.__setattr__(self, "families", families)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    name: str
    match: PolicyMatch
    #: In order of preference; only usable ones carry the traffic.
    uplinks: tuple[str, ...]
    #: "default": fall back to the normal selection; "drop": never leave through another uplink.
    fallback: str = "default"


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    agent: AgentConfig
    uplinks: tuple[UplinkConfig, ...]
    policies: tuple[PolicyConfig, ...] = ()
    hooks: tuple[HookConfig, ...] = ()
    webhooks: tuple[WebhookConfig, ...] = ()

    def uplink(self, name: str) -> UplinkConfig:
        for uplink in self.uplinks:
            if uplink.name == name:
                return uplink
        raise KeyError(name)

    #: The agent's tables, and the families some uplink carries (computed once).
    tables: frozenset[int] = dataclasses.field(init=False, repr=False, compare=False)
    families: tuple[int, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "tables", frozenset({self.agent.default_table} | {u.table for u in self.uplinks})
        )
        families = tuple(f for f in FAMILIES if any(f in u.families for u in self.uplinks))
        object.__setattr__(self, "families", families)


def parse_duration(value: object) -> float:
    """'250ms', '1s', '2m', '1.5s' -> seconds. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError
    match = DURATION_RE.match(value)
    if not match:
        raise ValueError
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1 or seconds != int(seconds):
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


class _Reader:
    """Typed access to one TOML table, collecting the dotted key path for errors."""

    def __init__(self, source: str, path: str, table: Mapping[str, Any]) -> None:
        self.source = source
        self.path = path
        self.table = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, expected: str, got: object) -> ConfigError:
        return ConfigError(self.source, self.key(name), f"expected {expected}, got {_show(got)}")

    def has(self, name: str) -> bool:
        return name in self.table

    def raw(self, name: str) -> Any:
        self.used.add(name)
        return self.table[name]

    def string(self, name: str, default: str | None = None) -> str:
        if name not in self.table:
            if default is None:
                raise ConfigError(self.source, self.key(name), "is required")
            return default
        value = self.raw(name)
        if not isinstance(value, str) or not value:
            raise self.error(name, "a non-empty string", value)
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int:
        if name not in self.table:
            if default is None:
                raise ConfigError(self.source, self.key(name), "is required")
            return default
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(name, f"an integer from {low} to {high}", value)
        return value

    def duration(
        self, name: str, default: float, minimum_s: float = 0.0, maximum_s: float = DURATION_MAX_S
    ) -> float:
        if name not in self.table:
            return default
        value = self.raw(name)
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise self.error(name, 'a duration such as "500ms" or "2s"', value) from None
        if not minimum_s <= seconds <= maximum_s:
            bounds = f"from {format_duration(minimum_s)} to {format_duration(maximum_s)}"
            raise self.error(name, f"a duration {bounds}", value)
        return seconds

    def choice(self, name: str, options: Sequence[str], default: str) -> str:
        value = self.string(name, default)
        if value not in options:
            raise self.error(name, " or ".join(f'"{o}"' for o in options), value)
        return value

    def boolean(self, name: str) -> bool:
        value = self.raw(name)
        if not isinstance(value, bool):
            raise self.error(name, "true or false", value)
        return value

    def optional_duration(self, name: str, default: float | None) -> float | None:
        """A duration, or "off" for a threshold that is not checked."""
        if name not in self.table:
            return default
        if self.table[name] == "off":
            self.used.add(name)
            return None
        return self.duration(name, 0.0, minimum_s=0.001)

    def sub(self, name: str) -> _Reader | None:
        if name not in self.table:
            return None
        value = self.raw(name)
        if not isinstance(value, dict):
            raise self.error(name, "a table", value)
        return _Reader(self.source, self.key(name), value)

    def finish(self) -> None:
        """Unknown keys are errors: a typo must not silently fall back to a default."""
        for name in self.table:
            if name not in self.used:
                # A key of control characters is shown quoted, on one line.
                shown = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
                raise ConfigError(self.source, self.key(shown), "unknown key")

    def array(self, name: str, expected: str, most: int = MAX_LIST) -> list[Any]:
        """A non-empty array of at most `most` items (each is checked by the caller)."""
        value = self.raw(name)
        if not isinstance(value, list) or not value:
            raise self.error(name, f"a non-empty array of {expected}", value)
        if len(value) > most:
            raise ConfigError(
                self.source, self.key(name), f"expected at most {most} {expected}, got {len(value)}"
            )
        return value


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _has_control(text: str) -> bool:
    """A C0 control character, DEL, or a Unicode line or paragraph separator."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F or c in "\u2028\u2029\x85" for c in text)


def _read_check(reader: _Reader | None, base: CheckConfig) -> CheckConfig:
    """Read a [check] table over `base`; the result is validated as a whole later."""
    if reader is None:
        return base
    values: dict[str, Any] = {}
    if reader.has("method"):
        raw = reader.raw("method")
        names = raw if isinstance(raw, list) else [raw]
        known = [m.value for m in Method]
        expected = 'one of "icmp", "tcp", "http", "https", "dns", or an array of them'
        # Types first: a set of unhashable items (["icmp", ["tcp"]]) raised TypeError.
        if (
            not names
            or not all(isinstance(n, str) and n in known for n in names)
            or len(set(names)) != len(names)
        ):
            raise reader.error("method", expected, raw)
        values["methods"] = tuple(Method(n) for n in names)
    if reader.has("targets"):
        targets = reader.array("targets", "IP addresses", MAX_TARGETS)
        parsed: list[str] = []
        seen_targets: set[str] = set()  # a set: a list made the duplicate check quadratic
        for index, target in enumerate(targets):
            try:
                address = ipaddress.ip_address(target) if isinstance(target, str) else None
            except ValueError:
                address = None
            if address is None:
                raise reader.error(f"targets[{index}]", "an IPv4 or IPv6 address", target)
            if address.is_link_local or address.is_multicast or address.is_unspecified:
                raise reader.error(f"targets[{index}]", "a unicast, non-link-local address", target)
            if str(address) in seen_targets:
                raise ConfigError(
                    reader.source, reader.key(f"targets[{index}]"), f"duplicate target {target}"
                )
            seen_targets.add(str(address))
            parsed.append(str(address))
        values["targets"] = tuple(parsed)
    if reader.has("port"):
        values["port"] = reader.integer("port", None, 1, 65535)
    if reader.has("url"):
        url = reader.string("url")
        parts = urllib.parse.urlsplit(url)
        try:
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
        except ValueError:
            valid = False
        # The URL's path goes into the request line: a control character or space would break it.
        if not valid or _has_control(url) or " " in url:
            raise reader.error(
                "url", 'an http:// or https:// URL such as "http://example.com/generate_204"', url
            )
        values["url"] = url
    if reader.has("expect_status"):
        raw = reader.raw("expect_status")
        codes = raw if isinstance(raw, list) else [raw]
        if (
            not codes
            or len(codes) > MAX_LIST
            or not all(isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes)
        ):
            raise reader.error("expect_status", "an HTTP status code (100-599) or an array of them", raw)
        values["expect_status"] = tuple(codes)
    if reader.has("tls_verify"):
        values["tls_verify"] = reader.boolean("tls_verify")
    if reader.has("query_name"):
        name = reader.string("query_name").rstrip(".")
        try:
            encoded = name.encode("idna")
        except UnicodeError:
            encoded = b""
        labels = encoded.split(b".")
        if (
            not encoded
            or len(encoded) > 253
            or any(not 0 < len(label) <= 63 for label in labels)
            or _has_control(name)
        ):
            raise reader.error("query_name", 'a DNS name such as "example.com"', name)
        values["query_name"] = name
    if reader.has("query_type"):
        query_type = reader.raw("query_type")
        # A string first: `["A"] in DNS_TYPES` raised TypeError (a list is unhashable).
        if not isinstance(query_type, str) or query_type not in DNS_TYPES:
            raise reader.error("query_type", '"A" or "AAAA"', query_type)
        values["query_type"] = query_type
    values["interval_s"] = reader.duration("interval", base.interval_s, minimum_s=0.05)
    values["timeout_s"] = reader.duration("timeout", base.timeout_s, minimum_s=0.01)
    if reader.has("adaptive_timeout"):
        values["adaptive_timeout"] = reader.boolean("adaptive_timeout")
    # A floor above the ceiling is no error: the ceiling wins (a [check] floor must not
    # refuse an uplink that sets a short timeout of its own).
    values["timeout_min_s"] = reader.duration("timeout_min", base.timeout_min_s, minimum_s=0.01)
    if reader.has("burst"):
        values["burst"] = reader.boolean("burst")
    values["burst_spacing_s"] = reader.duration("burst_spacing", base.burst_spacing_s, minimum_s=0.01)
    if reader.has("passive"):
        values["passive"] = reader.boolean("passive")
    values["passive_timeout_s"] = reader.duration("passive_timeout", base.passive_timeout_s, minimum_s=0.05)
    values["passive_destinations"] = reader.integer("passive_destinations", base.passive_destinations, 1, 100)
    values["fall"] = reader.integer("fall", base.fall, 1, 1000)
    values["rise"] = reader.integer("rise", base.rise, 1, 1000)
    values["reliability"] = reader.integer("reliability", base.reliability, 1, 64)
    values["window"] = reader.integer("window", base.window, 3, 1000)
    if reader.has("max_loss"):
        loss = reader.raw("max_loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not 0 <= loss <= 100:
            raise reader.error("max_loss", "a percentage from 0 to 100 (100 turns it off)", loss)
        values["max_loss_pct"] = None if loss >= 100 else float(loss)
    values["max_rtt_s"] = reader.optional_duration("max_rtt", base.max_rtt_s)
    values["max_jitter_s"] = reader.optional_duration("max_jitter", base.max_jitter_s)
    if reader.has("gateway_check"):
        values["gateway_check"] = reader.boolean("gateway_check")
    reader.finish()
    return dataclasses.replace(base, **values)


def _validate_check(source: str, path: str, check: CheckConfig) -> None:
    if not check.targets:
        raise ConfigError(source, f"{path}.targets", "is required (in [check] or here)")
    methods = set(check.methods)
    if Method.TCP in methods and check.port is None:
        raise ConfigError(source, f"{path}.port", 'is required when method includes "tcp"')
    if methods & {Method.HTTP, Method.HTTPS}:
        if Method.HTTP in methods and Method.HTTPS in methods:
            raise ConfigError(source, f"{path}.method", 'expected "http" or "https", not both')
        if check.url is None:
            raise ConfigError(source, f"{path}.url", 'is required when method includes "http" or "https"')
        scheme = "https" if Method.HTTPS in methods else "http"
        if urllib.parse.urlsplit(check.url).scheme != scheme:
            raise ConfigError(source, f"{path}.url", f'expected an {scheme}:// URL for method "{scheme}"')
    if Method.DNS in methods and check.query_name is None:
        raise ConfigError(source, f"{path}.query_name", 'is required when method includes "dns"')
    if check.reliability > len(check.targets):
        raise ConfigError(
            source,
            f"{path}.reliability",
            f"expected at most the number of targets ({len(check.targets)}), got {check.reliability}",
        )


def _read_gateway(reader: _Reader, key: str, default: str, family: int) -> str:
    gateway = reader.string(key, default)
    if gateway in ("auto", "none"):
        return gateway
    expected = f'"auto", "none" or an {FAMILY_TITLE[family]} address'
    try:
        address = ipaddress.ip_address(gateway)
    except ValueError:
        raise reader.error(key, expected, gateway) from None
    if address.version != family:
        raise reader.error(key, expected, gateway)
    return str(address)


def auto_table_id(first: int, taken: set[int]) -> int | None:
    """The table of an uplink without `table =`: the first id from `first` on (default_table + 1
    + its index, so configs that fit below 252 keep the tables they always had) that is neither
    reserved nor taken (the selection table, explicit tables, earlier auto ones); None past 2**31-1."""
    # Each id skipped is reserved or taken: one more than those is always enough.
    for table in range(first, min(2**31, first + len(RESERVED_TABLES) + len(taken) + 1)):
        if table not in RESERVED_TABLES and table not in taken:
            return table
    return None


def parse_config(text: str, source: str) -> Config:
    """Parse and validate a whole config. Raises ConfigError; has no side effect."""
    if len(text) > CONFIG_MAX_CHARS:
        raise ConfigError(source, "", f"expected at most {CONFIG_MAX_CHARS} characters, got {len(text)}")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib renders the position as "(at line 3, column 5)": keep it.
        raise ConfigError(source, "", f"invalid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid TOML: nested too deeply") from None
    except ValueError as err:  # an integer of thousands of digits
        raise ConfigError(source, "", f"invalid TOML: {err}") from None
    root = _Reader(source, "", document)

    agent_reader = root.sub("agent") or _Reader(source, "agent", {})
    defaults = AgentConfig()
    state_dir = agent_reader.string("state_dir", defaults.state_dir)
    if not state_dir.startswith("/"):
        raise agent_reader.error("state_dir", "an absolute path", state_dir)
    # `run` installed its routes, then died on the status write (a NUL) or would on the
    # control socket's bind (a path too long for sun_path): the config's fault, found here.
    if not _is_path(state_dir):
        raise agent_reader.error("state_dir", "an absolute path without control characters", state_dir)
    if len(os.fsencode(f"{state_dir}/{CONTROL_SOCKET}")) > SUN_PATH_MAX:
        raise agent_reader.error(
            "state_dir",
            f"a path short enough for {CONTROL_SOCKET} in it (at most {SUN_PATH_MAX} bytes in all)",
            state_dir,
        )
    hysteresis_s = agent_reader.duration("hysteresis", defaults.hysteresis_s)
    agent = AgentConfig(
        state_dir=state_dir,
        hysteresis_s=hysteresis_s,
        flap_penalty_s=agent_reader.duration("flap_penalty", 0.0)
        if agent_reader.has("flap_penalty")
        else None,
        flap_half_life_s=agent_reader.duration("flap_half_life", defaults.flap_half_life_s, minimum_s=1.0),
        # Never below the hysteresis: the bound is on the penalty, not on the hysteresis itself.
        flap_max_hysteresis_s=agent_reader.duration(
            "flap_max_hysteresis", max(defaults.flap_max_hysteresis_s, hysteresis_s), minimum_s=hysteresis_s
        ),
        default_table=agent_reader.integer("default_table", defaults.default_table, 1, 2**31 - 1),
        # The whole block below the kernel's main rule (32766).
        rule_priority=agent_reader.integer("rule_priority", defaults.rule_priority, 1, 32766 - RULE_BLOCK),
        route_protocol=agent_reader.integer(
            "route_protocol", defaults.route_protocol, FIRST_FREE_PROTOCOL, 255
        ),
        mark_mask=agent_reader.integer("mark_mask", defaults.mark_mask, 1, 0xFFFFFFFF),
        sticky=agent_reader.choice("sticky", STICKY_MODES, defaults.sticky),
        sticky_timeout_s=agent_reader.duration("sticky_timeout", defaults.sticky_timeout_s, minimum_s=1.0),
        control_group=_read_group(agent_reader),
        metrics_listen=_read_listen(agent_reader),
        metrics_textfile=_read_textfile(agent_reader),
        keepalived_track_file=_read_path(agent_reader, "keepalived_track_file"),
    )
    if agent_reader.has("sticky_timeout") and agent.sticky != "source":
        raise ConfigError(source, "agent.sticky_timeout", 'applies only with sticky = "source"')
    if agent.default_table in RESERVED_TABLES:
        raise agent_reader.error(
            "default_table", "a table id other than 0, 252, 253, 254, 255", agent.default_table
        )
    agent_reader.finish()

    base_check = _read_check(root.sub("check"), CheckConfig())

    raw_uplinks = root.raw("uplink") if root.has("uplink") else None
    if not isinstance(raw_uplinks, list) or not raw_uplinks:
        raise ConfigError(source, "uplink", "expected at least one [[uplink]] table")
    if len(raw_uplinks) > MAX_UPLINKS:
        raise ConfigError(
            source,
            "uplink",
            f"expected at most {MAX_UPLINKS} uplinks (the agent's rule block has a slot per uplink "
            f"for each kind of rule), got {len(raw_uplinks)}",
        )
    # Each uplink needs a mark of its own, not 0, inside the mask.
    mark_room = (1 << bin(agent.mark_mask).count("1")) - 1
    if len(raw_uplinks) > mark_room:
        raise ConfigError(
            source,
            "agent.mark_mask",
            f"expected room for a mark per uplink ({len(raw_uplinks)} uplinks), got "
            f"{agent.mark_mask:#x}, which has room for {mark_room}",
        )

    mark_shift = (agent.mark_mask & -agent.mark_mask).bit_length() - 1
    # Tables set explicitly are never auto-assigned to another uplink.
    taken_tables = {agent.default_table} | {
        raw["table"]
        for raw in raw_uplinks
        if isinstance(raw, dict) and isinstance(raw.get("table"), int) and not isinstance(raw["table"], bool)
    }
    uplinks: list[UplinkConfig] = []
    seen: dict[str, dict[object, int]] = {"name": {}, "interface": {}, "table": {}, "mark": {}}
    #: Every uplink's LAN prefixes so far, with the key path that named each.
    lan_prefixes: list[tuple[ipaddress.IPv6Network, str]] = []
    for index, raw in enumerate(raw_uplinks):
        path = f"uplink[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(source, path, f"expected a table, got {_show(raw)}")
        reader = _Reader(source, path, raw)
        name = reader.string("name")
        if not NAME_RE.match(name):
            raise reader.error("name", "letters, digits, '-' or '_' (at most 32)", name)
        interface = reader.string("interface")
        if not IFNAME_RE.match(interface):
            raise reader.error("interface", IFNAME_EXPECTED, interface)
        gateway = _read_gateway(reader, "gateway", "auto", 4)
        # A point-to-point uplink is point-to-point in both families unless told otherwise.
        gateway6 = _read_gateway(reader, "gateway6", "none" if gateway == "none" else "auto", 6)
        nat = reader.boolean("nat") if reader.has("nat") else False
        nat_exclude: list[str] = []
        if reader.has("nat_exclude"):
            raw_exclude = reader.raw("nat_exclude")
            if not isinstance(raw_exclude, list) or len(raw_exclude) > MAX_LIST:
                raise reader.error(
                    "nat_exclude",
                    f'an array of at most {MAX_LIST} networks such as "10.0.0.0/8"',
                    raw_exclude,
                )
            for i, network in enumerate(raw_exclude):
                try:
                    nat_exclude.append(_network(network))
                except (TypeError, ValueError):
                    raise reader.error(
                        f"nat_exclude[{i}]", 'a network such as "10.0.0.0/8"', network
                    ) from None
        initial_state = reader.choice("initial_state", ("up", "down"), "down")
        weight = reader.integer("weight", 1, 1, 1000)
        release_flows = _read_release_flows(reader)
        lan_prefixes6 = _read_lan_prefixes(reader, lan_prefixes)
        lan_prefix_failover = reader.choice("lan_prefix_failover", LAN_PREFIX_FAILOVER, "none")
        if reader.has("lan_prefix_failover") and not lan_prefixes6:
            raise ConfigError(source, f"{path}.lan_prefix_failover", "applies only with lan_prefixes6")
        priority = reader.integer("priority", 1, 0, 1_000_000)
        if reader.has("table"):
            table = reader.integer("table", None, 1, 2**31 - 1)
            if table in RESERVED_TABLES or table == agent.default_table:
                raise reader.error(
                    "table", f"a table id other than the reserved ones and {agent.default_table}", table
                )
        else:
            auto_table = auto_table_id(agent.default_table + 1 + index, taken_tables)
            if auto_table is None:
                raise ConfigError(
                    source, f"{path}.table", f"is required: no free table id above {agent.default_table}"
                )
            table = auto_table
            taken_tables.add(table)
        default_mark = (index + 1) << mark_shift
        if not reader.has("mark") and default_mark & ~agent.mark_mask:
            raise ConfigError(
                source,
                f"{path}.mark",
                f"is required: the default mark {default_mark:#x} does not fit agent.mark_mask "
                f"{agent.mark_mask:#x}",
            )
        mark = reader.integer("mark", default_mark, 1, 0xFFFFFFFF)
        if mark & ~agent.mark_mask:
            raise reader.error("mark", f"a mark inside mark_mask {agent.mark_mask:#x}", mark)
        check_reader = reader.sub("check")
        check = _read_check(check_reader, base_check)
        reader.finish()
        _validate_check(source, f"{path}.check", check)
        if lan_prefixes6 and not any(family_of(t) == 6 for t in check.targets):
            raise ConfigError(
                source,
                f"{path}.lan_prefixes6",
                "needs IPv6 targets in the uplink's check (its IPv6 health decides where they leave)",
            )
        for key, value in (("name", name), ("interface", interface), ("table", table), ("mark", mark)):
            if value in seen[key]:
                other = seen[key][value]
                raise ConfigError(
                    source, f"{path}.{key}", f"{_show(value)} is already used by uplink[{other}]"
                )
            seen[key][value] = index
        uplinks.append(
            UplinkConfig(
                name=name,
                interface=interface,
                gateway=gateway,
                priority=priority,
                table=table,
                mark=mark,
                check=check,
                gateway6=gateway6,
                initial_state=initial_state,
                nat=nat,
                nat_exclude=tuple(nat_exclude),
                weight=weight,
                release_flows=release_flows,
                lan_prefixes6=lan_prefixes6,
                lan_prefix_failover=lan_prefix_failover,
            )
        )
    policies = _read_policies(root, uplinks)
    hooks = _read_hooks(root)
    webhooks = _read_webhooks(root)
    root.finish()
    return Config(
        source=source, agent=agent, uplinks=tuple(uplinks), policies=policies, hooks=hooks, webhooks=webhooks
    )


def _network(value: object) -> str:
    """A network written as a string: ip_network takes 5 as 0.0.0.5/32, and shows (repr)
    a value it refuses, which for a list nested 1,000 deep raised RecursionError."""
    if not isinstance(value, str):
        raise TypeError
    return str(ipaddress.ip_network(value, strict=False))


def _is_path(path: str) -> bool:
    """An absolute path the kernel takes: no NUL (Python raises on it), no control character
    (a log line or status field would break), not past PATH_MAX."""
    return path.startswith("/") and not _has_control(path) and len(os.fsencode(path)) <= PATH_MAX


def _read_group(reader: _Reader) -> str:
    group = reader.string("control_group", "root")
    if not GROUP_RE.match(group):
        raise reader.error("control_group", "a group name (letters, digits, '_', '-')", group)
    return group


def _read_listen(reader: _Reader) -> tuple[str, int] | None:
    """`metrics_listen = "127.0.0.1:9367"` or "[::1]:9367"; loopback unless metrics_allow_remote."""
    allow_remote = reader.boolean("metrics_allow_remote") if reader.has("metrics_allow_remote") else False
    if not reader.has("metrics_listen"):
        if allow_remote:
            raise ConfigError(
                reader.source, reader.key("metrics_allow_remote"), "applies only with metrics_listen"
            )
        return None
    text = reader.string("metrics_listen")
    expected = 'an address and port such as "127.0.0.1:9367" or "[::1]:9367"'
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if port.isdigit() else 0
    except ValueError:
        raise reader.error("metrics_listen", expected, text) from None
    if not 1 <= number <= 65535 or (address.version == 6 and not text.startswith("[")):
        raise reader.error("metrics_listen", expected, text)
    if not address.is_loopback and not allow_remote:
        raise reader.error(
            "metrics_listen", "a loopback address (or set metrics_allow_remote = true to serve others)", text
        )
    return str(address), number


def _read_path(reader: _Reader, key: str) -> str | None:
    if not reader.has(key):
        return None
    path = reader.string(key)
    if not _is_path(path) or path.endswith("/"):
        raise reader.error(key, "an absolute file path", path)
    return path


def _read_textfile(reader: _Reader) -> str | None:
    if not reader.has("metrics_textfile"):
        return None
    path = reader.string("metrics_textfile")
    if not _is_path(path) or not path.endswith(".prom"):
        raise reader.error("metrics_textfile", 'an absolute path ending in ".prom"', path)
    return path


def _read_events(reader: _Reader) -> frozenset[str]:
    """`events = ["uplink_down", ...]`: names from HOOK_EVENTS; all of them when left out."""
    if not reader.has("events"):
        return frozenset(HOOK_EVENTS)
    expected = "event names (" + ", ".join(HOOK_EVENTS) + ")"
    names: set[str] = set()
    for where, item in _one_or_many(reader, "events", expected):
        if item not in HOOK_EVENTS:
            raise reader.error(where, expected, item)
        names.add(item)
    return frozenset(names)


def _tables(root: _Reader, key: str) -> list[_Reader]:
    if not root.has(key):
        return []
    raw = root.raw(key)
    if not isinstance(raw, list):
        raise root.error(key, f"an array of [[{key}]] tables", raw)
    if len(raw) > MAX_HOOKS:
        raise ConfigError(root.source, key, f"expected at most {MAX_HOOKS} [[{key}]] tables, got {len(raw)}")
    readers = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(root.source, f"{key}[{index}]", f"expected a table, got {_show(item)}")
        readers.append(_Reader(root.source, f"{key}[{index}]", item))
    return readers


def _read_hooks(root: _Reader) -> tuple[HookConfig, ...]:
    hooks: list[HookConfig] = []
    for reader in _tables(root, "hook"):
        if not reader.has("exec"):
            raise ConfigError(reader.source, reader.key("exec"), "is required")
        argv = reader.raw("exec")
        expected = (
            'an array: an absolute program path, then its arguments, e.g. ["/usr/local/bin/notify", "-x"]'
        )
        if (
            not isinstance(argv, list)
            or not argv
            or len(argv) > MAX_LIST
            or not all(isinstance(a, str) and a and "\0" not in a for a in argv)
            or not _is_path(argv[0])
        ):
            raise reader.error("exec", expected, argv)
        events = _read_events(reader)
        timeout_s = reader.duration("timeout", 10.0, minimum_s=0.1)
        reader.finish()
        hooks.append(HookConfig(tuple(argv), events, timeout_s))
    return tuple(hooks)


def _read_webhooks(root: _Reader) -> tuple[WebhookConfig, ...]:
    webhooks: list[WebhookConfig] = []
    for reader in _tables(root, "webhook"):
        url = reader.string("url")
        parts = urllib.parse.urlsplit(url)
        try:
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
        except ValueError:
            valid = False
        if not valid or any(c in url for c in "\r\n\0 "):
            # The URL is not shown: it may hold a secret (a token in its query).
            raise ConfigError(
                reader.source,
                reader.key("url"),
                'expected an http:// or https:// URL such as "https://hooks.example/multiwan"',
            )
        if "@" in parts.netloc:
            raise ConfigError(
                reader.source,
                reader.key("url"),
                "expected no user:password@ in the URL (it would not be sent); "
                "use bearer_token_file or headers",
            )
        headers: list[tuple[str, str]] = []
        table = reader.sub("headers")
        if table is not None:
            if len(table.table) > MAX_HOOKS:
                raise ConfigError(
                    reader.source, table.path, f"expected at most {MAX_HOOKS} headers, got {len(table.table)}"
                )
            for name in list(table.table):
                value = table.raw(name)
                if not HEADER_NAME_RE.match(name) or name.lower() in (
                    "host",
                    "content-length",
                    "content-type",
                ):
                    raise ConfigError(
                        reader.source,
                        table.key(name),
                        "expected a header name other than Host, Content-Length and Content-Type",
                    )
                if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
                    # The value is not shown: it may be a secret.
                    raise ConfigError(reader.source, table.key(name), "expected a string on one line")
                headers.append((name, value))
        token_file = None
        if reader.has("bearer_token_file"):
            token_file = reader.string("bearer_token_file")
            if not _is_path(token_file):
                raise reader.error("bearer_token_file", "an absolute path", token_file)
        events = _read_events(reader)
        timeout_s = reader.duration("timeout", 10.0, minimum_s=0.1)
        tls_verify = reader.boolean("tls_verify") if reader.has("tls_verify") else True
        reader.finish()
        webhooks.append(WebhookConfig(url, events, tuple(headers), token_file, timeout_s, tls_verify))
    return tuple(webhooks)


def _one_or_many(reader: _Reader, key: str, expected: str) -> list[tuple[str, Any]]:
    """A value or a non-empty array of values, each with its key path (`dst_port[1]`)."""
    if not reader.has(key):
        return []
    value = reader.raw(key)
    if not isinstance(value, list):
        return [(key, value)]
    if not value or len(value) > MAX_LIST:
        raise reader.error(key, f"{expected}, or a non-empty array of at most {MAX_LIST} of them", value)
    return [(f"{key}[{i}]", item) for i, item in enumerate(value)]


def _read_lan_prefixes(reader: _Reader, taken: list[tuple[ipaddress.IPv6Network, str]]) -> tuple[str, ...]:
    """`lan_prefixes6 = ["2001:db8:10::/56", ...]`: IPv6 networks without host bits, none
    overlapping another's (`taken`, which this extends)."""
    if not reader.has("lan_prefixes6"):
        return ()
    expected = 'an IPv6 network such as "2001:db8:10::/56"'
    if reader.table["lan_prefixes6"] == "auto":
        # A DHCPv6-PD client's prefix shows (an `unreachable` route on lo) without the uplink
        # it came from; guessing that would route a LAN the wrong way.
        raise ConfigError(
            reader.source,
            reader.key("lan_prefixes6"),
            '"auto" is not supported: list the prefixes delegated by this uplink\'s ISP',
        )
    prefixes: list[str] = []
    for index, item in enumerate(reader.array("lan_prefixes6", "IPv6 networks")):
        where = f"lan_prefixes6[{index}]"
        try:
            network = ipaddress.ip_network(item) if isinstance(item, str) else None
        except ValueError:
            network = None
        if not isinstance(network, ipaddress.IPv6Network) or network.prefixlen == 0:
            raise reader.error(where, expected, item)
        for other, named in taken:
            if network.overlaps(other):
                raise ConfigError(reader.source, reader.key(where), f"{network} overlaps {named} ({other})")
        taken.append((network, reader.key(where)))
        prefixes.append(str(network))
    return tuple(prefixes)


def _read_release_flows(reader: _Reader) -> frozenset[str]:
    """`release_flows = "on_down"` or an array of RELEASE_EVENTS."""
    expected = " or ".join(f'"{e}"' for e in RELEASE_EVENTS)
    events: set[str] = set()
    for where, item in _one_or_many(reader, "release_flows", expected):
        if item not in RELEASE_EVENTS:
            raise reader.error(where, expected, item)
        events.add(item)
    return frozenset(events)


def _read_policies(root: _Reader, uplinks: Sequence[UplinkConfig]) -> tuple[PolicyConfig, ...]:
    if not root.has("policy"):
        return ()
    raw_policies = root.raw("policy")
    if not isinstance(raw_policies, list):
        raise root.error("policy", "an array of [[policy]] tables", raw_policies)
    if len(raw_policies) > MAX_POLICIES:
        raise ConfigError(
            root.source,
            "policy",
            f"expected at most {MAX_POLICIES} [[policy]] tables, got {len(raw_policies)}",
        )
    by_name = {u.name: u for u in uplinks}
    policies: list[PolicyConfig] = []
    names: dict[str, int] = {}
    for index, raw in enumerate(raw_policies):
        path = f"policy[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(root.source, path, f"expected a table, got {_show(raw)}")
        reader = _Reader(root.source, path, raw)
        name = reader.string("name")
        if not NAME_RE.match(name):
            raise reader.error("name", "letters, digits, '-' or '_' (at most 32)", name)
        if name in names:
            raise ConfigError(
                root.source, f"{path}.name", f"{_show(name)} is already used by policy[{names[name]}]"
            )
        names[name] = index
        match_reader = reader.sub("match")
        if match_reader is None:
            raise ConfigError(root.source, f"{path}.match", "is required")
        match = _read_match(match_reader, uplinks)
        if not reader.has("uplinks"):
            raise ConfigError(root.source, f"{path}.uplinks", "is required")
        known = ", ".join(f'"{n}"' for n in by_name)
        chosen: list[str] = []
        for where, item in _one_or_many(reader, "uplinks", "uplink names"):
            if not isinstance(item, str) or item not in by_name:
                raise reader.error(where, f"the name of an [[uplink]] ({known})", item)
            if item in chosen:
                raise ConfigError(root.source, reader.key(where), f"{_show(item)} is listed twice")
            chosen.append(item)
        if not match.families:
            raise ConfigError(
                root.source,
                f"{path}.match",
                "can never match: its addresses and protocol share no address family",
            )
        fallback = reader.choice("fallback", POLICY_FALLBACKS, "default")
        for family in match.families:
            if not any(family in by_name[u].families for u in chosen) and (
                fallback == "drop" or len(match.families) == 1
            ):
                # With "drop" this family's matching traffic would be dropped for good.
                raise ConfigError(
                    root.source,
                    f"{path}.uplinks",
                    f"none of these uplinks is checked for {FAMILY_TITLE[family]}, which this policy "
                    f"matches; narrow match.src/dst or add {FAMILY_TITLE[family]} targets",
                )
        reader.finish()
        policies.append(PolicyConfig(name, match, tuple(chosen), fallback))
    return tuple(policies)


def _read_match(reader: _Reader, uplinks: Sequence[UplinkConfig]) -> PolicyMatch:
    if not reader.table:
        raise ConfigError(
            reader.source, reader.path, "expected at least one of protocol, src, dst, src_port, dst_port, iif"
        )
    protocol = reader.choice("protocol", tuple(POLICY_PROTOCOLS), "tcp") if reader.has("protocol") else None
    networks: dict[str, tuple[str, ...]] = {}
    for key in ("src", "dst"):
        expected = 'a network such as "192.0.2.0/24" or "2001:db8::/32"'
        parsed: list[str] = []
        for where, item in _one_or_many(reader, key, expected):
            try:
                parsed.append(_network(item))
            except (TypeError, ValueError):
                raise reader.error(where, expected, item) from None
        networks[key] = tuple(parsed)
    ports: dict[str, tuple[str, ...]] = {}
    for key in ("src_port", "dst_port"):
        ports[key] = _read_ports(reader, key)
        if ports[key] and protocol not in ("tcp", "udp"):
            raise ConfigError(reader.source, reader.key(key), 'needs protocol = "tcp" or "udp"')
    uplink_interfaces = {u.interface for u in uplinks}
    iif: list[str] = []
    for where, item in _one_or_many(reader, "iif", IFNAME_EXPECTED):
        if not isinstance(item, str) or not IFNAME_RE.match(item):
            raise reader.error(where, IFNAME_EXPECTED, item)
        if item in uplink_interfaces:
            # Only connections from the LAN are placed; what comes in on an uplink stays on it.
            raise reader.error(where, "a LAN interface (not an uplink's)", item)
        iif.append(item)
    reader.finish()
    return PolicyMatch(
        protocol, networks["src"], networks["dst"], ports["src_port"], ports["dst_port"], tuple(iif)
    )


def _read_ports(reader: _Reader, key: str) -> tuple[str, ...]:
    """Ports: 5060, "5060", "10000-20000", or an array of them."""
    expected = 'a port (1-65535) or a range such as "10000-20000"'
    result: list[str] = []
    for where, item in _one_or_many(reader, key, expected):
        text = str(item) if isinstance(item, (int, str)) and not isinstance(item, bool) else ""
        found = PORT_RE.match(text)
        low = int(found[1]) if found else 0
        high = int(found[2] or low) if found else 0
        if not found or not 1 <= low <= high <= 65535 or (found[2] and low == high):
            raise reader.error(where, expected, item)
        result.append(f"{low}-{high}" if found[2] else str(low))
    return tuple(result)


def load_config(path: str) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(path, "", f"cannot read: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "cannot read: not UTF-8 text") from None
    return parse_config(text, path)


# Core: health state machine ##################################################
#
# Owns one uplink's health: fall/rise over probe rounds, the quality window,
# link events. Pure, like every Core section: data and a clock in, decisions out.


class State(str, Enum):
    #: Probes answer and the path's quality is within the thresholds.
    UP = "up"
    #: Probes answer, but loss, latency or jitter is past a threshold: usable
    #: as a last resort, losing to any uplink that is up.
    DEGRADED = "degraded"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    target: str
    ok: bool
    rtt_ms: float | None = None
    #: "ok", "timeout", "unreachable (from 203.0.113.1)", "refused", "status 302", ...
    reason: str = "ok"
    method: Method = Method.ICMP
    #: The probe could not be judged (the agent's own code raised): it neither
    #: passes nor fails, so a bug in the agent never looks like an outage.
    inconclusive: bool = False


@dataclass(frozen=True, slots=True)
class RoundResult:
    uplink: str
    seq: int
    started_at: float
    probes: tuple[ProbeResult, ...]
    required: int = 1
    #: The uplink's gateway, if it was pinged this round, and whether it answered.
    gateway: str | None = None
    gateway_ok: bool | None = None
    #: Why this round was sent early (a confirmation burst's trigger), or None for a round
    #: of the regular interval.
    burst_trigger: str | None = None
    #: The burst the prober runs after this round ("fall after passive suspicion"), if any.
    burst_state: str | None = None
    #: Per probed target, the timeout its probe waited (ms): the adaptive one or the ceiling.
    timeouts_ms: tuple[tuple[str, float], ...] = ()
    #: The probes that can be judged (the others are the agent's own errors), and whether
    #: the round is good: computed once, as every round is asked several times.
    judged: tuple[ProbeResult, ...] = dataclasses.field(init=False, repr=False, compare=False)
    ok: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        judged = tuple(p for p in self.probes if not p.inconclusive)
        object.__setattr__(self, "judged", judged)
        object.__setattr__(self, "ok", self._all_answered(judged))

    @property
    def errors(self) -> int:
        return len(self.probes) - len(self.judged)

    @property
    def inconclusive(self) -> bool:
        """Nothing in this round can be judged: it counts neither way."""
        return not self.judged

    @property
    def answered(self) -> int:
        return sum(1 for probe in self.judged if probe.ok)

    def _all_answered(self, judged: tuple[ProbeResult, ...]) -> bool:
        """Every method, in every address family, got `required` answers (all, with fewer targets).

        An uplink is one path: if its IPv4 is black-holed while IPv6 answers,
        it is not healthy for the traffic that selects it.
        """
        groups: dict[tuple[Method, int], list[ProbeResult]] = {}
        for probe in judged:
            key = (probe.method, family_of(probe.target))
            groups.setdefault(key, []).append(probe)
        for results in groups.values():
            if sum(1 for p in results if p.ok) < min(self.required, len(results)):
                return False
        return bool(groups)

    @property
    def rtt_ms(self) -> float | None:
        rtts = [p.rtt_ms for p in self.judged if p.ok and p.rtt_ms is not None]
        return _median(rtts) if rtts else None

    @property
    def reason(self) -> str:
        """The failure reasons, most common first, e.g. 'timeout' or 'timeout, refused'."""
        several_methods = len({p.method for p in self.probes}) > 1
        reasons: dict[str, int] = {}
        for probe in self.judged:
            if not probe.ok:
                text = f"{probe.method.value} {probe.reason}" if several_methods else probe.reason
                reasons[text] = reasons.get(text, 0) + 1
        return ", ".join(sorted(reasons, key=lambda r: -reasons[r])) or "ok"

    @property
    def where(self) -> str:
        """Where a failed round failed: at the uplink's own gateway, or beyond it."""
        if self.gateway_ok is False:
            return f"gateway {self.gateway} unreachable"
        if self.gateway_ok is True:
            return "upstream unreachable"
        return "unreachable"


def family_of(address: str) -> int:
    """4 or 6 for an address the config validated (the probe path asks per probe, and parsing
    it with ipaddress each time was a measurable share of a probe's cost)."""
    return 6 if ":" in address else 4


@dataclass(frozen=True, slots=True)
class LinkObservation:
    """What netlink says about an uplink's interface right now."""

    #: True when the interface exists, is up, has carrier, an address and
    #: (unless point-to-point) a gateway in a family the uplink carries: ready.
    usable: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RoundSample:
    """One round, as the quality window keeps it."""

    sent: int
    answered: int
    rtts_ms: tuple[float, ...]
    #: The round's sequence number (a late reply finds its round by it), and its replies
    #: that came after the adaptive timeout but before the ceiling: late, not lost.
    seq: int = -1
    late: int = 0
    #: The median of rtts_ms (None without answers), computed once: the window is judged
    #: every round over every sample.
    median_ms: float | None = dataclasses.field(default=None, compare=False)
    #: The slowest of rtts_ms: a window whose samples all stay below max_rtt has its median
    #: below it too, which spares measuring the whole window on every round.
    slowest_ms: float | None = dataclasses.field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.rtts_ms:
            if self.median_ms is None:
                object.__setattr__(self, "median_ms", _median(self.rtts_ms))
            object.__setattr__(self, "slowest_ms", max(self.rtts_ms))


@dataclass(frozen=True, slots=True)
class Quality:
    """Loss, latency and jitter over the window (dpinger's measures)."""

    rounds: int
    loss_pct: float
    rtt_ms: float | None
    #: Median change of the RTT from one round to the next (RFC 3550's idea,
    #: made robust): a single slow reply moves it no more than the median RTT.
    jitter_ms: float | None


def _median(values: Sequence[float]) -> float:
    """statistics.median, without its overhead (it showed in profiles at 64 uplinks)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measure_quality(samples: Sequence[RoundSample]) -> Quality | None:
    sent = sum(s.sent for s in samples)
    if not sent:
        return None
    rtts = [r for s in samples for r in s.rtts_ms]
    per_round = [s.median_ms for s in samples if s.median_ms is not None]
    steps = [abs(b - a) for a, b in zip(per_round, per_round[1:], strict=False)]
    return Quality(
        rounds=len(samples),
        loss_pct=100.0 * (sent - sum(s.answered for s in samples)) / sent,
        rtt_ms=_median(rtts) if rtts else None,
        jitter_ms=_median(steps) if steps else None,
    )


def _may_be_past(samples: Sequence[RoundSample], check: CheckConfig) -> bool:
    """Whether the window may be past a threshold: most windows of most rounds are well
    within them, and proving that is cheaper than measuring them (every round, every uplink)."""
    if check.max_jitter_s is not None:
        return True
    # List comprehensions, not generators: this runs on every round of every uplink.
    if check.max_rtt_s is not None:
        if max([s.slowest_ms or 0.0 for s in samples], default=0.0) > check.max_rtt_s * 1000:
            return True
    if check.max_loss_pct is not None:
        lost = sum([s.sent - s.answered for s in samples])
        if lost and 100.0 * lost / sum([s.sent for s in samples]) > check.max_loss_pct:
            return True
    return False


def quality_problem(samples: Sequence[RoundSample], check: CheckConfig) -> tuple[bool, str | None]:
    """(judged, problem): nothing is judged before the window is full."""
    if len(samples) < check.window:
        return False, None
    if not _may_be_past(samples, check):
        return True, None
    quality = measure_quality(samples)
    if quality is None:
        return False, None
    rounds = f"over the last {quality.rounds} rounds"
    if check.max_loss_pct is not None and quality.loss_pct > check.max_loss_pct:
        return True, f"loss {quality.loss_pct:.0f}% > {check.max_loss_pct:g}% {rounds}"
    if check.max_rtt_s is not None and quality.rtt_ms is not None and quality.rtt_ms > check.max_rtt_s * 1000:
        return True, f"median rtt {quality.rtt_ms:.1f}ms > {format_duration(check.max_rtt_s)} {rounds}"
    if (
        check.max_jitter_s is not None
        and quality.jitter_ms is not None
        and quality.jitter_ms > check.max_jitter_s * 1000
    ):
        return True, f"jitter {quality.jitter_ms:.1f}ms > {format_duration(check.max_jitter_s)} {rounds}"
    return True, None


@dataclass(frozen=True, slots=True)
class Health:
    name: str
    state: State = State.DOWN
    #: Monotonic time of the last state change.
    since: float = 0.0
    good_rounds: int = 0
    bad_rounds: int = 0
    #: Consecutive judged rounds with the window's quality within / past the thresholds.
    good_quality: int = 0
    bad_quality: int = 0
    #: False while netlink says the interface cannot carry traffic (not ready).
    link_usable: bool = True
    #: Came up from a failure (down or degraded): the selection makes it prove
    #: itself for `hysteresis` before traffic moves back to it.
    recovered: bool = False
    #: When a failed round inside that proof restarted it (None: it runs from `since`).
    proving_since: float | None = None
    #: When it left `up` (went down or degraded), oldest first, the newest FLAP_MEMORY: the
    #: flap penalty is computed from them (see owed_hysteresis_s).
    failures: tuple[float, ...] = ()
    #: Has this uplink failed since the agent started? (initial_state "down" is an assumption, not a failure.)
    has_failed: bool = False
    reason: str = "not yet confirmed"
    #: "gateway" or "upstream": where the last failed round failed, when known.
    failure: str | None = None
    rtt_ms: float | None = None
    #: The quality window, oldest first; emptied when the uplink goes down.
    samples: tuple[RoundSample, ...] = ()
    #: Start time of the newest round observed: an older round that completes
    #: later (its timeout ran out after a newer round's reply) is stale.
    last_round_at: float = float("-inf")
    #: When the current run of failed rounds began (the first bad evidence), or the link was
    #: lost; None while it answers. A failover's detection time is measured from here.
    failing_since: float | None = None
    #: The sequence number of that run's first failed round (a late reply to it, or to a
    #: later one, proves the path slow, not dead).
    failing_seq: int | None = None
    #: What the prober reported with its newest round: per target the timeout its probes
    #: wait (ms), and the confirmation burst it runs, if any.
    timeouts_ms: tuple[tuple[str, float], ...] = ()
    burst: str | None = None
    #: Passive health: the newest suspicion's evidence and when it was raised.
    suspicion: str | None = None
    suspected_at: float | None = None
    #: The family this health judges when the uplink carries several (each has a health of
    #: its own, see AgentState.family_healths); None when it carries one: then it is the
    #: uplink's health, as it always was.
    family: int | None = None

    @property
    def quality(self) -> Quality | None:
        return measure_quality(self.samples)

    @property
    def loss_pct(self) -> float | None:
        quality = self.quality
        return None if quality is None else quality.loss_pct


@dataclass(frozen=True, slots=True)
class Transition:
    uplink: str
    old: State
    new: State
    reason: str
    at: float
    #: The family that changed, for an uplink that carries several (None: it carries one).
    family: int | None = None


def initial_health(uplink: UplinkConfig, now: float, family: int | None = None) -> Health:
    """What to assume before the first rounds (mwan3's initial_state); `family` names the
    family judged, for an uplink that carries several."""
    if uplink.initial_state == "up":
        return Health(
            uplink.name, State.UP, since=now, reason="assumed up (initial_state = up)", family=family
        )
    return Health(uplink.name, State.DOWN, since=now, reason="not yet confirmed", family=family)


def health_families(uplink: UplinkConfig) -> tuple[int, ...]:
    """The families an uplink has a health for: those its targets are in (IPv4 for none)."""
    return uplink.families or (4,)


def split_round(result: RoundResult, families: Sequence[int]) -> dict[int, RoundResult]:
    """One round of an uplink, as one round per family it carries: each family's health is
    judged on that family's targets only, so a black-holed IPv6 leaves IPv4 alone.

    The prober pings the gateways of all families in one go and reports whether any
    answered: a family keeps that answer only if one of the gateways is its own.
    """
    if len(families) < 2:
        return {families[0] if families else 4: result}
    gateways = [g.strip() for g in result.gateway.split(",")] if result.gateway else []
    split: dict[int, RoundResult] = {}
    for family in families:
        own = [g for g in gateways if family_of(g) == family]
        split[family] = RoundResult(
            result.uplink,
            result.seq,
            result.started_at,
            tuple(p for p in result.probes if family_of(p.target) == family),
            result.required,
            gateway=", ".join(own) or None,
            gateway_ok=result.gateway_ok if own else None,
            burst_trigger=result.burst_trigger,
            burst_state=result.burst_state,
            timeouts_ms=tuple(t for t in result.timeouts_ms if family_of(t[0]) == family),
        )
    return split


#: How an uplink's top-level state ranks its families' states: the best one speaks.
_STATE_RANK: Final = {State.UP: 0, State.DEGRADED: 1, State.DOWN: 2}


def uplink_health(healths: Sequence[Health]) -> Health:
    """An uplink's health as a whole, from its families' healths (in family order): the best
    one's (up, then degraded; IPv4 first on a tie). An uplink is up while it carries some
    family; status and metrics show each family's own (see AgentState.family_healths)."""
    if len(healths) == 1:
        return healths[0]
    return min(healths, key=lambda h: (_STATE_RANK[h.state], not h.link_usable))


def observe_round(
    health: Health, result: RoundResult, check: CheckConfig, now: float, hysteresis: Hysteresis | None = None
) -> tuple[Health, list[Transition]]:
    """Fold one probe round into an uplink's health.

    Reachability: `fall` consecutive failed rounds make it down, `rise` good
    rounds up. Quality: once the window is full, `fall` consecutive rounds
    with the window past a threshold make an up uplink degraded, `rise`
    rounds within them make it up again. Transitions only, never per round.
    With `hysteresis`, a failed round of a recovered uplink still proving itself
    restarts its proof: a path that drops a round every few seconds never finishes it.
    """
    if not health.link_usable or result.inconclusive:
        # A round that was in flight when the link went away says nothing new;
        # nor does one the agent could not judge (its own error, logged where it happened).
        return health, []
    counted = result.judged
    sample = RoundSample(
        len(counted),
        result.answered,
        tuple(p.rtt_ms for p in counted if p.ok and p.rtt_ms is not None),
        seq=result.seq,
    )
    # While down, the window only keeps the run of good rounds that may bring
    # it back: the failure that took it down says nothing about it once up.
    earlier = health.samples if health.state is not State.DOWN or result.ok else ()
    samples = (earlier + (sample,))[-check.window :]
    # With timeout >= interval rounds overlap, and a round that lost a probe
    # completes (at its timeout) after the next one answered. Such a stale
    # round must not reset the newer reachability evidence, but its losses
    # count in the window, and the window is judged on every round: judging
    # only fresh rounds would let loss itself slow its own detection.
    stale = result.started_at <= health.last_round_at
    if stale:
        good, bad, rtt, last_round_at = (
            health.good_rounds,
            health.bad_rounds,
            health.rtt_ms,
            health.last_round_at,
        )
    else:
        good, bad = (health.good_rounds + 1, 0) if result.ok else (0, health.bad_rounds + 1)
        rtt = result.rtt_ms  # None when nothing answered: a down uplink shows no stale RTT
        last_round_at = result.started_at
    failing_since, failing_seq = health.failing_since, health.failing_seq
    if not stale:
        if result.ok:
            failing_since = failing_seq = None
        elif failing_since is None:
            failing_since, failing_seq = result.started_at, result.seq
    judged, problem = quality_problem(samples, check)
    good_q, bad_q = health.good_quality, health.bad_quality
    if judged:
        good_q, bad_q = (0, bad_q + 1) if problem else (good_q + 1, 0)
    failure = health.failure
    if not stale and not result.ok and result.gateway_ok is not None:
        failure = "gateway" if result.gateway_ok is False else "upstream"
    proving_since = health.proving_since
    if not stale and not result.ok and hysteresis is not None and health.state is State.UP:
        ready_at = proof_ready_at(health, hysteresis)
        if ready_at is not None and now < ready_at:
            proving_since = now
    updated = evolve(
        health,
        good_rounds=good,
        bad_rounds=bad,
        good_quality=good_q,
        bad_quality=bad_q,
        rtt_ms=rtt,
        samples=samples,
        failure=failure,
        last_round_at=last_round_at,
        failing_since=failing_since,
        failing_seq=failing_seq,
        proving_since=proving_since,
        timeouts_ms=result.timeouts_ms or health.timeouts_ms,
        burst=result.burst_state,
    )
    state = health.state
    if state is not State.DOWN and bad >= check.fall:
        evidence = _evidence(result, health, bad, check.fall, "failed rounds")
        reason = f"{evidence}: {result.where} ({result.reason})"
        return _transition(updated, State.DOWN, reason, now)
    if state is State.DOWN and good >= check.rise:
        reason = _evidence(result, health, good, check.rise, "good rounds")
        return _transition(updated, State.UP, reason, now, recovered=health.has_failed)
    if state is State.UP and problem and bad_q >= check.fall:
        return _transition(updated, State.DEGRADED, problem, now)
    if state is State.DEGRADED and judged and not problem and good_q >= check.rise:
        quality = measure_quality(samples)
        assert quality is not None
        reason = f"quality back within the thresholds (loss {quality.loss_pct:.0f}%) for {good_q} rounds"
        return _transition(updated, State.UP, reason, now, recovered=True)
    return updated, []


def _evidence(result: RoundResult, health: Health, count: int, needed: int, what: str) -> str:
    """Which evidence decided, for the transition's reason (and so the log line)."""
    if result.burst_trigger is None:
        return f"{count} consecutive {what}"
    trigger = result.burst_trigger
    if "passive" in trigger and health.suspicion is not None:
        trigger = f"{trigger} ({health.suspicion})"
    return f"burst confirmed {min(count, needed)}/{needed} {trigger}"


def observe_late(health: Health, seq: int, rtt_ms: float) -> Health:
    """A reply that came after its probe's adaptive timeout, before the ceiling: for the
    quality window it is late, not lost. And a reply to a probe of the current run of
    failed rounds proves the path slow, not silent: that run ends (an RTT that jumped
    past the adaptive timeout must not take an answering uplink down)."""
    for index, sample in enumerate(health.samples):
        if sample.seq == seq and sample.answered < sample.sent:
            late = evolve(
                sample,
                answered=sample.answered + 1,
                rtts_ms=(*sample.rtts_ms, rtt_ms),
                late=sample.late + 1,
                median_ms=None,
            )
            samples = (*health.samples[:index], late, *health.samples[index + 1 :])
            health = evolve(health, samples=samples)
            break
    if health.state is not State.DOWN and health.failing_seq is not None and seq >= health.failing_seq:
        health = evolve(health, bad_rounds=0, failing_since=None, failing_seq=None)
    return health


def observe_link(health: Health, link: LinkObservation, now: float) -> tuple[Health, list[Transition]]:
    """Carrier loss, a vanished interface or a lost address make an uplink down at once."""
    if link.usable == health.link_usable:
        if not link.usable and health.state is State.DOWN and link.reason != health.reason:
            # Still unusable, for a new reason (down, then deleted): status says what is true now.
            return evolve(health, reason=link.reason), []
        return health, []
    if not link.usable:
        updated = evolve(
            health,
            link_usable=False,
            good_rounds=0,
            bad_rounds=0,
            failure=None,
            last_round_at=now,
            failing_since=now if health.failing_since is None else health.failing_since,
        )
        if health.state is State.DOWN:
            return evolve(updated, reason=link.reason), []
        return _transition(updated, State.DOWN, link.reason, now)
    # The link is back: it must prove itself again through `rise` good rounds
    # (and a round that began before the change proves nothing).
    return evolve(health, link_usable=True, good_rounds=0, bad_rounds=0, last_round_at=now), []


def _transition(
    health: Health, state: State, reason: str, now: float, recovered: bool = False
) -> tuple[Health, list[Transition]]:
    # Between up and degraded reachability did not change: a run of failed
    # rounds that started while degraded still counts towards down.
    reachability_changed = (state is State.DOWN) != (health.state is State.DOWN)
    updated = evolve(
        health,
        state=state,
        since=now,
        reason=reason,
        recovered=recovered,
        good_rounds=0 if reachability_changed else health.good_rounds,
        bad_rounds=0 if reachability_changed else health.bad_rounds,
        good_quality=0,
        bad_quality=0,
        proving_since=None,
    )
    if health.state is State.UP:
        # Left up (down or degraded): one more failure for the flap penalty.
        updated = evolve(updated, failures=(*health.failures, now)[-FLAP_MEMORY:])
    if state is State.DOWN:
        # What the path did before it failed says nothing about it once back.
        updated = evolve(updated, samples=(), has_failed=True)
    if state is State.DEGRADED:
        updated = evolve(updated, has_failed=True)
    return updated, [Transition(health.name, health.state, state, reason, now, health.family)]


def proof_start(health: Health) -> float:
    """When a recovered uplink's proof began: its recovery, or the failed round that restarted it."""
    return health.since if health.proving_since is None else health.proving_since


def flap_merit(failures: Sequence[float], half_life_s: float, at: float) -> float:
    """RFC 2439's figure of merit: 1 per failure, halving every half-life (none counts before it happened)."""
    return sum((0.5 ** ((at - t) / half_life_s) for t in failures if t <= at), 0.0)


def flap_penalty_s(health: Health, hysteresis: Hysteresis) -> float:
    """The hysteresis a recovered uplink owes beyond the base for failing repeatedly: the
    penalty per unit of its figure of merit past FLAP_FREE_MERIT, decayed to the start of
    its proof (one or two failures cost nothing; a long outage lets the penalty decay)."""
    if hysteresis.penalty_s <= 0 or len(health.failures) <= FLAP_FREE_MERIT:
        return 0.0
    merit = flap_merit(health.failures, hysteresis.half_life_s, proof_start(health))
    return hysteresis.penalty_s * max(merit - FLAP_FREE_MERIT, 0.0)


def owed_hysteresis_s(health: Health, hysteresis: Hysteresis) -> float:
    """How long a recovered uplink proves itself: the base plus its flap penalty, bounded."""
    owed = hysteresis.base_s + flap_penalty_s(health, hysteresis)
    return min(owed, max(hysteresis.max_s, hysteresis.base_s))


def proof_ready_at(health: Health, hysteresis: Hysteresis) -> float | None:
    """When a recovered uplink has proven itself (None: it never failed, nothing to prove)."""
    if not health.recovered:
        return None
    return proof_start(health) + owed_hysteresis_s(health, hysteresis)


def recent_failures(health: Health, hysteresis: Hysteresis, now: float) -> tuple[float, ...]:
    """The failures that still weigh (above FLAP_FORGOTTEN): for the log and status."""
    return tuple(
        t
        for t in health.failures
        if t <= now and 0.5 ** ((now - t) / hysteresis.half_life_s) >= FLAP_FORGOTTEN
    )


def owed_reason(name: str, health: Health, hysteresis: Hysteresis, now: float) -> str:
    """Why a better uplink does not carry traffic yet, e.g. 'fibre is better but owes 12.0s
    more of 90s hysteresis (30s + 60s flap penalty: 3 failures in the last 4.2 min)'."""
    start, owed = proof_start(health), owed_hysteresis_s(health, hysteresis)
    penalty = owed - hysteresis.base_s
    if penalty <= 0 and health.proving_since is None:
        return f"{name} is better but up only {now - start:.1f}s of {hysteresis.base_s:g}s hysteresis"
    reason = f"{name} is better but owes {start + owed - now:.1f}s more of {owed:.3g}s hysteresis"
    if penalty > 0:
        recent = recent_failures(health, hysteresis, now)
        reason += (
            f" ({hysteresis.base_s:g}s + {penalty:.3g}s flap penalty: {len(recent)} failures "
            f"in the last {_span(now - recent[0]) if recent else '0s'})"
        )
    if health.proving_since is not None:
        reason += f"; a failed round restarted it {now - start:.1f}s ago"
    return reason


def _span(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f} min"


def remap_health(health: Health, check: CheckConfig) -> Health:
    """Carry a health across a reload whose rise/fall/window changed (as keepalived does)."""
    return evolve(
        health,
        good_rounds=min(health.good_rounds, max(check.rise - 1, 0)),
        bad_rounds=min(health.bad_rounds, max(check.fall - 1, 0)),
        good_quality=min(health.good_quality, max(check.rise - 1, 0)),
        bad_quality=min(health.bad_quality, max(check.fall - 1, 0)),
        samples=health.samples[-check.window :],
    )


# Core: probe timing ##########################################################
#
# Owns when a prober sends and how long each probe waits: an RFC 6298 timeout
# per target, and the confirmation bursts that judge a changed verdict in a few
# hundred milliseconds instead of `fall` intervals. Pure: the prober holds a
# ProbePlan and RttEstimates, and tells them the time.


@dataclass(frozen=True, slots=True)
class RttEstimate:
    """RFC 6298's smoothed RTT and RTT variation for one (uplink, target), in ms."""

    srtt_ms: float | None = None
    rttvar_ms: float = 0.0


def rtt_sample(estimate: RttEstimate, rtt_ms: float, check: CheckConfig) -> RttEstimate:
    """Fold one measured RTT in (RFC 6298 2.2-2.3: the variation first, with the old SRTT).

    Samples that cannot be true (not positive, not finite, beyond the ceiling: a reply
    matched to the wrong probe) are discarded rather than allowed to stretch the timeout.
    """
    if not math.isfinite(rtt_ms) or rtt_ms <= 0 or rtt_ms > check.timeout_s * 1000.0:
        return estimate
    if estimate.srtt_ms is None:
        return RttEstimate(rtt_ms, rtt_ms / 2)
    variation = 0.75 * estimate.rttvar_ms + 0.25 * abs(estimate.srtt_ms - rtt_ms)
    return RttEstimate(0.875 * estimate.srtt_ms + 0.125 * rtt_ms, variation)


def probe_timeout_s(estimate: RttEstimate, check: CheckConfig) -> float:
    """How long a probe waits before it counts as lost for reachability.

    On a very stable path the variation goes to zero and SRTT + 4 x RTTVAR would fire on
    the first slow reply: the variation has a floor (RTTVAR_FLOOR_MS), the timeout one
    more (timeout_min), and the configured timeout stays the ceiling."""
    if not check.adaptive_timeout or estimate.srtt_ms is None:
        return check.timeout_s
    rto_s = (estimate.srtt_ms + 4.0 * max(estimate.rttvar_ms, RTTVAR_FLOOR_MS)) / 1000.0
    return min(check.timeout_s, max(check.timeout_min_s, rto_s))


class BurstKind(str, Enum):
    #: Confirming a failure of an uplink that answered: `fall` failed rounds make it down.
    FALL = "fall"
    #: Confirming answers of an uplink that failed: `rise` good rounds make it up.
    RISE = "rise"


@dataclass(frozen=True, slots=True)
class Burst:
    kind: BurstKind
    #: What started it, for the log: "after a failed round", "after passive suspicion".
    trigger: str
    #: Conclusive rounds of its kind still needed; rounds sent and not yet back.
    needed: int
    in_flight: int = 0
    next_at: float = 0.0

    def describe(self) -> str:
        return f"{self.kind.value} {self.trigger}"


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """One uplink's probe schedule: the regular grid, a running burst, and its budget."""

    #: When the next regular round is due.
    grid_at: float
    #: The outcome of the newest conclusive round (None before the first).
    last_ok: bool | None = None
    burst: Burst | None = None
    #: Burst rounds the uplink may still spend (a token bucket), and when it was last filled.
    tokens: float = 0.0
    tokens_at: float = 0.0


def burst_tokens(check: CheckConfig) -> float:
    """The bucket: BURST_BUCKET fault-and-recovery confirmations; it refills by one round per
    BURST_REFILL_ROUNDS intervals, so bursts add at most 1/BURST_REFILL_ROUNDS to the probe
    rate in the long run."""
    return float(BURST_BUCKET * (check.fall + check.rise))


def plan_start(check: CheckConfig, now: float) -> ProbePlan:
    return ProbePlan(grid_at=now, tokens=burst_tokens(check), tokens_at=now)


def plan_due(plan: ProbePlan) -> float:
    """When the next round is to be sent (a running burst replaces the grid)."""
    burst = plan.burst
    if burst is None:
        return plan.grid_at
    if burst.in_flight < burst.needed:
        return burst.next_at
    return math.inf  # every round the burst needs is out: its results decide what is next


def plan_sent(plan: ProbePlan, check: CheckConfig, now: float) -> tuple[ProbePlan, Burst | None]:
    """A round is sent now: (the plan after it, the burst it belongs to or None)."""
    burst = plan.burst
    if burst is not None and burst.in_flight < burst.needed:
        spacing = min(check.burst_spacing_s, check.interval_s)
        sent = evolve(burst, in_flight=burst.in_flight + 1, next_at=now + spacing)
        return evolve(plan, burst=sent, tokens=plan.tokens - 1.0), burst
    # The grid: a late wake-up skips slots, never bunches them.
    grid_at = plan.grid_at + check.interval_s
    if grid_at <= now:
        grid_at = now + check.interval_s - ((now - grid_at) % check.interval_s)
    return evolve(plan, grid_at=grid_at), None


def plan_result(
    plan: ProbePlan, ok: bool | None, in_burst: bool, check: CheckConfig, now: float
) -> ProbePlan:
    """A round came back: ok True/False, or None when nothing in it could be judged or it
    was stale. Starts a burst when the verdict changes, ends one when it is confirmed or
    contradicted; a burst's inconclusive round is simply not counted."""
    cap = burst_tokens(check)
    refill = (now - plan.tokens_at) / (check.interval_s * BURST_REFILL_ROUNDS)
    plan = evolve(plan, tokens=min(cap, plan.tokens + max(refill, 0.0)), tokens_at=now)
    burst = plan.burst
    if burst is not None and in_burst:
        burst = evolve(burst, in_flight=max(burst.in_flight - 1, 0))
    if ok is None:
        return evolve(plan, burst=burst)
    if burst is not None:
        confirms = ok is (burst.kind is BurstKind.RISE)
        if confirms and burst.needed > 1:
            return evolve(plan, burst=evolve(burst, needed=burst.needed - 1), last_ok=ok)
        # Confirmed, or contradicted: the normal interval again, from now.
        return evolve(plan, burst=None, last_ok=ok, grid_at=now + check.interval_s)
    changed = plan.last_ok is not None and ok is not plan.last_ok
    plan = evolve(plan, last_ok=ok)
    if not (changed and check.burst):
        return plan
    kind, more = (BurstKind.RISE, check.rise - 1) if ok else (BurstKind.FALL, check.fall - 1)
    trigger = "after a good round" if ok else "after a failed round"
    return _start_burst(plan, kind, trigger, more, now)


def plan_late(plan: ProbePlan, check: CheckConfig, now: float) -> ProbePlan:
    """A late reply: the path answers, slowly. A fall burst is contradicted (and the
    timeout has just learned the longer RTT)."""
    if plan.burst is None or plan.burst.kind is not BurstKind.FALL:
        return plan
    return evolve(plan, burst=None, last_ok=True, grid_at=now + check.interval_s)


def plan_suspect(plan: ProbePlan, check: CheckConfig, now: float, trigger: str) -> ProbePlan:
    """Passive suspicion: confirm at once with `fall` burst rounds (it never counts itself)."""
    if not check.burst or plan.burst is not None or plan.last_ok is False:
        return plan
    return _start_burst(plan, BurstKind.FALL, trigger, check.fall, now)


def _start_burst(plan: ProbePlan, kind: BurstKind, trigger: str, needed: int, now: float) -> ProbePlan:
    if needed < 1 or plan.tokens < 1.0:
        return plan  # nothing to confirm, or the budget is spent: the grid counts rounds as ever
    return evolve(plan, burst=Burst(kind, trigger, needed, next_at=now))


# Core: passive health ########################################################
#
# Owns what live traffic says about an uplink: new connections marked for it
# (conntrack events, read-only) that get no reply within passive_timeout. A
# sharp rise, over several destinations, while other uplinks' connections are
# answered, makes the uplink suspect: a confirmation burst starts at once. It
# never takes an uplink down by itself. Not a frozen dataclass: it takes every
# new connection of a busy router; but it does no I/O and is told the time.


@dataclass(frozen=True, slots=True)
class PassiveView:
    """What status and metrics show of an uplink's passive signal (over PASSIVE_WINDOW_S)."""

    #: "idle" (no new connections), "answered", "unanswered" (a share past the threshold,
    #: not enough destinations or vetoed) or "suspect" (a burst was asked for).
    state: str = "idle"
    resolved: int = 0
    unanswered: int = 0
    destinations: int = 0
    baseline_pct: float = 0.0
    suspicions: int = 0


@dataclass(frozen=True, slots=True)
class Suspicion:
    uplink: str
    evidence: str
    at: float


@dataclass
class _PassiveUplink:
    timeout_s: float
    destinations: int
    #: Connections waiting for their first reply: id -> (seen at, destination), oldest first.
    pending: dict[int, tuple[float, str]] = dataclasses.field(default_factory=dict)
    #: Connections whose fate is known, started within the window: (started at, answered,
    #: destination), in the order their fate became known.
    resolved: collections.deque[tuple[float, bool, str]] = dataclasses.field(
        default_factory=collections.deque
    )
    #: The long-run share of unanswered connections (0..1), so a LAN that always has some
    #: (one-way UDP, dead servers) needs a sharp rise above it.
    baseline: float = 0.0
    holdoff_until: float = -math.inf
    suspect_until: float = -math.inf
    suspicions: int = 0


class PassiveHealth:
    def __init__(self) -> None:
        self._uplinks: dict[str, _PassiveUplink] = {}
        #: Which uplink a pending connection belongs to.
        self._owner: dict[int, str] = {}

    def configure(self, uplinks: Sequence[UplinkConfig]) -> None:
        wanted = {u.name: u for u in uplinks if u.check.passive}
        for name in [n for n in self._uplinks if n not in wanted]:
            for conn in self._uplinks.pop(name).pending:
                self._owner.pop(conn, None)
        for name, uplink in wanted.items():
            entry = self._uplinks.get(name)
            if entry is None:
                self._uplinks[name] = _PassiveUplink(
                    uplink.check.passive_timeout_s, uplink.check.passive_destinations
                )
            else:
                entry.timeout_s = uplink.check.passive_timeout_s
                entry.destinations = uplink.check.passive_destinations

    @property
    def busy(self) -> bool:
        """Connections wait for replies, or some were judged recently."""
        return any(e.pending or e.resolved for e in self._uplinks.values())

    def connection_new(self, conn: int, uplink: str, destination: str, now: float) -> None:
        entry = self._uplinks.get(uplink)
        if entry is None or conn in self._owner:
            return
        if len(entry.pending) >= PASSIVE_PENDING_MAX:
            oldest = next(iter(entry.pending))
            del entry.pending[oldest]
            self._owner.pop(oldest, None)
        entry.pending[conn] = (now, destination)
        self._owner[conn] = uplink

    def connection_answered(self, conn: int, now: float) -> None:
        uplink = self._owner.pop(conn, None)
        if uplink is None:
            return
        entry = self._uplinks[uplink]
        seen = entry.pending.pop(conn, None)
        if seen is not None:
            self._resolve(entry, seen[0], True, seen[1])

    def forget(self) -> None:
        """Events were lost (the socket overflowed): what is pending can no longer be judged."""
        for entry in self._uplinks.values():
            entry.pending.clear()
        self._owner.clear()

    def judge(self, now: float) -> list[Suspicion]:
        """Expire what waited too long, then say which uplinks turned suspect now."""
        for entry in self._uplinks.values():
            expired = []
            for conn, (seen_at, destination) in entry.pending.items():
                if now - seen_at < entry.timeout_s:
                    break  # oldest first: the rest are younger
                expired.append((conn, seen_at, destination))
            for conn, seen_at, destination in expired:
                del entry.pending[conn]
                self._owner.pop(conn, None)
                self._resolve(entry, seen_at, False, destination)
            while entry.resolved and entry.resolved[0][0] < now - PASSIVE_WINDOW_S:
                entry.resolved.popleft()
        found: list[Suspicion] = []
        for name, entry in self._uplinks.items():
            if now < entry.holdoff_until:
                continue
            evidence = self._evidence(name, entry)
            if evidence is None:
                continue
            entry.holdoff_until = now + PASSIVE_HOLDOFF_S
            entry.suspect_until = now + PASSIVE_SUSPECT_SHOWN_S
            entry.suspicions += 1
            entry.resolved.clear()
            found.append(Suspicion(name, evidence, now))
        return found

    def view(self, uplink: str, now: float) -> PassiveView | None:
        entry = self._uplinks.get(uplink)
        if entry is None:
            return None
        unanswered = [r for r in entry.resolved if not r[1]]
        share = len(unanswered) / len(entry.resolved) if entry.resolved else 0.0
        if now < entry.suspect_until:
            state = "suspect"
        elif not entry.resolved:
            state = "idle"
        elif share >= self._threshold(entry):
            state = "unanswered"
        else:
            state = "answered"
        return PassiveView(
            state,
            len(entry.resolved),
            len(unanswered),
            len({r[2] for r in unanswered}),
            round(entry.baseline * 100.0, 1),
            entry.suspicions,
        )

    @staticmethod
    def _threshold(entry: _PassiveUplink) -> float:
        return max(PASSIVE_SHARE, entry.baseline + PASSIVE_RISE)

    def _resolve(self, entry: _PassiveUplink, started_at: float, answered: bool, destination: str) -> None:
        entry.resolved.append((started_at, answered, destination))
        if len(entry.resolved) > PASSIVE_PENDING_MAX:
            entry.resolved.popleft()
        entry.baseline += (float(not answered) - entry.baseline) / PASSIVE_BASELINE_CONNECTIONS

    @staticmethod
    def _recent(entry: _PassiveUplink) -> list[tuple[float, bool, str]]:
        """The newest connections whose fate is known, by when they started: a path that
        died shows as its newest connections unanswered, however many were answered before."""
        count = max(2 * entry.destinations, PASSIVE_RECENT_MIN)
        return sorted(entry.resolved)[-count:]

    def _evidence(self, name: str, entry: _PassiveUplink) -> str | None:
        recent = self._recent(entry)
        unanswered = [r for r in recent if not r[1]]
        destinations = {r[2] for r in unanswered}
        # One dead server, or one host scanning one address, is not a dead uplink.
        if len(destinations) < entry.destinations:
            return None
        if len(unanswered) / len(recent) < self._threshold(entry):
            return None
        for other_name, other in self._uplinks.items():
            # Other uplinks' new connections failing as much: the LAN side, not this path.
            if other_name != name and len(other.resolved) >= other.destinations:
                others = self._recent(other)
                if sum(1 for r in others if not r[1]) / len(others) >= PASSIVE_SHARE:
                    return None
        return (
            f"{len(unanswered)} of the last {len(recent)} new connections, to {len(destinations)} "
            f"destinations, unanswered within {format_duration(entry.timeout_s)}"
        )


# Core: selection #############################################################
#
# Owns the choice of the uplink that carries a family's new traffic: priority,
# the degraded last resort, and the hysteresis before a failback.


@dataclass(frozen=True, slots=True)
class Decision:
    selected: str | None
    reason: str
    #: True when no uplink is up or degraded (the last route is kept; say so loudly).
    stranded: bool = False
    #: Monotonic time at which the selection must be evaluated again (hysteresis).
    wake_at: float | None = None


def select(
    healths: Mapping[str, Health],
    uplinks: Sequence[UplinkConfig],
    current: str | None,
    hysteresis_s: float | Hysteresis,
    now: float,
    unavailable: Mapping[str, str] | None = None,
) -> Decision:
    """Choose the uplink that carries new traffic.

    The best `up` uplink by priority; a `degraded` one only when none is up.
    Leaving a down or degraded uplink for one that is up is immediate. Moving
    back to a better uplink waits until it has proven itself (see proof_ready_at:
    the hysteresis with no failed round, plus its flap penalty) if it came back
    from a failure; one that never failed (at start) takes over as soon as it is
    confirmed. Among equal priorities the current one stays. A plain number is a
    hysteresis without flap damping. `unavailable` says why an uplink left out of
    `uplinks` is (e.g. "is drained").
    """
    hysteresis = hysteresis_s if isinstance(hysteresis_s, Hysteresis) else Hysteresis(hysteresis_s)
    order = {u.name: (u.priority, i) for i, u in enumerate(uplinks)}

    def state(name: str) -> State:
        return healths[name].state if name in healths else State.DOWN

    up = sorted((n for n in order if state(n) is State.UP), key=order.__getitem__)
    degraded = sorted((n for n in order if state(n) is State.DEGRADED), key=order.__getitem__)
    if not up and not degraded:
        # Keep the last route, even through an uplink that cannot carry traffic now:
        # deleting it would leave nothing, and it may come back first.
        if current is None:
            return Decision(None, "no uplink is up yet", stranded=True)
        if current not in healths:
            # A reload removed it: no route through it is planned any more, so selecting
            # it still would only be a ghost in status and in the carrying uplinks.
            return Decision(None, f"no uplink is up; {current} is no longer configured", stranded=True)
        return Decision(current, f"no uplink is up; keeping {current}", stranded=True)
    if current is not None and current not in order:
        gone = current not in healths or healths[current].state is State.UP
        why_leave = (
            f"{current} cannot carry this traffic now" if gone else f"{current} is {state(current).value}"
        )
        if unavailable and current in unavailable:
            why_leave = f"{current} {unavailable[current]}"
        current = None
    else:
        why_leave = "first uplink up" if current is None else f"{current} is {state(current).value}"
    if not up:
        if current in degraded:
            return Decision(current, f"no uplink is up; {current} is degraded, kept as the last resort")
        best = degraded[0]
        return Decision(best, f"{why_leave}; no uplink is up, {best} is degraded: the last resort")
    best = up[0]
    if current is None or current not in up:
        return Decision(best, f"{why_leave}; {best} is the best uplink up")
    if best == current or order[best][0] >= order[current][0]:
        return Decision(current, f"{current} is the best uplink up")
    candidate = healths[best]
    ready_at = proof_ready_at(candidate, hysteresis)
    if ready_at is not None and now < ready_at:
        return Decision(current, owed_reason(best, candidate, hysteresis, now), wake_at=ready_at)
    if ready_at is not None:
        owed = ready_at - proof_start(candidate)
        return Decision(best, f"{best} has been up for the {owed:.3g}s hysteresis")
    return Decision(best, f"{best} is confirmed up and preferred over {current}")


# Core: steering ##############################################################
#
# Beyond the selection table's one default route, new connections can be
# spread over a balance group, and policies can pin some traffic to uplinks
# of their own. Both are decided here, per family, and carried out by the nft
# table (see "nftables").


@dataclass(frozen=True, slots=True)
class BalanceGroup:
    #: (uplink, weight), in config order. One member balances nothing (the selection
    #: table carries it all) but keeps its per-host placements for when others rejoin.
    members: tuple[tuple[str, int], ...]
    #: When a recovered uplink finishes its hysteresis and may join.
    wake_at: float | None = None


def balance_group(
    healths: Mapping[str, Health],
    candidates: Sequence[UplinkConfig],
    selected: str | None,
    hysteresis_s: float | Hysteresis,
    now: float,
) -> BalanceGroup:
    """The uplinks that share new connections with the selected one, by weight.

    Those `up` at the selected uplink's priority. One that recovered from a
    failure joins once it has proven itself, as a failback would. A degraded or
    stranded selection balances nothing: it is a last resort.
    """
    hysteresis = hysteresis_s if isinstance(hysteresis_s, Hysteresis) else Hysteresis(hysteresis_s)
    by_name = {u.name: u for u in candidates}
    if selected not in by_name or healths[selected].state is not State.UP:
        return BalanceGroup(())
    priority = by_name[selected].priority
    members: list[tuple[str, int]] = []
    waits: list[float] = []
    for uplink in candidates:
        health = healths.get(uplink.name)
        if uplink.priority != priority or health is None or health.state is not State.UP:
            continue
        ready_at = proof_ready_at(health, hysteresis)
        if uplink.name != selected and ready_at is not None and now < ready_at:
            waits.append(ready_at)
            continue
        members.append((uplink.name, uplink.weight))
    return BalanceGroup(tuple(members), min(waits) if waits else None)


def select_for_policy(
    policy: PolicyConfig,
    healths: Mapping[str, Health],
    candidates: Sequence[UplinkConfig],
    current: str | None,
    hysteresis_s: float | Hysteresis,
    now: float,
    unavailable: Mapping[str, str] | None = None,
) -> Decision:
    """The uplink a policy's traffic takes: `select` over its own list, in its order.

    None when none of them is up or degraded: the fallback applies (the normal
    selection, or a drop).
    """
    ranked = [
        evolve(u, priority=policy.uplinks.index(u.name)) for u in candidates if u.name in policy.uplinks
    ]
    decision = select(healths, ranked, current, hysteresis_s, now, unavailable)
    if decision.stranded:
        fallback = (
            "its traffic is dropped" if policy.fallback == "drop" else "its traffic follows the default"
        )
        return Decision(None, f"none of {', '.join(policy.uplinks)} is usable; {fallback}", stranded=True)
    return decision


@dataclass(frozen=True, slots=True)
class Steering:
    """What the nft table does with new connections: balance groups and policy uplinks."""

    #: Per family: the balance group's (uplink, weight); fewer than two balance nothing.
    balance: Mapping[int, tuple[tuple[str, int], ...]] = dataclasses.field(default_factory=dict)
    #: Per policy name and family: its uplink, or None for its fallback.
    policies: Mapping[str, Mapping[int, str | None]] = dataclasses.field(default_factory=dict)


def carry_steering(steering: Steering, config: Config) -> Steering:
    """The part of a steering that still holds under a new config (a reload): balance
    members and policy uplinks that still exist and still carry that family."""
    families = {u.name: u.families for u in config.uplinks}
    weights = {u.name: u.weight for u in config.uplinks}
    policies = {p.name: p for p in config.policies}
    return Steering(
        {
            f: tuple((n, weights[n]) for n, _ in members if f in families.get(n, ()))
            for f, members in steering.balance.items()
            if f in config.families
        },
        {
            name: {
                f: n
                for f, n in chosen.items()
                if f in policies[name].match.families
                and (n is None or (n in policies[name].uplinks and f in families[n]))
            }
            for name, chosen in steering.policies.items()
            if name in policies
        },
    )


# Core: route plan ############################################################
#
# Owns the desired routes and rules for a selection, the diff against a dump
# (replace, never delete-then-add), and what others' objects in our way mean.


@dataclass(frozen=True, slots=True)
class Interface:
    """One interface as netlink reports it."""

    name: str
    index: int
    admin_up: bool
    carrier: bool
    #: Primary IPv4 address, if any.
    address: str | None
    #: Gateway of main's default route on this interface that is not ours (the DHCP client's).
    dhcp_gateway: str | None
    #: A global, usable IPv6 address, if any.
    address6: str | None = None
    #: Gateway of main's IPv6 default route on this interface (the RA client's, link-local).
    ra_gateway: str | None = None

    def source(self, family: int) -> str | None:
        return self.address if family == 4 else self.address6

    def gateway(self, family: int) -> str | None:
        return self.dhcp_gateway if family == 4 else self.ra_gateway


@dataclass(frozen=True, slots=True)
class RouteSpec:
    table: int
    interface: str
    gateway: str | None  # None: point-to-point (scope link)
    family: int = 4
    #: The uplink table's last resort (`unreachable default`, UNREACHABLE_METRIC; no interface).
    unreachable: bool = False

    def describe(self) -> str:
        if self.unreachable:
            return f"unreachable default metric {UNREACHABLE_METRIC} table {self.table}"
        via = f"via {self.gateway}" if self.gateway else "scope link"
        return f"default {via} dev {self.interface} table {self.table}"


@dataclass(frozen=True, slots=True)
class RuleSpec:
    priority: int
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    source: str | None = None
    oifname: str | None = None
    suppress_prefixlength: int | None = None
    family: int = 4

    def describe(self) -> str:
        parts = [f"{self.priority}:"]
        if self.source:
            parts.append(f"from {self.source}")
        else:
            parts.append("from all")
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}/{self.fwmask or 0xFFFFFFFF:#x}")
        if self.oifname:
            parts.append(f"oif {self.oifname}")
        parts.append(f"lookup {'main' if self.table == RT_TABLE_MAIN else self.table}")
        if self.suppress_prefixlength is not None:
            parts.append(f"suppress_prefixlength {self.suppress_prefixlength}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """A default route found in one of our tables (from a dump)."""

    table: int
    oif: int | None
    gateway: str | None
    protocol: int
    family: int = 4
    unreachable: bool = False
    #: The destination of a route that is not a default ("10.0.0.0/8"); None for a default.
    dst: str | None = None


@dataclass(frozen=True, slots=True)
class RuleEntry:
    """A rule found in a dump."""

    priority: int
    table: int
    protocol: int
    fwmark: int | None = None
    fwmask: int | None = None
    source: str | None = None
    oifname: str | None = None
    suppress_prefixlength: int | None = None
    family: int = 4

    def spec(self) -> RuleSpec:
        return RuleSpec(
            self.priority,
            self.table,
            self.fwmark,
            self.fwmask,
            self.source,
            self.oifname,
            self.suppress_prefixlength,
            self.family,
        )


@dataclass(frozen=True, slots=True)
class NetPlan:
    """What the agent wants installed: per-uplink table routes, rules, the selected defaults."""

    uplink_routes: tuple[RouteSpec, ...]
    rules: tuple[RuleSpec, ...]
    default_routes: tuple[RouteSpec, ...]
    #: Each uplink table's `unreachable default`, below its real default.
    unreachable_routes: tuple[RouteSpec, ...] = ()


def uplink_gateway(uplink: UplinkConfig, interface: Interface | None, family: int = 4) -> str | None:
    spec = uplink.gateway if family == 4 else uplink.gateway6
    if spec == "none":
        return None
    if spec == "auto":
        return interface.gateway(family) if interface else None
    return spec


def routable(uplink: UplinkConfig, interface: Interface | None, family: int) -> bool:
    """Can this uplink carry this family's traffic now (link, address, gateway)?"""
    if interface is None or not interface.admin_up or not interface.carrier:
        return False
    if interface.source(family) is None:
        return False
    spec = uplink.gateway if family == 4 else uplink.gateway6
    return spec == "none" or uplink_gateway(uplink, interface, family) is not None


def link_observation(
    uplink: UplinkConfig, interface: Interface | None, family: int | None = None
) -> LinkObservation:
    """Usable while at least one family the uplink is checked for (or `family`) can be routed."""
    families = uplink.families if family is None else (family,)
    if interface is None:
        return LinkObservation(False, f"interface {uplink.interface} is gone")
    if not interface.admin_up:
        return LinkObservation(False, f"interface {uplink.interface} is administratively down")
    if not interface.carrier:
        return LinkObservation(False, f"carrier lost on {uplink.interface}")
    if any(routable(uplink, interface, f) for f in families):
        return LinkObservation(True)
    family = families[0]
    if interface.source(family) is None:
        return LinkObservation(False, f"no {FAMILY_TITLE[family]} address on {uplink.interface}")
    client = "DHCP" if family == 4 else "RA"
    return LinkObservation(False, f"no default route from {client} on {uplink.interface} yet")


def plan_network(
    config: Config,
    interfaces: Mapping[str, Interface],
    selected: Mapping[int, str | None],
    lan_routed: Collection[str] | None = None,
) -> NetPlan:
    """The desired routes and rules for these interfaces and this selection.

    Per address family the uplinks are checked for, rule order inside our
    block (offsets from rule_priority; uplink i takes slot i of each kind):
    - 0 `lookup main suppress_prefixlength 0`: main's specific routes (LANs,
      connected nets, VPNs, static routes) keep winning, while main's default
      routes (the DHCP/RA client's, whatever their metric) never do;
    - 100+i `oif X lookup T`: sockets bound to an uplink (our probes) use its table;
    - 356+i `from ADDR lookup T`: traffic sourced from an uplink's address leaves by it;
    - 612+i `fwmark M/MASK lookup T`: marked traffic (policy, stickiness) uses it;
    - 1000 `from PREFIX lookup T` (IPv6): a LAN prefix the uplink's ISP delegated leaves
      by it, for the uplinks in `lan_routed` (None: all). After the fwmark rules, so a
      connection that was masqueraded elsewhere while the uplink was down keeps its path;
    - 1023 `lookup <default_table>`: everything else takes the selected uplink.
    An empty selection table falls through, so at worst main's own default
    applies; an uplink table never does (see its `unreachable` route).
    """
    agent = config.agent
    base = agent.rule_priority
    routes: list[RouteSpec] = []
    rules: list[RuleSpec] = []
    defaults: list[RouteSpec] = []
    unreachable: list[RouteSpec] = []
    for family in config.families:
        rules.append(RuleSpec(base + RULE_MAIN_OFFSET, RT_TABLE_MAIN, suppress_prefixlength=0, family=family))
        for index, uplink in enumerate(config.uplinks):
            if family not in uplink.families:
                continue
            interface = interfaces.get(uplink.interface)
            gateway = uplink_gateway(uplink, interface, family)
            spec = uplink.gateway if family == 4 else uplink.gateway6
            # Once the interface is gone the table still answers: marked flows
            # and sockets bound to the uplink get "unreachable" instead of
            # leaking through another uplink with this one's source address.
            unreachable.append(RouteSpec(uplink.table, "", None, family, unreachable=True))
            # The kernel keeps routes through a link without carrier; so do we
            # (the selection already moved away), and the table stays ready.
            if interface is not None and (spec == "none" or gateway is not None):
                routes.append(RouteSpec(uplink.table, uplink.interface, gateway, family))
                if uplink.name == selected.get(family):
                    defaults.append(RouteSpec(agent.default_table, uplink.interface, gateway, family))
            rules.append(
                RuleSpec(
                    base + RULE_OIF_OFFSET + index, uplink.table, oifname=uplink.interface, family=family
                )
            )
            source = interface.source(family) if interface is not None else None
            if source is not None:
                rules.append(
                    RuleSpec(base + RULE_SOURCE_OFFSET + index, uplink.table, source=source, family=family)
                )
            rules.append(
                RuleSpec(
                    base + RULE_MARK_OFFSET + index,
                    uplink.table,
                    fwmark=uplink.mark,
                    fwmask=agent.mark_mask,
                    family=family,
                )
            )
            if family == 6 and (lan_routed is None or uplink.name in lan_routed):
                rules += [
                    RuleSpec(base + RULE_PREFIX_OFFSET, uplink.table, source=prefix, family=6)
                    for prefix in uplink.lan_prefixes6
                ]
        rules.append(RuleSpec(base + RULE_DEFAULT_OFFSET, agent.default_table, family=family))
    return NetPlan(
        tuple(routes),
        tuple(sorted(rules, key=lambda r: (r.family, r.priority))),
        tuple(defaults),
        tuple(unreachable),
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One netlink operation. `kind`: replace_route, add_rule, del_rule, del_route."""

    kind: str
    route: RouteSpec | None = None
    rule: RuleSpec | None = None
    table: int | None = None
    family: int = 4
    #: del_route: the `unreachable` route rather than the uplink's real default.
    unreachable: bool = False

    def describe(self) -> str:
        family = FAMILY_NAME[
            self.route.family if self.route else self.rule.family if self.rule else self.family
        ]
        if self.route is not None:
            return f"{self.kind} {family} {self.route.describe()}"
        if self.rule is not None:
            return f"{self.kind} {family} {self.rule.describe()}"
        kind = "unreachable default" if self.unreachable else "default"
        return f"{self.kind} {family} {kind} table {self.table}"


def owns_rule(config: Config, rule: RuleEntry) -> bool:
    base = config.agent.rule_priority
    return rule.protocol == config.agent.route_protocol and base <= rule.priority < base + RULE_BLOCK


def diff_network(
    config: Config,
    plan: NetPlan,
    rules: Sequence[RuleEntry],
    routes: Sequence[RouteEntry],
    indexes: Mapping[str, int],
    managed_tables: Iterable[int],
) -> list[Change]:
    """The changes that turn what is installed into the plan, in a safe order.

    Routes are replaced before the rules that point at them are added, the
    selected default is replaced in one operation (never deleted and re-added),
    and only objects carrying our protocol id in our ranges are ever removed.

    Rules are all added before any is deleted, and deleted highest priority
    first. That is what makes a restart over an older layout safe (an agent
    before RULE_BLOCK 1024 left oif/source/fwmark rules at 10/40/70+i and its
    catch-all `lookup <default_table>` at 99, all ahead of the new ones): the
    old catch-all goes first, so traffic an old oif/source/fwmark rule still
    matches never falls to it once that rule is gone, but to the new rule of
    the same meaning, already in place further down.
    """
    protocol = config.agent.route_protocol
    ours = {(r.family, r.table, r.unreachable): r for r in routes if r.protocol == protocol and r.dst is None}
    changes: list[Change] = []
    wanted_routes: set[tuple[int, int, bool]] = set()
    # The selected defaults first: they are what new traffic needs most.
    for route in plan.default_routes + plan.uplink_routes + plan.unreachable_routes:
        key = (route.family, route.table, route.unreachable)
        wanted_routes.add(key)
        found = ours.get(key)
        if route.unreachable:
            # Presence is all: the kernel reports IPv6 `unreachable` routes with oif lo.
            stale = found is None
        else:
            stale = (
                found is None or found.oif != indexes.get(route.interface) or found.gateway != route.gateway
            )
        if stale:
            changes.append(Change("replace_route", route=route))
    installed = {rule.spec() for rule in rules if owns_rule(config, rule)}
    wanted = set(plan.rules)
    for rule in plan.rules:
        if rule not in installed:
            changes.append(Change("add_rule", rule=rule))
    for spec in sorted(installed - wanted, key=lambda r: (r.family, -r.priority, r.describe())):
        changes.append(Change("del_rule", rule=spec))
    # The selection table's default is never deleted here: with nothing to
    # select we keep the last route (see select()).
    for family, table, unreachable in sorted(ours):
        selection = table == config.agent.default_table and family in config.families
        if table in managed_tables and (family, table, unreachable) not in wanted_routes and not selection:
            changes.append(Change("del_route", table=table, family=family, unreachable=unreachable))
    return changes


def find_collisions(config: Config, rules: Sequence[RuleEntry], routes: Sequence[RouteEntry]) -> list[str]:
    """Objects of others that sit where the agent would write. Any one refuses the start."""
    agent = config.agent
    problems: list[str] = []
    base = agent.rule_priority
    tables = config.tables
    marks = {u.mark: u.name for u in config.uplinks}
    for rule in rules:
        if owns_rule(config, rule):
            continue
        family = FAMILY_NAME[rule.family]
        if base <= rule.priority < base + RULE_BLOCK:
            problems.append(
                f"{family} rule priority {rule.priority} (protocol {rule.protocol}) is inside the agent's "
                f"range {base}-{base + RULE_BLOCK - 1}; set [agent] rule_priority elsewhere"
            )
        elif rule.table in tables:
            problems.append(
                f"{family} rule priority {rule.priority} already uses table {rule.table}; "
                "choose other table ids ([agent] default_table, [[uplink]] table)"
            )
        elif rule.fwmark:
            mask = rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF
            for mark, name in marks.items():
                if (mark & agent.mark_mask & mask) == (rule.fwmark & agent.mark_mask & mask) and (
                    mask & agent.mark_mask
                ):
                    problems.append(
                        f"{family} rule priority {rule.priority} matches fwmark {rule.fwmark:#x}/{mask:#x}, "
                        f"which overlaps uplink {name}'s mark {mark:#x}/{agent.mark_mask:#x}"
                    )
    for route in routes:
        if route.table in tables and route.protocol != agent.route_protocol:
            problems.append(
                f"table {route.table} already holds an {FAMILY_NAME[route.family]} route of protocol "
                f"{route.protocol}; choose other table ids"
            )
    return problems


def describe_renumbering(uplink: UplinkConfig, before: Interface, after: Interface) -> str:
    """'address 203.0.113.6 -> 203.0.113.10, gateway ...' for what changed, or ''."""
    fields = (
        ("ifindex", before.index, after.index),
        ("address", before.address, after.address),
        ("gateway", uplink_gateway(uplink, before, 4), uplink_gateway(uplink, after, 4)),
        ("address6", before.address6, after.address6),
        ("gateway6", uplink_gateway(uplink, before, 6), uplink_gateway(uplink, after, 6)),
    )
    return ", ".join(f"{name} {old} -> {new}" for name, old, new in fields if old != new and old and new)


# Others' objects, seen at runtime ----------------------------------------------
#
# At start a collision refuses the start (find_collisions). An object of
# another program that appears while the agent runs is never deleted: it is
# named, with the guarantee it defeats, in the log (once) and in status.


@dataclass(frozen=True, slots=True)
class ForeignObject:
    """Another program's rule or route where it changes what the agent's own objects do."""

    #: "ipv4 rule 5050: from all lookup main (protocol 0)"
    what: str
    #: "it precedes the selection (rule 6023): failover is ineffective for the traffic it matches"
    defeats: str


def _defeated_by_priority(config: Config, priority: int) -> str:
    """What a foreign rule at this priority inside the agent's block goes ahead of."""
    base = config.agent.rule_priority
    selection = base + RULE_DEFAULT_OFFSET
    if priority >= selection:
        return (
            f"it sits in the agent's block {base}-{base + RULE_BLOCK - 1} after the selection (rule "
            f"{selection}), so it is reached only when the selection table is empty; move it out of the block"
        )
    text = f"it precedes the selection (rule {selection}): failover is ineffective for the traffic it matches"
    for offset, guarantee in (
        (RULE_MARK_OFFSET, "connection stickiness and policies"),
        (RULE_SOURCE_OFFSET, "the path of traffic from an uplink's address"),
        (RULE_OIF_OFFSET, "probes bound to their uplink (a probe may test another path)"),
    ):
        if priority < base + offset:
            text += f"; so are {guarantee} (rules from {base + offset})"
    return text


def find_foreign(
    config: Config, rules: Sequence[RuleEntry], routes: Sequence[RouteEntry]
) -> tuple[ForeignObject, ...]:
    """Rules and routes of others that defeat one of the agent's guarantees, in a stable order."""
    agent = config.agent
    base = agent.rule_priority
    owners = {u.table: f"uplink {u.name}'s table {u.table}" for u in config.uplinks}
    owners[agent.default_table] = f"the selection table {agent.default_table}"
    marks = {u.mark: u.name for u in config.uplinks}
    found: list[ForeignObject] = []
    for rule in sorted(rules, key=lambda r: (r.family, r.priority)):
        if owns_rule(config, rule):
            continue
        what = f"{FAMILY_NAME[rule.family]} rule {rule.spec().describe()} (protocol {rule.protocol})"
        if base <= rule.priority < base + RULE_BLOCK:
            found.append(ForeignObject(what, _defeated_by_priority(config, rule.priority)))
        elif rule.table in owners and rule.priority < base:
            found.append(
                ForeignObject(
                    what,
                    f"it sends the traffic it matches to {owners[rule.table]} ahead of the agent's rules, "
                    "whatever that uplink's health",
                )
            )
        elif rule.fwmark and rule.priority < base:
            mask = (rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF) & agent.mark_mask
            for mark, name in marks.items():
                if mask and (mark & mask) == (rule.fwmark & mask):
                    found.append(
                        ForeignObject(
                            what,
                            f"it matches uplink {name}'s mark {mark:#x} ahead of the agent's rules: "
                            f"connections that stick to {name} may leave through another path",
                        )
                    )
    for route in sorted(routes, key=lambda r: (r.family, r.table, r.dst or "")):
        if route.table in owners and route.protocol != agent.route_protocol:
            found.append(
                ForeignObject(
                    f"{FAMILY_NAME[route.family]} route {route.dst or 'default'} in table {route.table} "
                    f"(protocol {route.protocol})",
                    f"traffic that {owners[route.table]} carries to it ignores the agent",
                )
            )
    return tuple(dict.fromkeys(found))


def reload_problem(old: Config, new: Config) -> str | None:
    """Why a new config cannot replace the running one without a restart, or None."""
    fixed = ("rule_priority", "route_protocol", "mark_mask", "default_table")
    changed = [k for k in fixed if getattr(old.agent, k) != getattr(new.agent, k)]
    if changed:
        return f"[agent] {', '.join(changed)} cannot change on reload; restart"
    before = {u.name: u for u in old.uplinks}
    for uplink in new.uplinks:
        was = before.get(uplink.name)
        if was is not None and (was.table, was.mark) != (uplink.table, uplink.mark):
            # Ids inherited from the list position move when uplinks are
            # removed or reordered; marks set elsewhere would route differently.
            return (
                f"uplink {uplink.name}'s table/mark would change from {was.table}/{was.mark:#x} to "
                f"{uplink.table}/{uplink.mark:#x}; set them explicitly, or restart"
            )
    return None


def reload_collisions(
    old: Config, new: Config, rules: Sequence[RuleEntry], routes: Sequence[RouteEntry]
) -> list[str]:
    """The collisions a new config brings. Objects the running agent already lives with
    (and reports as foreign) are no reason to refuse it: only new ones are."""
    rules = [r for r in rules if not find_collisions(old, [r], [])]
    routes = [r for r in routes if not find_collisions(old, [], [r])]
    return find_collisions(new, rules, routes)


# Core: the agent #############################################################
#
# Owns every piece of state that affects a decision: healths, interfaces, the
# selection per family, policy choices, steering, what each uplink carries,
# owed flow releases, drains, retry and wake-up times, and what status says.
# Pure like the sections above (aioquic's connection is the model): each on_*
# takes the state, one observation and `now`, and returns the new state and an
# Intent (route work, nft steering, flow releases, typed events, the next
# wake-up). The daemon's pump feeds it and carries the intents out.


@dataclass(frozen=True, slots=True)
class PreviousUplink:
    """One uplink as the previous run's status.json left it (validated)."""

    state: State
    has_failed: bool
    recovered: bool
    #: CLOCK_MONOTONIC at its last state change: comparable within one boot only.
    since_monotonic: float


@dataclass(frozen=True, slots=True)
class PreviousRun:
    """What the previous run left in status.json, as far as a restart needs it."""

    #: The kernel's boot id then (None if the file did not say).
    boot_id: str | None
    uplinks: Mapping[str, PreviousUplink]


def owes_hysteresis(
    previous: PreviousRun | None, name: str, boot_id: str | None, hysteresis_s: float, now: float
) -> bool:
    """Whether an uplink must prove itself again after a restart: it had failed, or was
    still inside its hysteresis. Judged on the monotonic clock of the same boot, never
    the wall clock (a router without an RTC steps it at boot); across a reboot an
    uplink that was proving itself cannot be timed, so it proves itself again."""
    if previous is None or name not in previous.uplinks:
        return False
    was = previous.uplinks[name]
    if was.state is not State.UP:
        return was.has_failed
    if not was.recovered:
        return False
    if previous.boot_id is None or previous.boot_id != boot_id:
        return True
    return now < was.since_monotonic + hysteresis_s


def adoptable(
    config: Config, interfaces: Mapping[str, Interface], routes: Sequence[RouteEntry]
) -> dict[int, str]:
    """Per family, the uplink the selection table's default (left by a previous run) points at."""
    adopted: dict[int, str] = {}
    for route in routes:
        if (
            route.table != config.agent.default_table
            or route.protocol != config.agent.route_protocol
            or route.dst is not None
        ):
            continue
        for uplink in config.uplinks:
            interface = interfaces.get(uplink.interface)
            if interface is not None and interface.index == route.oif and route.family in uplink.families:
                adopted[route.family] = uplink.name
    return adopted


# Events: what the core decided, for the log, status and (later) history, hooks
# and metrics. `at` is the monotonic time of the decision.


@dataclass(frozen=True, slots=True)
class SelectionChanged:
    family: int
    old: str | None
    new: str | None
    reason: str
    at: float
    #: A failover: when the first evidence of the old uplink's failure came (else None).
    evidence_at: float | None = None


@dataclass(frozen=True, slots=True)
class NoUplinkUp:
    """A family has no uplink up or degraded; `kept` still holds its route (None: waiting for the first)."""

    family: int
    kept: str | None
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class FailbackWaiting:
    """A better uplink is up but still proving itself (hysteresis)."""

    family: int
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class BalanceChanged:
    family: int
    #: The members sharing new connections now (empty: the selected uplink carries all).
    members: tuple[tuple[str, int], ...]
    changes: tuple[str, ...]
    at: float


@dataclass(frozen=True, slots=True)
class PolicyChanged:
    policy: str
    family: int
    old: str | None
    new: str | None
    fallback: str
    reason: str
    #: The first decision since start or reload (logged quietly).
    first: bool
    at: float


@dataclass(frozen=True, slots=True)
class Renumbered:
    uplink: str
    change: str
    at: float


@dataclass(frozen=True, slots=True)
class Adopted:
    uplink: str
    family: int
    at: float


@dataclass(frozen=True, slots=True)
class FlowsReleased:
    uplink: str
    families: frozenset[int]
    why: str
    mark: int
    mask: int
    released: Released
    at: float


@dataclass(frozen=True, slots=True)
class RouteChangeFailed:
    change: str
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class RouteChangeRecovered:
    change: str
    at: float


@dataclass(frozen=True, slots=True)
class ForeignAppeared:
    foreign: ForeignObject
    at: float


@dataclass(frozen=True, slots=True)
class ForeignGone:
    foreign: ForeignObject
    at: float


@dataclass(frozen=True, slots=True)
class Drained:
    uplink: str
    release: bool
    #: Forced although no other uplink is up in `stranded` (the families left without one).
    stranded: tuple[int, ...]
    at: float


@dataclass(frozen=True, slots=True)
class Undrained:
    uplink: str
    at: float


@dataclass(frozen=True, slots=True)
class HealthUnjudged:
    """An uplink's rounds have judged nothing for `rounds` in a row: its health stands still."""

    uplink: str
    rounds: int
    state: State
    at: float


@dataclass(frozen=True, slots=True)
class HealthJudgedAgain:
    uplink: str
    rounds: int
    at: float


@dataclass(frozen=True, slots=True)
class ProberDied:
    """The task probing an uplink died (it is restarted): until it runs, its health stands still."""

    uplink: str
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class Reloaded:
    source: str
    uplinks: int
    #: Why the new nft table could not be checked (routing was applied anyway), or "".
    nft_note: str
    #: False when the new config is the running one, value for value.
    changed: bool
    at: float


@dataclass(frozen=True, slots=True)
class ReloadRejected:
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Suspected:
    """Passive health found an up uplink's new connections unanswered: a burst confirms."""

    uplink: str
    evidence: str
    at: float


Event = (
    Transition
    | Suspected
    | SelectionChanged
    | NoUplinkUp
    | FailbackWaiting
    | BalanceChanged
    | PolicyChanged
    | Renumbered
    | Adopted
    | FlowsReleased
    | RouteChangeFailed
    | RouteChangeRecovered
    | ForeignAppeared
    | ForeignGone
    | Drained
    | Undrained
    | HealthUnjudged
    | HealthJudgedAgain
    | ProberDied
    | Reloaded
    | ReloadRejected
)


# Intents: what the daemon is to carry out.


@dataclass(frozen=True, slots=True)
class RouteWork:
    """The network the routes edge is to reconcile: `urgent` first, then the whole plan."""

    config: Config
    plan: NetPlan
    #: The selected defaults that differ from what was last applied: sent before any dump.
    urgent: tuple[Change, ...]
    managed_tables: frozenset[int]
    #: Interface indexes by name, from the dump the plan was made on.
    indexes: Mapping[str, int]
    #: Counts route work: a flow release waits for the work that moved its traffic.
    generation: int = 0


@dataclass(frozen=True, slots=True)
class SteeringWanted:
    """The nft table the nft edge is to make live."""

    config: Config
    steering: Steering


@dataclass(frozen=True, slots=True)
class FlowRelease:
    """Delete the conntrack entries marked for one uplink, in these families (never a flush)."""

    uplink: str
    mark: int
    mask: int
    families: frozenset[int]
    #: The router's own addresses: connections to them came in from the internet and are kept.
    local: frozenset[str]


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    message: str


@dataclass(frozen=True, slots=True)
class DrainCommand:
    uplink: str
    #: Also release its tracked flows (as release_flows does), so they move at once.
    release: bool = False
    #: Even if no other uplink is up in a family it carries.
    force: bool = False


@dataclass(frozen=True, slots=True)
class UndrainCommand:
    uplink: str


Command = DrainCommand | UndrainCommand


class StatusWrite(Enum):
    NONE = 0
    #: Metrics changed (rtt, loss, counts): write within STATUS_METRICS_PERIOD_S.
    SOON = 1
    #: A decision changed: write now.
    NOW = 2


@dataclass(frozen=True, slots=True)
class Intent:
    events: tuple[Event, ...] = ()
    routes: RouteWork | None = None
    #: Dump links and addresses again (the answer is an on_links).
    refresh_links: bool = False
    nft: SteeringWanted | None = None
    releases: tuple[FlowRelease, ...] = ()
    #: Uplinks whose running release no longer holds (it recovered, or carries again).
    cancel_releases: tuple[str, ...] = ()
    status: StatusWrite = StatusWrite.NONE
    #: When the core wants on_tick at the latest (monotonic).
    wake_at: float = float("inf")
    #: The answer to an operator's command (on_command), for the one who asked.
    reply: Reply | None = None
    #: Uplinks whose probers are to confirm a suspicion now: (uplink, trigger).
    bursts: tuple[tuple[str, str], ...] = ()


# The state.


@dataclass(frozen=True, slots=True)
class OwedRelease:
    """release_flows that will run once the uplink carries none of these families."""

    why: str
    #: "down" (cancelled when it is up again), "failback" (cancelled when it carries again) or
    #: "drain" (cancelled when it is undrained).
    kind: str
    families: frozenset[int]
    #: The route work that takes new traffic away from the uplink: the release waits for it
    #: (flows re-established before it would stick to the old path again).
    after: int = 0
    #: When it was owed (monotonic): the longest it waits for the nft steering to follow.
    since: float = 0.0


@dataclass(frozen=True, slots=True)
class RunningRelease:
    why: str
    kind: str
    families: frozenset[int]
    mark: int
    mask: int
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Drain:
    """An operator's drain of one uplink."""

    #: Wall-clock time of the drain (for people; it survives a restart, unlike the monotonic clock).
    since_wall: float
    #: Its tracked flows were released too (`drain --release`).
    release: bool = False


@dataclass(frozen=True, slots=True)
class NftStatus:
    """What the nft edge last reported."""

    #: The steering the table in the kernel carries (None: no table of ours is loaded).
    live: Steering | None = None
    #: The loaded table is the one wanted (config and steering).
    current: bool = False
    #: Why the wanted table does not load (None: it did).
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class AgentState:
    config: Config
    #: Per uplink, its health as a whole (see uplink_health): for an uplink that carries one
    #: family, that family's health itself.
    healths: Mapping[str, Health]
    #: The last link/address dump, by interface name.
    interfaces: Mapping[str, Interface] = dataclasses.field(default_factory=dict)
    #: Per configured family: the selection and why.
    decisions: Mapping[int, Decision] = dataclasses.field(default_factory=dict)
    #: Per policy and family: the uplink its traffic takes, and why.
    policy_decisions: Mapping[str, Mapping[int, Decision]] = dataclasses.field(default_factory=dict)
    steering: Steering = Steering()
    #: (uplink, family) carrying new traffic: selected, balanced, or a policy's.
    carrying: frozenset[tuple[str, int]] = frozenset()
    owed_releases: Mapping[str, OwedRelease] = dataclasses.field(default_factory=dict)
    releasing: Mapping[str, RunningRelease] = dataclasses.field(default_factory=dict)
    #: The selected defaults as last applied, per family (what the fast path compares with).
    applied_defaults: Mapping[int, RouteSpec] = dataclasses.field(default_factory=dict)
    #: (change, error) that failed in the last reconcile, and the back-off.
    route_failures: frozenset[tuple[str, str]] = frozenset()
    retry_delay_s: float = 0.0
    retry_at: float | None = None
    #: When a better uplink finishes its hysteresis (the selection is evaluated again).
    wake_at: float | None = None
    #: When the next full repair of what events may have missed is due.
    resync_at: float = 0.0
    foreign: tuple[ForeignObject, ...] = ()
    #: Tables the agent has used since start (a reload may drop one; its routes then go).
    managed_tables: frozenset[int] = frozenset()
    #: Tracked connections marked for each uplink (None: conntrack is not readable).
    connections: Mapping[str, int] | None = None
    nft: NftStatus = NftStatus()
    #: Probes whose own code raised (a bug, never a failed probe), per uplink since start.
    probe_errors: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: Uplinks an operator took out of selection, balance groups and policies (probes go on).
    drained: Mapping[str, Drain] = dataclasses.field(default_factory=dict)
    #: Rounds in a row in which nothing could be judged, per uplink (its health stands still).
    unjudged: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: The newest route work handed out, and the newest one reconciled.
    routes_planned: int = 0
    routes_done: int = 0
    #: Passive health per uplink, as the conntrack events last showed it.
    passive: Mapping[str, PassiveView] = dataclasses.field(default_factory=dict)
    #: Per family, the health of each uplink that carries it: what that family's selection,
    #: balance group and policies judge by. (Empty: every health is in `healths`.)
    family_healths: Mapping[int, Mapping[str, Health]] = dataclasses.field(default_factory=dict)

    def selected(self, family: int) -> str | None:
        decision = self.decisions.get(family)
        return decision.selected if decision is not None else None

    def healths_for(self, family: int) -> Mapping[str, Health]:
        """The healths this family's decisions judge by."""
        return self.family_healths.get(family, self.healths)

    def uplink_healths(self, name: str) -> dict[int, Health]:
        """An uplink's health per family it carries (an uplink a reload removed: none)."""
        uplink = _uplink(self.config, name)
        if uplink is None:
            return {}
        found = {f: self.healths_for(f).get(name) for f in health_families(uplink)}
        return {f: h for f, h in found.items() if h is not None}


def with_healths(state: AgentState, name: str, healths: Mapping[int, Health]) -> AgentState:
    """The state with these family healths of one uplink, and its health as a whole."""
    family_healths = dict(state.family_healths)
    for family, health in healths.items():
        family_healths[family] = {**family_healths.get(family, {}), name: health}
    merged = {**state.uplink_healths(name), **healths}
    whole = uplink_health([merged[f] for f in sorted(merged)])
    return evolve(state, healths={**state.healths, name: whole}, family_healths=family_healths)


def _family_healths(
    config: Config, healths: Mapping[str, Mapping[int, Health]]
) -> tuple[dict[str, Health], dict[int, dict[str, Health]]]:
    """(healths, family_healths) for AgentState from each uplink's healths per family."""
    whole = {name: uplink_health([h[f] for f in sorted(h)]) for name, h in healths.items()}
    per_family: dict[int, dict[str, Health]] = {f: {} for f in config.families or (4,)}
    for name, by_family in healths.items():
        for family, health in by_family.items():
            per_family.setdefault(family, {})[name] = health
    return whole, per_family


def next_wake(state: AgentState) -> float:
    """The latest time the core must be ticked: hysteresis end, a retry, the resync, and
    the end of a release's wait for the nft steering."""
    times = [t for t in (state.wake_at, state.retry_at) if t is not None]
    times += [owed.since + RELEASE_STEERING_WAIT_S for owed in state.owed_releases.values()]
    return min([state.resync_at, *times])


def _finish(state: AgentState, intent: Intent) -> tuple[AgentState, Intent]:
    cancels = tuple(
        name
        for name, running in state.releasing.items()
        if not running.cancelled and not _release_still_wanted(state, name, running)
    )
    if cancels:
        releasing = dict(state.releasing)
        for name in cancels:
            releasing[name] = evolve(releasing[name], cancelled=True)
        state = evolve(state, releasing=releasing)
    return state, evolve(intent, cancel_releases=intent.cancel_releases + cancels, wake_at=next_wake(state))


def start_agent(
    config: Config,
    interfaces: Mapping[str, Interface],
    routes: Sequence[RouteEntry],
    previous: PreviousRun | None,
    boot_id: str | None,
    now: float,
    drained: Mapping[str, Drain] | None = None,
) -> tuple[AgentState, Intent]:
    """The state at start: adopt what a previous run left, owe what it owed, keep its
    drains, then take the first link dump as any later one."""
    adopted = adoptable(config, interfaces, routes)
    by_uplink: dict[str, dict[int, Health]] = {}
    for uplink in config.uplinks:
        families = health_families(uplink)
        owes = owes_hysteresis(previous, uplink.name, boot_id, config.agent.hysteresis_s, now)
        by_uplink[uplink.name] = {}
        for family in families:
            health = initial_health(uplink, now, family if len(families) > 1 else None)
            # A family is adopted on its own: the previous run's IPv6 route says nothing of IPv4.
            adopted_here = (
                adopted.get(family) == uplink.name if len(families) > 1 else uplink.name in adopted.values()
            )
            if adopted_here and not owes:
                health = evolve(health, state=State.UP, reason="adopted the route a previous run left")
            elif owes:
                # It failed before the restart, or was still proving itself:
                # it owes the hysteresis again (a restart must not shortcut it).
                health = evolve(
                    health, state=State.DOWN, reason="failed in the previous run", has_failed=True
                )
            by_uplink[uplink.name][family] = health
    healths, family_healths = _family_healths(config, by_uplink)
    names = {iface.index: name for name, iface in interfaces.items()}
    applied = {
        # What the selection table holds now: the fast path must not re-send it (no flap).
        route.family: RouteSpec(route.table, names[route.oif], route.gateway, route.family)
        for route in routes
        if route.table == config.agent.default_table and route.oif in names and route.dst is None
    }
    state = AgentState(
        config,
        healths,
        decisions={f: Decision(adopted.get(f), "starting") for f in config.families},
        applied_defaults=applied,
        managed_tables=config.tables,
        resync_at=now + resync_period_s(config),
        drained={n: d for n, d in (drained or {}).items() if _uplink(config, n) is not None},
        family_healths=family_healths,
    )
    events = tuple(
        Adopted(name, family, now)
        for family, name in sorted(adopted.items())
        if state.healths_for(family)[name].state is State.UP
    )
    state, intent = on_links(state, interfaces, now)
    return state, evolve(intent, events=events + intent.events, nft=SteeringWanted(config, state.steering))


def on_round(state: AgentState, result: RoundResult, now: float) -> tuple[AgentState, Intent]:
    """A probe round finished: fold it into the uplink's health; decide again on a transition."""
    health = state.healths.get(result.uplink)
    uplink = _uplink(state.config, result.uplink)
    if health is None or uplink is None:
        return state, Intent(wake_at=next_wake(state))  # the uplink left with a reload meanwhile
    if result.errors:
        errors = dict(state.probe_errors)
        errors[result.uplink] = errors.get(result.uplink, 0) + result.errors
        state = evolve(state, probe_errors=errors)
    state, unjudged = _count_unjudged(state, result, uplink.check.fall, now)
    hysteresis = agent_hysteresis(state.config.agent)
    families = health_families(uplink)
    if len(families) == 1:
        # with_healths, unrolled for the common case (every round of every uplink): one
        # family's health is the uplink's health as a whole.
        updated, transitions = observe_round(health, result, uplink.check, now, hysteresis)
        family_healths = dict(state.family_healths)
        family_healths[families[0]] = {**family_healths.get(families[0], {}), result.uplink: updated}
        whole = {**state.healths, result.uplink: updated}
        state = evolve(state, healths=whole, family_healths=family_healths)
    else:
        # Each family is judged on its own targets: its own fall/rise, window and reasons.
        healths = state.uplink_healths(result.uplink)
        transitions = []
        for family, part in split_round(result, families).items():
            if family in healths:
                healths[family], changed = observe_round(healths[family], part, uplink.check, now, hysteresis)
                transitions += changed
        state = with_healths(state, result.uplink, healths)
    if not transitions:
        status = StatusWrite.NOW if unjudged else StatusWrite.SOON
        return state, Intent(unjudged, status=status, wake_at=next_wake(state))
    state = _owe_on_transitions(state, transitions, now)
    state, events = _decide(state, now)
    state, work = _route_work(state)
    intent = Intent(
        (*transitions, *unjudged, *events), routes=work, nft=_steering_wanted(state), status=StatusWrite.NOW
    )
    return _finish(state, intent)


def on_late(
    state: AgentState, uplink: str, seq: int, rtt_ms: float, now: float, family: int | None = None
) -> tuple[AgentState, Intent]:
    """A reply came after its probe's adaptive timeout: late, not lost, in the quality window
    of its target's `family` (None: of every family the uplink carries)."""
    healths = state.uplink_healths(uplink)
    if not healths:
        return state, Intent(wake_at=next_wake(state))
    updated = {f: observe_late(h, seq, rtt_ms) for f, h in healths.items() if family in (None, f)}
    state = with_healths(state, uplink, updated)
    return state, Intent(status=StatusWrite.SOON, wake_at=next_wake(state))


def on_suspect(state: AgentState, suspicion: Suspicion, now: float) -> tuple[AgentState, Intent]:
    """Passive health suspects an uplink: confirm with a burst, if it is up and probed.
    Suspicion alone never changes a state or a selection."""
    healths = {
        f: h
        for f, h in state.uplink_healths(suspicion.uplink).items()
        if h.state is not State.DOWN and h.link_usable
    }
    if not healths:
        return state, Intent(wake_at=next_wake(state))
    updated = {f: evolve(h, suspicion=suspicion.evidence, suspected_at=now) for f, h in healths.items()}
    state = with_healths(state, suspicion.uplink, updated)
    return state, Intent(
        (Suspected(suspicion.uplink, suspicion.evidence, now),),
        bursts=((suspicion.uplink, "after passive suspicion"),),
        status=StatusWrite.NOW,
        wake_at=next_wake(state),
    )


def on_links(state: AgentState, interfaces: Mapping[str, Interface], now: float) -> tuple[AgentState, Intent]:
    """A fresh link/address dump: renumberings, carrier and address losses at once; decide; reconcile."""
    events: list[Event] = []
    transitions: list[Transition] = []
    for uplink in state.config.uplinks:
        healths = state.uplink_healths(uplink.name)
        before, after = state.interfaces.get(uplink.interface), interfaces.get(uplink.interface)
        if before is not None and after is not None:
            renumbered = describe_renumbering(uplink, before, after)
            if renumbered:
                # DHCP/RA renewed with new values: the plan rebuilds the uplink's
                # table and rules in this same reconcile. A round sent from the old
                # address proves nothing about the new one.
                events.append(Renumbered(uplink.name, renumbered, now))
                healths = {f: evolve(h, last_round_at=max(h.last_round_at, now)) for f, h in healths.items()}
        # Carrier loss (or a vanished interface) makes every family down at once; a lost
        # address or gateway only its own family.
        split = len(healths) > 1
        for family, health in healths.items():
            link = link_observation(uplink, after, family if split else None)
            healths[family], changed = observe_link(health, link, now)
            transitions += changed
        state = with_healths(state, uplink.name, healths)
    status = StatusWrite.NOW if events or transitions else StatusWrite.NONE
    if status is StatusWrite.NONE and interfaces != state.interfaces:
        status = StatusWrite.SOON
    state = evolve(state, interfaces=dict(interfaces))
    state = _owe_on_transitions(state, transitions, now)
    state, decided = _decide(state, now)
    if decided:
        status = StatusWrite.NOW
    state, work = _route_work(state)
    intent = Intent(
        (*transitions, *events, *decided), routes=work, nft=_steering_wanted(state), status=status
    )
    return _finish(state, intent)


def on_routes(
    state: AgentState,
    work: RouteWork,
    failed: Sequence[tuple[Change, str]],
    rules: Sequence[RuleEntry],
    routes: Sequence[RouteEntry],
    now: float,
) -> tuple[AgentState, Intent]:
    """The routes edge reconciled `work`; `rules`/`routes` is the dump it compared with.

    A failed change is reported once and retried with a doubling back-off; objects of
    others that appeared are reported once; owed flow releases start now, after the
    route change they re-establish over.
    """
    events: list[Event] = []
    failures = frozenset((change.describe(), error) for change, error in failed)
    for what, error in sorted(failures - state.route_failures):
        events.append(RouteChangeFailed(what, error, now))
    failing_now = {what for what, _ in failures}
    for what in sorted({what for what, _ in state.route_failures} - failing_now):
        events.append(RouteChangeRecovered(what, now))
    if failures:
        delay = min(max(state.retry_delay_s * 2, 0.5), RESYNC_PERIOD_S)
        retry: tuple[float, float | None] = (delay, now + delay)
    else:
        retry = (0.0, None)
    # A default whose replace failed is not live: the next plan sends it again.
    failed_routes = {change.route for change, _ in failed if change.route is not None}
    applied = {r.family: r for r in work.plan.default_routes if r not in failed_routes}
    foreign = find_foreign(state.config, rules, routes)
    events += [ForeignAppeared(f, now) for f in foreign if f not in state.foreign]
    events += [ForeignGone(f, now) for f in state.foreign if f not in foreign]
    state = evolve(
        state,
        route_failures=failures,
        retry_delay_s=retry[0],
        retry_at=retry[1],
        applied_defaults={**state.applied_defaults, **applied},
        foreign=foreign,
        routes_done=max(state.routes_done, work.generation),
    )
    state, releases = _start_releases(state, now)
    status = StatusWrite.NOW if events else StatusWrite.NONE
    return _finish(state, Intent(tuple(events), releases=releases, status=status))


def resync_period_s(config: Config) -> float:
    """How often the full repair runs: its cost grows with the uplinks, its rate must not."""
    scaled = RESYNC_PERIOD_S * max(1.0, len(config.uplinks) / RESYNC_UPLINKS)
    return min(scaled, RESYNC_PERIOD_MAX_S)


def on_tick(state: AgentState, now: float) -> tuple[AgentState, Intent]:
    """Time passed: a hysteresis ended, a retry or the periodic repair is due."""
    intent = Intent()
    if state.wake_at is not None and now >= state.wake_at:
        state, events = _decide(state, now)
        status = StatusWrite.NOW if events else StatusWrite.NONE
        state, work = _route_work(state)
        intent = Intent(events, routes=work, nft=_steering_wanted(state), status=status)
    if state.retry_at is not None and now >= state.retry_at:
        # A retry starts from a fresh dump: what failed may have been an interface gone meanwhile.
        state = evolve(state, retry_at=None)
        intent = evolve(intent, refresh_links=True)
    if now >= state.resync_at:
        state = evolve(state, resync_at=now + resync_period_s(state.config))
        intent = evolve(intent, refresh_links=True)
    state, releases = _start_releases(state, now)  # a release's wait for the steering may be over
    return _finish(state, evolve(intent, releases=intent.releases + releases))


def on_routes_failed(state: AgentState, error: str, now: float) -> tuple[AgentState, Intent]:
    """A dump or a reconcile raised (netlink trouble): reported once, retried with back-off."""
    what = "netlink reconcile"
    failures = frozenset({(what, error)})
    events: tuple[Event, ...] = ()
    if failures != state.route_failures:
        events = (RouteChangeFailed(what, error, now),)
    delay = min(max(state.retry_delay_s * 2, 0.5), RESYNC_PERIOD_S)
    state = evolve(state, route_failures=failures, retry_delay_s=delay, retry_at=now + delay)
    return _finish(state, Intent(events, status=StatusWrite.NOW if events else StatusWrite.NONE))


def on_task_died(state: AgentState, task: str, error: str, now: float) -> tuple[AgentState, Intent]:
    """A task died (the supervisor logged its traceback and restarts it). What it was doing
    is lost: the routes are dumped and reconciled again, the nft table is wanted again,
    releases the conntrack edge was running are owed again, and a prober's death is said."""
    state = evolve(state, applied_defaults={})
    events: tuple[Event, ...] = ()
    if task.startswith("prober "):
        events = (ProberDied(task.removeprefix("prober "), error, now),)
    if task == "conntrack" and state.releasing:
        owed = dict(state.owed_releases)
        for name, running in state.releasing.items():
            was = owed.get(name)
            families = running.families | (was.families if was is not None else frozenset())
            owed[name] = OwedRelease(running.why, running.kind, families, 0, now)
        state = evolve(state, owed_releases=owed, releasing={})
    status = StatusWrite.NOW if events else StatusWrite.NONE
    return _finish(state, Intent(events, refresh_links=True, nft=_steering_wanted(state), status=status))


def on_reload_refused(state: AgentState, reason: str, now: float) -> tuple[AgentState, Intent]:
    """The new config does not parse or validate: the running one stays in service."""
    return _finish(state, Intent((ReloadRejected(reason, now),)))


def on_reload(
    state: AgentState,
    new: Config,
    rules: Sequence[RuleEntry],
    routes: Sequence[RouteEntry],
    nft_note: str,
    now: float,
) -> tuple[AgentState, Intent]:
    """A new config (already parsed and valid), with a dump of rules and routes to judge
    its collisions by, and why its nft table could not be checked ("" if it could).

    Refused when it moves ids or collides with others' objects it brings into play;
    objects the running agent already lives with are no reason. Health, counters and
    drains carry over (keepalived style) unless an uplink now means another path.
    """
    old = state.config
    problem = reload_problem(old, new) or "; ".join(reload_collisions(old, new, rules, routes))
    if problem:
        return _finish(state, Intent((ReloadRejected(problem, now),)))
    by_uplink: dict[str, dict[int, Health]] = {}
    before = {u.name: u for u in old.uplinks}
    for uplink in new.uplinks:
        was = before.get(uplink.name)
        healths_before = state.uplink_healths(uplink.name)
        same_path = was is not None and (was.interface, was.gateway, was.gateway6, was.families) == (
            uplink.interface,
            uplink.gateway,
            uplink.gateway6,
            uplink.families,
        )
        families = health_families(uplink)
        by_uplink[uplink.name] = {
            f: remap_health(healths_before[f], uplink.check)
            if same_path and f in healths_before
            else initial_health(uplink, now, f if len(families) > 1 else None)
            for f in families
        }
    healths, family_healths = _family_healths(new, by_uplink)
    release_flows = {u.name: u.release_flows for u in new.uplinks}
    # The nft table is re-installed whole for the new config (per-host placements
    # start afresh). Until the next decision it keeps the steering that still applies.
    steering = carry_steering(state.steering, new)
    state = evolve(
        state,
        config=new,
        healths=healths,
        family_healths=family_healths,
        decisions={f: d for f, d in state.decisions.items() if f in new.families},
        policy_decisions={
            name: {f: d for f, d in decisions.items() if f in steering.policies.get(name, {})}
            for name, decisions in state.policy_decisions.items()
            if name in steering.policies
        },
        steering=steering,
        owed_releases={
            n: owed
            for n, owed in state.owed_releases.items()
            if f"on_{owed.kind}" in release_flows.get(n, ()) or (owed.kind == "drain" and n in release_flows)
        },
        managed_tables=state.managed_tables | new.tables,
        drained={n: d for n, d in state.drained.items() if n in release_flows},
    )
    changed = evolve(old, source=new.source) != new
    event = Reloaded(new.source, len(new.uplinks), nft_note, changed, now)
    return _finish(
        state,
        Intent((event,), refresh_links=True, nft=SteeringWanted(new, steering), status=StatusWrite.NOW),
    )


def on_released(state: AgentState, uplink: str, released: Released, now: float) -> tuple[AgentState, Intent]:
    """A release finished (or was cancelled); what is still owed starts now."""
    running = state.releasing.get(uplink)
    releasing = {n: r for n, r in state.releasing.items() if n != uplink}
    state = evolve(state, releasing=releasing)
    events: tuple[Event, ...] = ()
    if running is not None:
        events = (
            FlowsReleased(uplink, running.families, running.why, running.mark, running.mask, released, now),
        )
    state, releases = _start_releases(state, now)
    return _finish(state, Intent(events, releases=releases))


def on_command(state: AgentState, command: Command, now: float, wall_now: float) -> tuple[AgentState, Intent]:
    """An operator's drain or undrain; the reply says what happened, or why not."""
    uplink = _uplink(state.config, command.uplink)
    if uplink is None:
        names = ", ".join(u.name for u in state.config.uplinks)
        return _finish(
            state, Intent(reply=Reply(False, f"no uplink named {command.uplink!r} (uplinks: {names})"))
        )
    name = uplink.name
    if isinstance(command, UndrainCommand):
        if name not in state.drained:
            return _finish(state, Intent(reply=Reply(True, f"{name} is not drained")))
        owed = {n: o for n, o in state.owed_releases.items() if not (n == name and o.kind == "drain")}
        drained = {n: d for n, d in state.drained.items() if n != name}
        state = evolve(state, drained=drained, owed_releases=owed)
        events: tuple[Event, ...] = (Undrained(name, now),)
        message = f"{name} is undrained: it takes traffic again as its priority and health say"
    else:
        was = state.drained.get(name)
        if was is not None and (was.release or not command.release):
            return _finish(state, Intent(reply=Reply(True, f"{name} is already drained")))
        # Already drained (now with --release too): the traffic has left it, nothing to refuse.
        stranded = (
            ()
            if was is not None
            else tuple(
                f
                for f in uplink.families
                if state.healths_for(f)[name].state is not State.DOWN
                and not any(
                    u.name != name and state.healths_for(f)[u.name].state is not State.DOWN
                    for u in _candidates(state, f)
                )
            )
        )
        if stranded and not command.force:
            which = "/".join(FAMILY_TITLE[f] for f in stranded)
            return _finish(
                state,
                Intent(
                    reply=Reply(
                        False,
                        f"refused: {name} is the last uplink up for {which}; drained, it would carry no new "
                        f"traffic, yet nothing else could: the agent would keep its route (no uplink up) and "
                        "traffic would go on leaving through it. Add --force to drain it anyway",
                    )
                ),
            )
        drain = Drain(was.since_wall if was is not None else wall_now, command.release)
        state = evolve(state, drained={**state.drained, name: drain})
        if command.release:
            owed = dict(state.owed_releases)
            owed[name] = OwedRelease(
                "it was drained", "drain", frozenset(uplink.families), state.routes_planned + 1, now
            )
            state = evolve(state, owed_releases=owed)
        events = (Drained(name, command.release, stranded, now),)
        if stranded:
            which = "/".join(FAMILY_TITLE[f] for f in stranded)
            message = (
                f"{name} is drained (forced): no other uplink is up for {which}, so its route stays "
                "until one is; its probes go on"
            )
        else:
            message = f"{name} is drained: new traffic leaves through other uplinks; its probes go on"
        message += "; its tracked flows are released" if command.release else "; its established flows stay"
    state, decided = _decide(state, now)
    state, work = _route_work(state)
    intent = Intent(
        (*events, *decided),
        routes=work,
        nft=_steering_wanted(state),
        status=StatusWrite.NOW,
        reply=Reply(True, message),
    )
    return _finish(state, intent)


def on_counts(state: AgentState, counts: Mapping[str, int] | None) -> tuple[AgentState, Intent]:
    """Tracked connections per uplink (None: conntrack cannot be read)."""
    if counts == state.connections:
        return state, Intent(wake_at=next_wake(state))
    state = evolve(state, connections=None if counts is None else dict(counts))
    return state, Intent(status=StatusWrite.SOON, wake_at=next_wake(state))


def on_nft(state: AgentState, report: NftStatus, now: float) -> tuple[AgentState, Intent]:
    """What the nft edge reports of the live table (for status; routing never waits on it)."""
    if report == state.nft:
        return state, Intent(wake_at=next_wake(state))
    state = evolve(state, nft=report)
    state, releases = _start_releases(state, now)  # a release may have waited for this steering
    return _finish(state, Intent(releases=releases, status=StatusWrite.NOW))


def probe_source(state: AgentState, name: str) -> ProbeSource | None:
    """Where an uplink's probes leave from now, or None while it cannot carry traffic."""
    uplink = _uplink(state.config, name)
    health = state.healths.get(name)
    if uplink is None or health is None or not health.link_usable:
        return None
    interface = state.interfaces.get(uplink.interface)
    if interface is None:
        return None
    # A family the uplink cannot route now (no address, no gateway) is not probed.
    return ProbeSource(
        interface.index,
        interface.address if routable(uplink, interface, 4) else None,
        interface.address6 if routable(uplink, interface, 6) else None,
        uplink_gateway(uplink, interface, 4),
        uplink_gateway(uplink, interface, 6),
    )


#: The uplinks of the newest config asked, by name: every probe round looks its uplink up,
#: and a walk of the list was a measurable share of a round at 250 uplinks. (A memo of a
#: frozen value: it changes what is computed, never the answer.)
_uplinks_by_name: tuple[Config | None, dict[str, UplinkConfig]] = (None, {})


def _uplink(config: Config, name: str) -> UplinkConfig | None:
    global _uplinks_by_name
    indexed, by_name = _uplinks_by_name
    if indexed is not config:
        by_name = {u.name: u for u in config.uplinks}
        _uplinks_by_name = (config, by_name)
    return by_name.get(name)


def _route_work(state: AgentState) -> tuple[AgentState, RouteWork]:
    """The route work for the state's decisions, numbered (see OwedRelease.after)."""
    state = evolve(state, routes_planned=state.routes_planned + 1)
    selected = {f: state.selected(f) for f in state.config.families}
    plan = plan_network(state.config, state.interfaces, selected, lan_routed(state))
    # Fast path: a new selection is one replace, sent before the verifying dumps.
    urgent = tuple(
        Change("replace_route", route=route)
        for route in plan.default_routes
        if state.applied_defaults.get(route.family) != route
    )
    indexes = {name: iface.index for name, iface in state.interfaces.items()}
    return state, RouteWork(state.config, plan, urgent, state.managed_tables, indexes, state.routes_planned)


def lan_routed(state: AgentState) -> frozenset[str]:
    """The uplinks whose LAN prefixes leave through them now: all with lan_prefix_failover
    "none"; with "nat66" those usable for IPv6 (not down, routable, not drained). The others'
    prefixes take the IPv6 selection and are masqueraded there (see _render_nat)."""
    routed = set()
    for uplink in state.config.uplinks:
        if not uplink.lan_prefixes6:
            continue
        health = state.healths_for(6).get(uplink.name)
        if uplink.lan_prefix_failover == "none" or (
            health is not None
            and health.state is not State.DOWN
            and routable(uplink, state.interfaces.get(uplink.interface), 6)
            and uplink.name not in state.drained
        ):
            routed.add(uplink.name)
    return frozenset(routed)


def _steering_wanted(state: AgentState) -> SteeringWanted:
    return SteeringWanted(state.config, state.steering)


def _decide(state: AgentState, now: float) -> tuple[AgentState, tuple[Event, ...]]:
    """Select per family, form balance groups and place policies; the events say what changed."""
    config = state.config
    hysteresis_s = agent_hysteresis(config.agent)
    events: list[Event] = []
    decisions = dict(state.decisions)
    policy_decisions = {name: dict(d) for name, d in state.policy_decisions.items()}
    balance: dict[int, tuple[tuple[str, int], ...]] = {}
    wakes: list[float] = []
    unavailable = {name: "is drained by the operator" for name in state.drained}
    for family in config.families:
        # Each family judges by its own healths: a dead IPv6 moves IPv6 only.
        healths = state.healths_for(family)
        candidates = _candidates(state, family)
        previous = decisions.get(family, Decision(None, "starting"))
        decision = select(healths, candidates, previous.selected, hysteresis_s, now, unavailable)
        events += _selection_events(family, previous, decision, healths, now)
        decisions[family] = decision
        group = balance_group(healths, candidates, decision.selected, hysteresis_s, now)
        balance[family] = group.members
        wakes += [w for w in (decision.wake_at, group.wake_at) if w is not None]
        for policy in config.policies:
            if family not in policy.match.families:
                continue
            chosen = policy_decisions.setdefault(policy.name, {})
            before = chosen.get(family)
            current = before.selected if before is not None else None
            placed = select_for_policy(policy, healths, candidates, current, hysteresis_s, now, unavailable)
            if before is None or before.selected != placed.selected:
                events.append(
                    PolicyChanged(
                        policy.name,
                        family,
                        current,
                        placed.selected,
                        policy.fallback,
                        placed.reason,
                        before is None,
                        now,
                    )
                )
            chosen[family] = placed
            if placed.wake_at is not None:
                wakes.append(placed.wake_at)
    steering = Steering(
        balance,
        {name: {f: d.selected for f, d in chosen.items()} for name, chosen in policy_decisions.items()},
    )
    events += _balance_events(config, state, state.steering, steering, now)
    carrying = {(d.selected, f) for f, d in decisions.items() if d.selected is not None}
    carrying |= {(n, f) for f, members in steering.balance.items() for n, _ in members}
    carrying |= {(n, f) for chosen in steering.policies.values() for f, n in chosen.items() if n is not None}
    owed = dict(state.owed_releases)
    for name, family in sorted(state.carrying - carrying):
        uplink, health = _uplink(config, name), state.healths_for(family).get(name)
        if (
            uplink is not None
            and health is not None
            and health.state is not State.DOWN
            and "on_failback" in uplink.release_flows
        ):
            # It stopped carrying new traffic while still usable: its flows move to the new path.
            was = owed.get(name)
            families = (was.families if was is not None else frozenset()) | {family}
            owed[name] = OwedRelease(
                "it no longer carries new traffic", "failback", families, state.routes_planned + 1, now
            )
    state = evolve(
        state,
        decisions=decisions,
        policy_decisions=policy_decisions,
        steering=steering,
        carrying=frozenset(carrying),
        owed_releases=owed,
        wake_at=min(wakes) if wakes else None,
    )
    return state, tuple(events)


def _candidates(state: AgentState, family: int) -> list[UplinkConfig]:
    """The uplinks that may carry this family now: they can route it, and are not drained."""
    return [
        u
        for u in state.config.uplinks
        if family in u.families
        and routable(u, state.interfaces.get(u.interface), family)
        and u.name not in state.drained
    ]


def _selection_events(
    family: int, previous: Decision, decision: Decision, healths: Mapping[str, Health], now: float
) -> list[Event]:
    if decision.selected != previous.selected:
        old = healths.get(previous.selected) if previous.selected is not None else None
        # A failover: the old uplink failed in this very step (not a recovery after an outage).
        failed_now = (
            old is not None and old.state is not State.UP and old.since == now and not previous.stranded
        )
        evidence = old.failing_since if failed_now and old is not None else None
        return [
            SelectionChanged(family, previous.selected, decision.selected, decision.reason, now, evidence)
        ]
    if decision.stranded and not previous.stranded:
        return [NoUplinkUp(family, decision.selected, decision.reason, now)]
    if decision.wake_at is not None and decision.wake_at != previous.wake_at:
        return [FailbackWaiting(family, decision.reason, now)]
    return []


def _balance_events(
    config: Config, state: AgentState, before: Steering, after: Steering, now: float
) -> list[Event]:
    events: list[Event] = []
    for family in config.families:
        healths = state.healths_for(family)
        old, new = (dict(s.balance.get(family, ())) for s in (before, after))
        old, new = (members if len(members) > 1 else {} for members in (old, new))
        if old == new:
            continue
        changes = [f"{n} joined" for n in new if n not in old]
        changes += [
            f"{n} left ({healths[n].state.value if n in healths else 'removed'})" for n in old if n not in new
        ]
        events.append(BalanceChanged(family, tuple(new.items()), tuple(changes), now))
    return events


def _owe_on_transitions(state: AgentState, transitions: Iterable[Transition], now: float) -> AgentState:
    # The route work that follows these transitions (made in the same step) moves the
    # traffic away: its number is the next one.
    owed = dict(state.owed_releases)
    for t in transitions:
        uplink = _uplink(state.config, t.uplink)
        if uplink is None:
            continue
        # A family of an uplink that carries several owes (or is let off) its own flows only.
        which = frozenset(uplink.families) if t.family is None else frozenset({t.family})
        was = owed.get(t.uplink)
        if t.new is State.DOWN and "on_down" in uplink.release_flows:
            families = which | (was.families if was is not None and was.kind == "down" else frozenset())
            owed[t.uplink] = OwedRelease("it went down", "down", families, state.routes_planned + 1, now)
        elif t.new is State.UP and was is not None:
            # Back before its flows were released.
            if was.families - which and was.kind == "down":
                owed[t.uplink] = evolve(was, families=was.families - which)
            else:
                owed.pop(t.uplink, None)
    return evolve(state, owed_releases=owed)


def _steered_to(live: Steering | None, name: str, families: frozenset[int]) -> bool:
    """Whether the live nft table still places new connections of these families on `name`."""
    if live is None:
        return False
    for family in families:
        members = live.balance.get(family, ())
        if len(members) > 1 and name in {n for n, _ in members}:
            return True
        if any(chosen.get(family) == name for chosen in live.policies.values()):
            return True
    return False


def _count_unjudged(
    state: AgentState, result: RoundResult, fall: int, now: float
) -> tuple[AgentState, tuple[Event, ...]]:
    """Rounds in a row with nothing to judge (the probes' own code raised): after `fall` of
    them the uplink's health stands still, and that is said once, loudly."""
    name = result.uplink
    before = state.unjudged.get(name, 0)
    after = before + 1 if result.inconclusive else 0
    events: tuple[Event, ...] = ()
    if after == fall:
        events = (HealthUnjudged(name, after, state.healths[name].state, now),)
    elif before >= fall and after == 0:
        events = (HealthJudgedAgain(name, before, now),)
    if after != before:
        state = evolve(state, unjudged={**state.unjudged, name: after})
    return state, events


def _release_still_wanted(state: AgentState, name: str, running: RunningRelease) -> bool:
    if running.kind == "drain":
        return name in state.drained
    if running.kind == "down":
        healths = state.uplink_healths(name)
        return not healths or any(
            f not in healths or healths[f].state is not State.UP
            for f in (running.families if len(healths) > 1 else healths)
        )
    return not any((name, f) in state.carrying for f in running.families)


def _start_releases(state: AgentState, now: float) -> tuple[AgentState, tuple[FlowRelease, ...]]:
    """Start what is owed, one release per uplink at a time, in the families it no longer carries.

    A family it still carries new traffic in (nothing better is up) keeps its flows: they
    would come straight back. It is released once it carries that family no more, once the
    route work that moved its traffic is in place, and once the live nft table no longer
    steers new connections to it (for at most RELEASE_STEERING_WAIT_S: a hung nft must
    not keep flows on a dead path for ever).
    """
    owed = dict(state.owed_releases)
    releasing = dict(state.releasing)
    releases: list[FlowRelease] = []
    local = frozenset(
        address
        for interface in state.interfaces.values()
        for address in (interface.address, interface.address6)
        if address is not None
    )
    mask = state.config.agent.mark_mask
    for name, due in sorted(state.owed_releases.items()):
        uplink = _uplink(state.config, name)
        if uplink is None or (due.kind != "drain" and not uplink.release_flows):  # removed, or not asked for
            del owed[name]
            continue
        if name in releasing or due.after > state.routes_done:
            continue  # one at a time; and only over the new routes
        families = frozenset(f for f in due.families if (name, f) not in state.carrying)
        if not families:
            continue
        if _steered_to(state.nft.live, name, families) and now < due.since + RELEASE_STEERING_WAIT_S:
            continue
        if families == due.families:
            del owed[name]
        else:
            owed[name] = evolve(due, families=due.families - families)
        releasing[name] = RunningRelease(due.why, due.kind, families, uplink.mark, mask)
        releases.append(FlowRelease(name, uplink.mark, mask, families, local))
    state = evolve(state, owed_releases=owed, releasing=releasing)
    return state, tuple(releases)


# Probes ######################################################################
#
# Owns the probe sockets, each bound to its uplink's interface and address, and
# one task per uplink that sends a round every interval and posts its result.
# A network error is a failed probe; an exception of the agent's own code is a
# bug: logged with its traceback and reported as inconclusive, never as failed.


class ProbeFailure(Exception):
    """A protocol-level failure the probe itself detects (not an HTTP answer, a stray reply)."""


def _parse_icmp(packet: bytes) -> tuple[int, str, int, int] | None:
    """(type, target, id, seq) of an ICMP echo reply or of the echo an ICMP error quotes.

    Raw IPv4 sockets deliver the IP header. For an echo reply the target is
    the sender; for an error (destination unreachable, time exceeded) it is
    the destination the quoted echo request was for.
    """
    if len(packet) < 20:
        return None
    header_len = (packet[0] & 0x0F) * 4
    if len(packet) < header_len + 8:
        return None
    icmp_type = packet[header_len]
    if icmp_type == 0:  # echo reply
        ident, seq = struct.unpack_from("!HH", packet, header_len + 4)
        return 0, socket.inet_ntoa(packet[12:16]), ident, seq
    if icmp_type in (3, 11):  # destination unreachable, time exceeded
        inner = header_len + 8
        if len(packet) < inner + 20:
            return None
        inner_len = (packet[inner] & 0x0F) * 4
        if packet[inner + 9] != 1 or len(packet) < inner + inner_len + 8:
            return None
        if packet[inner + inner_len] != 8:  # the quoted packet must be our echo request
            return None
        ident, seq = struct.unpack_from("!HH", packet, inner + inner_len + 4)
        return icmp_type, socket.inet_ntoa(packet[inner + 16 : inner + 20]), ident, seq
    return None


def _parse_icmp6(packet: bytes, sender: str) -> tuple[int, str, int, int] | None:
    """The same for ICMPv6: raw IPv6 sockets deliver no IP header, so the sender comes apart."""
    if len(packet) < 8:
        return None
    icmp_type = packet[0]
    if icmp_type == 129:  # echo reply
        ident, seq = struct.unpack_from("!HH", packet, 4)
        return 0, sender.split("%", 1)[0], ident, seq
    if icmp_type in (1, 3):  # destination unreachable, time exceeded
        inner = 8
        if len(packet) < inner + 40 + 8 or packet[inner + 6] != 58 or packet[inner + 40] != 128:
            return None  # not a quoted echo request without extension headers
        ident, seq = struct.unpack_from("!HH", packet, inner + 44)
        target = socket.inet_ntop(socket.AF_INET6, packet[inner + 24 : inner + 40])
        return (3 if icmp_type == 1 else 11), target, ident, seq
    return None


#: How a probe reports its end: with its result, or with the exception a bug in it raised.
ProbeDone = Callable[[ProbeResult | BaseException], None]


class _Echo:
    """One echo request waiting for its reply (mutable: it lives a few hundred ms)."""

    __slots__ = ("key", "sent_at", "deadline", "done", "judge_lateness", "on_late", "late_until")

    def __init__(
        self,
        key: tuple[str, int],
        sent_at: float,
        deadline: float,
        done: ProbeDone,
        judge_lateness: bool,
        on_late: Callable[[str, int, float], None] | None,
        late_until: float,
    ) -> None:
        self.key = key
        self.sent_at = sent_at
        self.deadline = deadline
        self.done = done
        self.judge_lateness = judge_lateness
        self.on_late = on_late
        #: Until when a reply after the deadline is still taken as late (the ceiling).
        self.late_until = late_until


def icmp_checksum(data: bytes) -> int:
    """RFC 1071's ones' complement sum (an echo request is a few dozen bytes)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


#: The payload of our echo requests (24 bytes, as icmplib's default size was).
ECHO_PAYLOAD: Final = b"multiwan-agent probe\0\0\0\0"


class IcmpEcho:
    """ICMP/ICMPv6 echo through one interface: the one place that knows icmplib.

    icmplib opens the privileged raw socket (and says why it cannot); we build the
    echo requests (an ICMPv6 socket's checksum is the kernel's, an ICMPv4 one's ours),
    send them and read the replies from the event loop, matching them by (target,
    sequence). At 64 uplinks x 3 targets every 500 ms the per-probe cost is what the
    agent's CPU is made of, so a probe is no future and has no timer of its own: it
    reports its end to a callback, and one timer per socket, armed for the earliest
    deadline, expires them all (a heap of deadlines; answered ones are skipped). RTTs
    use the monotonic loop clock, not icmplib's wall-clock times.
    """

    def __init__(self, interface: str, source: str, ident: int, ifindex: int = 0) -> None:
        import icmplib  # imported here so `check` and `status` work without it

        self.interface = interface
        self.source = source
        self.ifindex = ifindex
        self.ident = ident & 0xFFFF
        self.family = ipaddress.ip_address(source).version
        socket_class = icmplib.ICMPv4Socket if self.family == 4 else icmplib.ICMPv6Socket
        try:
            self._socket = socket_class(address=source, privileged=True)
        except icmplib.ICMPLibError as err:  # no privilege, an address gone meanwhile: no OSError of its own
            raise OSError(errno.EINVAL, str(err)) from err
        raw: socket.socket = self._socket._sock
        try:
            raw.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
            raw.setblocking(False)
        except OSError:
            self._socket.close()
            raise
        self._raw = raw
        #: The ones' complement sum of an echo request with sequence 0 (before folding).
        self._partial_sum = (
            ~icmp_checksum(struct.pack("!BBHHH", 8, 0, 0, self.ident, 0) + ECHO_PAYLOAD)
        ) & 0xFFFF
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[tuple[str, int], _Echo] = {}
        #: Probes past their adaptive timeout whose reply may still come before the ceiling.
        self._late: dict[tuple[str, int], _Echo] = {}
        #: (deadline, order, echo) of every probe sent and not yet expired; answered ones stay
        #: until their deadline comes up (or the socket has nothing waiting) and are skipped.
        self._expiry: list[tuple[float, int, _Echo]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self._loop.add_reader(raw.fileno(), self._on_readable)

    @property
    def idle(self) -> bool:
        """No probe is waiting for an answer on this socket."""
        return not self._waiting

    def close(self) -> None:
        """Stop: probes still waiting never report (their prober is stopping or moved on)."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._raw.fileno())
        self._disarm()
        self._waiting.clear()
        self._late.clear()
        self._expiry.clear()
        self._socket.close()

    def _request(self, seq: int) -> bytes:
        if self.family == 6:  # the kernel fills in an ICMPv6 checksum
            return struct.pack("!BBHHH", 128, 0, 0, self.ident, seq) + ECHO_PAYLOAD
        # Only the sequence changes from one request to the next: add it to the sum of the rest.
        total = self._partial_sum + seq
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        return struct.pack("!BBHHH", 8, 0, ~total & 0xFFFF, self.ident, seq) + ECHO_PAYLOAD

    def _address(self, target: str) -> tuple[Any, ...]:
        if self.family == 4:
            return (target, 0)
        address, _, scope = target.partition("%")
        return (address, 0, 0, (self.ifindex or socket.if_nametoindex(scope)) if scope else 0)

    def ping(
        self,
        target: str,
        seq: int,
        timeout_s: float,
        *,
        done: ProbeDone,
        ceiling_s: float | None = None,
        on_late: Callable[[str, int, float], None] | None = None,
        judge_lateness: bool = False,
    ) -> None:
        """Echo `target` ("fe80::1%wan0" for a link-local one) and call `done` with the result:
        on the reply, or at `timeout_s`, when it is lost for reachability. A reply before
        `ceiling_s` is then handed to `on_late(target, seq, rtt_ms)`. With `judge_lateness`,
        a timeout that fired well after its time (the agent was late, not the path) is
        inconclusive. `done` may be called before ping returns (a send that fails)."""
        seq &= 0xFFFF
        plain = target.split("%", 1)[0] if "%" in target else target
        key = (plain, seq)
        sent_at = self._loop.time()
        try:
            self._raw.sendto(self._request(seq), self._address(target))
        except OSError as err:
            done(ProbeResult(plain, False, reason=f"error: {err.strerror or err}"))
            return
        self._late.pop(key, None)
        previous = self._waiting.pop(key, None)
        if previous is not None:  # the sequence wrapped onto a probe still waiting: it is lost
            previous.done(ProbeResult(plain, False, reason="timeout"))
        deadline = sent_at + timeout_s
        late_until = sent_at + ceiling_s if on_late is not None and ceiling_s is not None else deadline
        echo = _Echo(key, sent_at, deadline, done, judge_lateness, on_late, late_until)
        self._waiting[key] = echo
        heapq.heappush(self._expiry, (deadline, next(self._order), echo))
        if deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._expire)
        self._timer_at = at

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf

    def _expire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._on_readable()  # a reply the loop has not read yet is not lost
        if self._closed:
            return
        now = self._loop.time()
        expired: list[_Echo] = []
        # The loop may run a timer a clock tick early: a deadline within a microsecond is due.
        while self._expiry and self._expiry[0][0] <= now + 1e-6:
            echo = heapq.heappop(self._expiry)[2]
            if self._waiting.get(echo.key) is echo:
                del self._waiting[echo.key]
                expired.append(echo)
        if self._late:
            self._late = {key: echo for key, echo in self._late.items() if echo.late_until > now}
        if self._expiry:
            self._arm(self._expiry[0][0])
        for echo in expired:
            lag_s = now - echo.deadline
            if echo.judge_lateness and lag_s > max(AGENT_LATE_S, (echo.deadline - echo.sent_at) / 2):
                result = ProbeResult(
                    echo.key[0], False, reason=f"agent late by {lag_s * 1000:.0f}ms", inconclusive=True
                )
            else:
                result = ProbeResult(echo.key[0], False, reason="timeout")
            if echo.late_until > echo.deadline:
                self._late[echo.key] = echo
            echo.done(result)

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded: the rest waits for the next wake-up
            if self._closed:
                return
            try:
                packet, address = self._raw.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            now = self._loop.time()
            sender = str(address[0])
            parsed = _parse_icmp(packet) if self.family == 4 else _parse_icmp6(packet, sender)
            if parsed is None:
                continue
            icmp_type, target, ident, seq = parsed
            if ident != self.ident:
                continue
            key = (target, seq)
            echo = self._waiting.pop(key, None)
            if echo is None:
                late = self._late.pop(key, None)
                if late is not None and icmp_type == 0 and late.on_late is not None and now < late.late_until:
                    late.on_late(target, seq, (now - late.sent_at) * 1000.0)
                continue
            if icmp_type == 0:
                echo.done(ProbeResult(target, True, rtt_ms=(now - echo.sent_at) * 1000.0))
            else:
                kind = "unreachable" if icmp_type == 3 else "ttl exceeded"
                echo.done(ProbeResult(target, False, reason=f"{kind} (from {sender})"))
            if not self._waiting and not self._late:
                # Nothing more to wait for: spare the read that would only say EAGAIN (a
                # system call and an exception per round); anything else queued on the
                # socket wakes the loop again.
                break
        if not self._waiting and self._expiry and not self._closed:
            # Everything was answered: the heap holds only answered probes; no timer needed.
            self._expiry.clear()
            self._disarm()


def _bound_socket(interface: str, source: str, target: str, kind: socket.SocketKind) -> socket.socket:
    """A non-blocking socket of the target's family, bound to the uplink's interface and address.

    Every probe socket is made here, so no probe can leave by another path.
    """
    family = ADDRESS_FAMILY[ipaddress.ip_address(target).version]
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
        sock.bind((source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def _bound_connection(interface: str, source: str, target: str, port: int) -> socket.socket:
    """A bound TCP socket, connected to target:port."""
    sock = _bound_socket(interface, source, target, socket.SOCK_STREAM)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (target, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def tcp_probe(interface: str, source: str, target: str, port: int, timeout_s: float) -> ProbeResult:
    """A TCP handshake through the interface; refused or reset counts as a failure."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        sock = await asyncio.wait_for(_bound_connection(interface, source, target, port), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return ProbeResult(target, False, reason="timeout", method=Method.TCP)
    except ConnectionRefusedError:
        return ProbeResult(target, False, reason="refused", method=Method.TCP)
    except OSError as err:
        return ProbeResult(target, False, reason=f"error: {err.strerror or err}", method=Method.TCP)
    sock.close()
    return ProbeResult(target, True, rtt_ms=(loop.time() - started) * 1000.0, method=Method.TCP)


def tls_context(check: CheckConfig) -> Any:
    """The TLS context for a check's https probes. Building one reads the whole CA
    bundle (tens of ms): do it once per prober, in a thread, not per probe."""
    import ssl

    context = ssl.create_default_context()
    if not check.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def http_probe(
    interface: str, source: str, target: str, check: CheckConfig, method: Method, context: Any = None
) -> ProbeResult:
    """GET `url` from the target address; the status must be one we expect (a portal's 302 is not)."""
    import ssl

    loop = asyncio.get_running_loop()
    assert check.url is not None
    url = urllib.parse.urlsplit(check.url)
    host = url.hostname or target
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    started = loop.time()
    writer: asyncio.StreamWriter | None = None

    async def exchange() -> int:
        nonlocal writer
        sock = await _bound_connection(interface, source, target, check.port_for(method))
        if method is Method.HTTPS and context is None:
            raise RuntimeError("no TLS context for an https probe")
        if method is Method.HTTP:
            tls = None
        else:
            tls = context
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=tls, server_hostname=host if tls else None
        )
        host_header = url.netloc.rsplit("@", 1)[-1]
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: multiwan-agent/{__version__}\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise ProbeFailure("not an HTTP response")
        return int(parts[1])

    try:
        status = await asyncio.wait_for(exchange(), check.timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return ProbeResult(target, False, reason="timeout", method=method)
    except ConnectionRefusedError:
        return ProbeResult(target, False, reason="refused", method=method)
    except ssl.SSLCertVerificationError as err:
        return ProbeResult(target, False, reason=f"tls: {err.verify_message}", method=method)
    # Only what the network and the peer can cause; anything else is the agent's bug.
    except (OSError, ssl.SSLError, ssl.CertificateError, ProbeFailure) as err:
        return ProbeResult(
            target, False, reason=f"error: {getattr(err, 'strerror', None) or err}", method=method
        )
    finally:
        if writer is not None:
            writer.close()
    rtt_ms = (loop.time() - started) * 1000.0
    expected = status in check.expect_status if check.expect_status else 200 <= status < 300
    if not expected:
        return ProbeResult(target, False, reason=f"status {status}", method=method)
    return ProbeResult(target, True, rtt_ms=rtt_ms, method=method)


def dns_query(query_id: int, name: str, query_type: str) -> bytes:
    """A recursive query for one name (RFC 1035 4.1)."""
    labels = name.encode("idna").split(b".")
    question = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return (
        struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
        + question
        + struct.pack("!HH", DNS_TYPES[query_type], 1)
    )


def dns_rcode(response: bytes, query_id: int) -> int | None:
    """The response code of a reply to `query_id`, or None if it is not one."""
    if len(response) < 12:
        return None
    reply_id, flags = struct.unpack_from("!HH", response)
    if reply_id != query_id or not flags & 0x8000:
        return None
    return int(flags & 0x000F)


DNS_RCODES: Final = {1: "formerr", 2: "servfail", 3: "nxdomain", 4: "notimp", 5: "refused"}


async def dns_probe(interface: str, source: str, target: str, check: CheckConfig) -> ProbeResult:
    """Ask the target (a resolver) about `query_name`; a NOERROR answer is success."""
    loop = asyncio.get_running_loop()
    assert check.query_name is not None
    query_id = int.from_bytes(os.urandom(2), "big")
    started = loop.time()
    try:
        sock = _bound_socket(interface, source, target, socket.SOCK_DGRAM)
    except OSError as err:
        return ProbeResult(target, False, reason=f"error: {err.strerror or err}", method=Method.DNS)

    async def exchange() -> int:
        # A connected UDP socket only receives from the target; sock_recv works on Python 3.10.
        await loop.sock_connect(sock, (target, check.port_for(Method.DNS)))
        await loop.sock_sendall(sock, dns_query(query_id, check.query_name or "", check.query_type))
        for _ in range(16):  # skip stray datagrams, boundedly
            rcode = dns_rcode(await loop.sock_recv(sock, 4096), query_id)
            if rcode is not None:
                return rcode
        raise ProbeFailure("no matching reply")

    try:
        rcode = await asyncio.wait_for(exchange(), check.timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return ProbeResult(target, False, reason="timeout", method=Method.DNS)
    except (OSError, ProbeFailure) as err:
        return ProbeResult(
            target, False, reason=f"error: {getattr(err, 'strerror', None) or err}", method=Method.DNS
        )
    finally:
        sock.close()
    if rcode != 0:
        return ProbeResult(target, False, reason=DNS_RCODES.get(rcode, f"rcode {rcode}"), method=Method.DNS)
    return ProbeResult(target, True, rtt_ms=(loop.time() - started) * 1000.0, method=Method.DNS)


@dataclass(frozen=True, slots=True)
class ProbeSource:
    """Where an uplink's probes leave from right now, and its gateways for the gateway check."""

    ifindex: int
    address: str | None
    address6: str | None
    gateway: str | None = None
    gateway6: str | None = None

    def for_target(self, target: str) -> str | None:
        return self.address if family_of(target) == 4 else self.address6


@dataclass(frozen=True, slots=True)
class _RoundPlan:
    """What a round probes through one source: worked out once per source, not per round."""

    #: (target, method) per probe, the gateway pings last.
    names: tuple[tuple[str, Method], ...]
    #: The targets probed (those of a family the source can route), in config order.
    targets: tuple[str, ...]
    #: How many of the probes (the last ones) are gateway pings.
    pinged: int
    gateways: tuple[str, ...]


class _Round:
    """One round's probes in flight. Each reports its end by index; the last one to end
    (or the launch, if every probe ended before it returned) completes the round."""

    __slots__ = ("seq", "started", "burst", "plan", "timeouts", "results", "pending", "tasks", "closed")

    def __init__(
        self,
        seq: int,
        started: float,
        burst: Burst | None,
        plan: _RoundPlan,
        timeouts: tuple[tuple[str, float], ...],
    ) -> None:
        self.seq = seq
        self.started = started
        self.burst = burst
        self.plan = plan
        self.timeouts = timeouts
        self.results: list[ProbeResult | BaseException | None] = [None] * len(plan.names)
        #: Probes not yet ended, plus one for the launch itself.
        self.pending = len(plan.names) + 1
        #: The probes that run as tasks (TCP, HTTP, DNS): cancelled if the prober stops.
        self.tasks: list[asyncio.Task[ProbeResult]] = []
        self.closed = False


class UplinkProber:
    """Sends the rounds of one uplink's probes, while it is usable, and hands each round's
    result to `deliver`: on the regular interval, and in confirmation bursts when a round
    changes the verdict or passive health suspects the path (see ProbePlan). Every round
    delivers a result, also one whose own code raised (as inconclusive): an uplink's
    health never freezes silently.

    It runs on callbacks, not a task that sleeps: one timer for the next round, and the
    probes' own callbacks (see IcmpEcho). A task's wake-up per round was a measurable
    share of the agent's CPU at 64 uplinks. run() only holds the prober's lifetime: a bug
    in a callback ends it with that exception (its supervisor restarts it)."""

    def __init__(
        self,
        uplink: UplinkConfig,
        ident: int,
        source: Callable[[], ProbeSource | None],
        deliver: Callable[[RoundResult], None],
        verbose: bool = False,
        late: Callable[[str, int, float], None] | None = None,
        offset_s: float = 0.0,
    ) -> None:
        self.uplink = uplink
        #: Where in the interval this uplink's rounds start (ProberSet spreads them).
        self._offset_s = offset_s
        self.ident = ident
        self._source = source
        self._deliver = deliver
        self._deliver_late = late
        self._verbose = verbose
        self._echo: dict[int, IcmpEcho] = {}
        #: Sockets of an old address or ifindex, closed once no probe waits on them.
        self._retired: list[IcmpEcho] = []
        self._seq = 0
        #: Rounds whose probes are out.
        self._rounds: set[_Round] = set()
        self._tls: asyncio.Future[Any] | None = None
        #: Gateways that have answered a ping since the prober started.
        self._gateway_answered: set[str] = set()
        #: The newest judged round failed (or none was judged yet): the next rounds also
        #: ping the gateways, to tell where a failure is (see _wants_gateways).
        self._in_doubt = True
        #: Bugs already logged with their traceback: (method, exception type).
        self._reported: set[tuple[str, str]] = set()
        self.plan = plan_start(uplink.check, 0.0)
        #: RFC 6298 state per ICMP target (gateways included), and the timeout it gives.
        self.estimates: dict[str, RttEstimate] = {}
        self._timeouts: dict[str, float] = {}
        #: The round's timeouts as status shows them, per targets probed, until one changes.
        self._shown_timeouts: tuple[tuple[str, ...], tuple[tuple[str, float], ...]] | None = None
        #: The round plans of the newest source, with and without the gateway pings (a
        #: source is a frozen value: compared, not rebuilt).
        self._planned: tuple[ProbeSource, dict[bool, _RoundPlan]] | None = None
        #: Start time of the newest round whose result came back (older ones are stale).
        self._newest_started = -math.inf
        #: Set when run() starts; a bug in a callback sets its exception.
        self._stopped: asyncio.Future[None] | None = None
        #: The timer of the next round, and when it fires (inf: none).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def suspect(self, trigger: str) -> None:
        """Passive health suspects the path: confirm at once (a burst), if the plan allows."""
        loop = asyncio.get_running_loop()
        self.plan = plan_suspect(self.plan, self.uplink.check, loop.time(), trigger)
        self._schedule()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.plan = plan_start(self.uplink.check, loop.time() + self._offset_s)
        self._stopped = loop.create_future()
        self._schedule()
        try:
            await self._stopped
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = None, -math.inf  # -inf: _schedule arms nothing any more
            for round_ in self._rounds:
                round_.closed = True
                for task in round_.tasks:
                    task.cancel()
            self._rounds.clear()
            for echo in [*self._echo.values(), *self._retired]:
                echo.close()
            self._echo.clear()
            self._retired.clear()

    def _schedule(self) -> None:
        """Arm the round timer for the plan's next due time, if that is earlier than the armed one."""
        if self._stopped is None or self._stopped.done():
            return
        due = plan_due(self.plan)
        if due >= self._timer_at or not math.isfinite(due):
            return  # a timer that fires early finds nothing due and arms the right one
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(due, self._tick)
        self._timer_at = due

    def _tick(self) -> None:
        self._timer, self._timer_at = None, math.inf
        try:
            loop = asyncio.get_running_loop()
            check = self.uplink.check
            now = loop.time()
            for _ in range(8):  # bounded: rounds still due wait for the next tick
                if plan_due(self.plan) > now:
                    break
                self.plan, burst = plan_sent(self.plan, check, now)
                source = self._source()
                if source is not None:
                    self._seq += 1
                    self._start_round(self._seq, source, burst)
                else:
                    # Nothing to probe through: no burst either, the grid waits for the link.
                    self.plan = evolve(self.plan, burst=None)
                    self._retire_echo()
            self._schedule()
        except Exception as err:  # a bug: end run() with it, for the supervisor to see
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_exception(err)

    def _retire_echo(self, family: int | None = None) -> None:
        # Probes in flight keep their socket until they end (closing it under
        # them would fail them with a bogus error): see _close_idle.
        for key in [family] if family is not None else list(self._echo):
            echo = self._echo.pop(key, None)
            if echo is not None:
                self._retired.append(echo)
        self._close_idle()

    def _close_idle(self) -> None:
        if not self._retired:
            return
        for echo in [e for e in self._retired if e.idle]:
            echo.close()
            self._retired.remove(echo)

    def _start_round(self, seq: int, source: ProbeSource, burst: Burst | None) -> None:
        """Send a round's probes now; _round_done() judges it once all have ended."""
        started = asyncio.get_running_loop().time()
        try:
            plan = self._round_plan(source, self._wants_gateways(source, burst))
            round_ = _Round(seq, started, burst, plan, self._round_timeouts(plan.targets))
        except Exception as err:  # the round's boundary: a bug here must not freeze the uplink
            self._finish_round(self._bug_round(seq, started, err), burst)
            return
        self._rounds.add(round_)
        gateways = len(plan.names) - plan.pinged
        for index, (target, method) in enumerate(plan.names):
            done = functools.partial(self._probe_done, round_, index)
            try:
                if index >= gateways:
                    self._ping_gateway(target, seq, source, burst, done)
                    continue
                probe = self._probe(method, target, seq, source, burst, done)
                if probe is not None:  # TCP, HTTP, DNS: a task of the round
                    task = asyncio.get_running_loop().create_task(probe)
                    round_.tasks.append(task)
                    task.add_done_callback(functools.partial(self._task_done, round_, index))
            except Exception as err:  # a bug in starting one probe fails only that probe, as a bug
                done(err)
        self._probe_done(round_, -1, None)  # the launch is over

    def _probe_done(self, round_: _Round, index: int, outcome: ProbeResult | BaseException | None) -> None:
        if round_.closed:
            return
        if index >= 0:
            if round_.results[index] is not None:
                return  # a probe reports once
            round_.results[index] = outcome
        round_.pending -= 1
        if round_.pending:
            return
        round_.closed = True
        self._rounds.discard(round_)
        try:
            result = self._collect(round_.seq, round_.started, round_, round_.results)
        except Exception as err:  # the round's boundary, as above
            result = self._bug_round(round_.seq, round_.started, err)
        self._finish_round(result, round_.burst)

    def _task_done(self, round_: _Round, index: int, task: asyncio.Task[ProbeResult]) -> None:
        if task.cancelled():
            return  # the prober stops
        self._probe_done(round_, index, task.exception() or task.result())

    def _bug_round(self, seq: int, started: float, err: Exception) -> RoundResult:
        self._report_bug("round", err)
        reason = f"agent error: {type(err).__name__}"
        return RoundResult(
            self.uplink.name, seq, started, (ProbeResult("", False, reason=reason, inconclusive=True),)
        )

    def _finish_round(self, result: RoundResult, burst: Burst | None) -> None:
        loop = asyncio.get_running_loop()
        self._close_idle()
        check = self.uplink.check
        stale = result.started_at <= self._newest_started
        self._newest_started = max(self._newest_started, result.started_at)
        outcome = None if stale or result.inconclusive else result.ok
        if outcome is not None:
            self._in_doubt = not outcome
        self.plan = plan_result(self.plan, outcome, burst is not None, check, loop.time())
        self._schedule()  # a burst starts or ends: the schedule may have changed
        if burst is not None or self.plan.burst is not None:
            result = evolve(
                result,
                burst_trigger=burst.trigger if burst is not None else None,
                burst_state=self.plan.burst.describe() if self.plan.burst is not None else None,
            )
        if self._verbose:
            detail = " ".join(f"{p.target}={_probe_detail(p)}" for p in result.probes)
            verdict = "inconclusive" if result.inconclusive else "ok" if result.ok else "failed"
            log.debug(
                "uplink=%s round=%d%s %s %d/%d %s",
                result.uplink,
                result.seq,
                f" burst({burst.describe()})" if burst is not None else "",
                verdict,
                result.answered,
                len(result.judged),
                detail,
            )
        self._deliver(result)

    def _wants_gateways(self, source: ProbeSource, burst: Burst | None) -> bool:
        """Whether this round pings the gateways too. Their answer only tells where a
        failure is (gateway or upstream), so a healthy uplink's regular rounds send none:
        at 64 uplinks they were a quarter of the probes. They go with every burst round
        and every round after a failed one (the rounds that decide a down, and say why),
        with every round while a gateway has not answered yet (whether it answers pings
        at all is learnt), and with every round at fall 1 (its first failure decides)."""
        check = self.uplink.check
        if not check.gateway_check:
            return False
        if burst is not None or self._in_doubt or check.fall <= 1:
            return True
        return not self._gateway_answered.issuperset(self._round_plan(source, True).gateways)

    def _round_plan(self, source: ProbeSource, gateways_too: bool = True) -> _RoundPlan:
        if self._planned is None or self._planned[0] != source:
            self._planned = (source, {})
        plans = self._planned[1]
        plan = plans.get(gateways_too)
        if plan is None:
            plan = plans[gateways_too] = self._make_round_plan(source, gateways_too)
        return plan

    def _make_round_plan(self, source: ProbeSource, gateways_too: bool) -> _RoundPlan:
        check = self.uplink.check
        # Only targets of a family the uplink can route now: an IPv4-only LTE
        # stick in a dual-stack config is judged on its IPv4 answers.
        targets = tuple(t for t in check.targets if source.for_target(t) is not None)
        names = [(t, m) for m in check.methods for t in targets]
        gateways = self._gateways(source) if check.gateway_check else []
        # A gateway that is also a target is answered by that probe (one ICMP id/seq slot each).
        pinged = [g for g in gateways if not (Method.ICMP in check.methods and g in targets)]
        if not gateways_too:
            pinged = []
        names += [(g, Method.ICMP) for g in pinged]
        return _RoundPlan(tuple(names), targets, len(pinged), tuple(gateways))

    def _collect(
        self, seq: int, started: float, round_: _Round, outcomes: Sequence[ProbeResult | BaseException | None]
    ) -> RoundResult:
        check = self.uplink.check
        plan = round_.plan
        gateways = plan.gateways
        results: list[ProbeResult] = []
        for outcome, (name, method) in zip(outcomes, plan.names, strict=True):
            if isinstance(outcome, ProbeResult):
                results.append(outcome)
                if outcome.ok and method is Method.ICMP and outcome.rtt_ms is not None:
                    self._learn(outcome.target, outcome.rtt_ms)
                continue
            if isinstance(outcome, BaseException):
                self._report_bug(method.value, outcome)
            reason = f"agent error: {type(outcome).__name__}"
            results.append(ProbeResult(name, False, reason=reason, method=method, inconclusive=True))
        split = len(results) - plan.pinged
        probes = tuple(results[:split])
        answers = {r.target: r.ok for r in results[split:] if not r.inconclusive}
        if gateways:
            answers.update(
                {
                    p.target: p.ok
                    for p in probes
                    if p.method is Method.ICMP and p.target in gateways and not p.inconclusive
                }
            )
        for gateway, ok in answers.items():
            if ok:
                self._gateway_answered.add(gateway)
        # Blame the gateway only if it answered pings before: many drop ICMP.
        judged = [ok for g, ok in answers.items() if g in self._gateway_answered]
        return RoundResult(
            self.uplink.name,
            seq,
            started,
            probes,
            check.reliability,
            gateway=", ".join(gateways) or None,
            gateway_ok=any(judged) if judged else None,
            timeouts_ms=round_.timeouts,
        )

    def timeout_for(self, target: str) -> float:
        timeout = self._timeouts.get(target)
        if timeout is None:
            timeout = self._timeouts[target] = probe_timeout_s(
                self.estimates.get(target, RttEstimate()), self.uplink.check
            )
        return timeout

    def _round_timeouts(self, targets: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
        """(target, timeout in ms) of a round's ICMP probes, for status."""
        if Method.ICMP not in self.uplink.check.methods:
            return ()
        shown = self._shown_timeouts
        if shown is None or shown[0] != targets:
            timeouts = tuple((t, round(self.timeout_for(t) * 1000.0, 1)) for t in targets)
            shown = self._shown_timeouts = (targets, timeouts)
        return shown[1]

    def _learn(self, target: str, rtt_ms: float) -> None:
        estimate = self.estimates[target] = rtt_sample(
            self.estimates.get(target, RttEstimate()), rtt_ms, self.uplink.check
        )
        timeout = probe_timeout_s(estimate, self.uplink.check)
        if self._timeouts.get(target) != timeout:
            self._timeouts[target] = timeout
            self._shown_timeouts = None

    def _on_late(self, target: str, seq: int, rtt_ms: float) -> None:
        # Karn's problem does not arise: the sequence number says which request was answered.
        self._learn(target, rtt_ms)
        self.plan = plan_late(self.plan, self.uplink.check, asyncio.get_running_loop().time())
        self._schedule()
        if self._deliver_late is not None and target in self.uplink.check.targets:
            self._deliver_late(target, seq, rtt_ms)

    async def _tls_context(self) -> Any:
        """Built once, in a thread (it reads the CA bundle), shared by the round's https probes.
        One that cannot be built fails only those probes, as a bug, and is tried again next round."""
        if self._tls is None:
            self._tls = asyncio.get_running_loop().run_in_executor(None, tls_context, self.uplink.check)
        try:
            return await asyncio.shield(self._tls)
        except Exception:
            self._tls = None
            raise

    def _report_bug(self, what: str, err: BaseException) -> None:
        """The first of each kind with its traceback; status counts them all (probe_errors)."""
        key = (what, type(err).__name__)
        if key in self._reported:
            return
        self._reported.add(key)
        log.error(
            "uplink=%s %s probe raised %s: a bug in the agent, not a failed probe; the round is judged "
            "without it (counted in status as probe_errors; repeats are not logged)",
            self.uplink.name,
            what,
            type(err).__name__,
            exc_info=err,
        )

    def _gateways(self, source: ProbeSource) -> list[str]:
        """The uplink's gateways in the families it carries (point-to-point has none)."""
        found = []
        for family, gateway in ((4, source.gateway), (6, source.gateway6)):
            if (
                gateway is not None
                and family in self.uplink.families
                and source.for_target(gateway) is not None
            ):
                found.append(gateway)
        return found

    def _echo_ping(
        self, echo: IcmpEcho, target: str, seq: int, key: str, burst: Burst | None, done: ProbeDone
    ) -> None:
        check = self.uplink.check
        echo.ping(
            target,
            seq,
            self.timeout_for(key),
            done=done,
            ceiling_s=check.timeout_s,
            on_late=self._on_late,
            judge_lateness=burst is not None,
        )

    def _ping_gateway(
        self, gateway: str, seq: int, source: ProbeSource, burst: Burst | None, done: ProbeDone
    ) -> None:
        # A link-local IPv6 gateway needs its interface as scope.
        target = f"{gateway}%{self.uplink.interface}" if gateway.lower().startswith("fe80:") else gateway
        try:
            echo = self._echo_for(family_of(gateway), source)
        except OSError as err:  # the raw socket cannot be opened or bound (interface gone meanwhile)
            done(ProbeResult(gateway, False, reason=f"error: {err.strerror or err}"))
            return
        if echo is None:
            done(ProbeResult(gateway, False, reason="no source address"))
            return
        self._echo_ping(echo, target, seq, gateway, burst, done)

    def _echo_for(self, family: int, source: ProbeSource) -> IcmpEcho | None:
        # SO_BINDTODEVICE binds to an ifindex: a re-created interface (new
        # index) or a renumbered one needs a new socket.
        address = source.address if family == 4 else source.address6
        if address is None:
            return None
        echo = self._echo.get(family)
        if echo is None or echo.source != address or echo.ifindex != source.ifindex:
            if echo is not None:
                self._retire_echo(family)
            echo = self._echo[family] = IcmpEcho(self.uplink.interface, address, self.ident, source.ifindex)
        return echo

    def _probe(
        self,
        method: Method,
        target: str,
        seq: int,
        source: ProbeSource,
        burst: Burst | None,
        done: ProbeDone,
    ) -> Coroutine[Any, Any, ProbeResult] | None:
        """Start one probe of a round: an ICMP one reports to `done`; any other is returned, to run."""
        check = self.uplink.check
        address = source.for_target(target)
        family = family_of(target)
        if address is None:
            done(ProbeResult(target, False, reason=f"no {FAMILY_TITLE[family]} address", method=method))
            return None
        if method is Method.ICMP:
            try:
                echo = self._echo_for(family, source)
            except OSError as err:  # the raw socket cannot be opened or bound (interface gone meanwhile)
                done(ProbeResult(target, False, reason=f"error: {err.strerror or err}"))
                return None
            assert echo is not None
            self._echo_ping(echo, target, seq, target, burst, done)
            return None
        interface = self.uplink.interface
        if method is Method.TCP:
            assert check.port is not None
            return tcp_probe(interface, address, target, check.port, check.timeout_s)
        if method in (Method.HTTP, Method.HTTPS):
            return self._http(method, interface, address, target)
        assert method is Method.DNS
        return dns_probe(interface, address, target, check)

    async def _http(self, method: Method, interface: str, address: str, target: str) -> ProbeResult:
        context = await self._tls_context() if method is Method.HTTPS else None
        return await http_probe(interface, address, target, self.uplink.check, method, context)


def _probe_detail(probe: ProbeResult) -> str:
    if probe.ok and probe.rtt_ms is not None:
        return f"{probe.rtt_ms:.1f}ms"
    return probe.reason


# Netlink #####################################################################
#
# Owns the kernel's routes and rules: the netlink worker thread, the dumps, the
# changes, the event socket, and the edge that reconciles a RouteWork.
#
# pyroute2 0.7 (Debian 12, OpenWrt) has no asyncio API, and 0.9 refuses its
# synchronous IPRoute inside a running event loop. Both work from a plain
# thread, so one worker thread owns the IPRoute socket and every request goes
# through it in order; the loop awaits the result. Events come from our own
# non-blocking NETLINK_ROUTE socket on the loop: it only needs the message
# type, and any event triggers a fresh dump, so no parser of ours can drift
# from what the kernel says.


def pyroute2_iproute() -> Any:
    """pyroute2's IPRoute class, without the rest of pyroute2.

    `import pyroute2` runs a package __init__ that imports every protocol the library
    speaks (NDB with sqlite3, ipset, IPVS, nl80211, WireGuard, plan9, ...: some 170
    modules and 10 MiB of a router's RAM); the agent speaks rtnetlink only. So the
    package is registered without running its __init__, and only pyroute2.iproute.linux
    and what it imports are loaded. Should a pyroute2 need its __init__ after all, the
    whole package is imported as usual."""
    loaded = sys.modules.get("pyroute2.iproute.linux")
    if loaded is not None:
        return loaded.IPRoute
    if "pyroute2" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("pyroute2")
        if spec is not None and spec.submodule_search_locations is not None:
            sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
            try:
                from pyroute2.iproute.linux import IPRoute

                return IPRoute
            except Exception:  # whatever a pyroute2 without its __init__ raises: import it whole
                log.debug("pyroute2.iproute.linux alone failed; importing all of pyroute2", exc_info=True)
                for name in [m for m in sys.modules if m == "pyroute2" or m.startswith("pyroute2.")]:
                    del sys.modules[name]
    from pyroute2 import IPRoute

    return IPRoute


class NetlinkWorker:
    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._local = threading.local()

    def _ipr(self) -> Any:
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            ipr = pyroute2_iproute()()
            self._local.ipr = ipr
        return ipr

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self._with_retry(fn, *args))

    def _with_retry(self, fn: Callable[..., T], *args: Any) -> T:
        # A dump that raced a change is interrupted (pyroute2's
        # NetlinkDumpInterrupted); it is safe to ask again.
        for attempt in range(3):
            try:
                return fn(self._ipr(), *args)
            except Exception as err:
                if type(err).__name__ != "NetlinkDumpInterrupted" or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        def _close() -> None:
            ipr = getattr(self._local, "ipr", None)
            if ipr is not None:
                ipr.close()

        # Never waits: a worker stuck in the kernel must not hold up the exit.
        self._executor.submit(_close)
        self._executor.shutdown(wait=False)


def nl_interfaces(ipr: Any, protocol: int, families: Sequence[int] = FAMILIES) -> dict[str, Interface]:
    """Links, their addresses and main's foreign default routes (DHCP, RA), by name."""
    links: dict[int, tuple[str, int]] = {}
    for msg in ipr.get_links():
        links[msg["index"]] = (msg.get_attr("IFLA_IFNAME"), msg["flags"])
    addresses: dict[int, dict[int, str]] = {4: {}, 6: {}}
    for family in families:
        for msg in ipr.get_addr(family=ADDRESS_FAMILY[family]):
            index = msg["index"]
            if index in addresses[family]:
                continue
            if family == 4 and msg["flags"] & IFA_F_SECONDARY:
                continue
            if family == 6:
                flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
                if msg["scope"] != RT_SCOPE_UNIVERSE or flags & IFA_F_UNUSABLE6:
                    continue
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address:
                addresses[family][index] = address
    gateways: dict[int, dict[int, tuple[int, str]]] = {4: {}, 6: {}}
    for family in families:
        for msg in ipr.get_routes(family=ADDRESS_FAMILY[family], table=RT_TABLE_MAIN):
            if msg["dst_len"] != 0 or msg["proto"] == protocol or _route_table(msg) != RT_TABLE_MAIN:
                continue
            oif, gateway = msg.get_attr("RTA_OIF"), msg.get_attr("RTA_GATEWAY")
            metric = msg.get_attr("RTA_PRIORITY") or 0
            if oif is None or gateway is None:
                continue
            if oif not in gateways[family] or metric < gateways[family][oif][0]:
                gateways[family][oif] = (metric, gateway)
    result: dict[str, Interface] = {}
    for index, (name, flags) in links.items():
        result[name] = Interface(
            name=name,
            index=index,
            admin_up=bool(flags & IFF_UP),
            carrier=bool(flags & IFF_LOWER_UP),
            address=addresses[4].get(index),
            dhcp_gateway=gateways[4][index][1] if index in gateways[4] else None,
            address6=addresses[6].get(index),
            ra_gateway=gateways[6][index][1] if index in gateways[6] else None,
        )
    return result


def _route_table(msg: Any) -> int:
    table = msg.get_attr("RTA_TABLE")
    return int(table if table is not None else msg["table"])


def nl_rules(ipr: Any, families: Sequence[int] = FAMILIES) -> list[RuleEntry]:
    entries: list[RuleEntry] = []
    for family in families:
        for msg in ipr.get_rules(family=ADDRESS_FAMILY[family]):
            table = msg.get_attr("FRA_TABLE")
            suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
            entries.append(
                RuleEntry(
                    priority=int(msg.get_attr("FRA_PRIORITY") or 0),
                    table=int(table if table is not None else msg["table"]),
                    protocol=int(msg.get_attr("FRA_PROTOCOL") or 0),
                    fwmark=msg.get_attr("FRA_FWMARK"),
                    fwmask=msg.get_attr("FRA_FWMASK") if msg.get_attr("FRA_FWMARK") is not None else None,
                    source=_rule_source(msg.get_attr("FRA_SRC"), msg["src_len"], family),
                    oifname=msg.get_attr("FRA_OIFNAME"),
                    # 0xFFFFFFFF is the kernel's "not set".
                    suppress_prefixlength=None if suppress in (None, 0xFFFFFFFF) else int(suppress),
                    family=family,
                )
            )
    return entries


def nl_routes(ipr: Any, tables: Iterable[int], families: Sequence[int] = FAMILIES) -> list[RouteEntry]:
    """Every route in these tables: ours (defaults), and anything another program put there.

    One dump per family, filtered here: the kernel answers a route dump with every
    table whatever the request names (pyroute2 filters afterwards), so a dump per
    table decoded tables x routes messages: at 250 uplinks 40 s of CPU, against
    0.1 s for one dump per family.
    """
    wanted = set(tables)
    entries: list[RouteEntry] = []
    for family in families:
        for msg in ipr.get_routes(family=ADDRESS_FAMILY[family]):
            table = _route_table(msg)
            if table not in wanted:
                continue
            dst_len = int(msg["dst_len"])
            entries.append(
                RouteEntry(
                    table=table,
                    oif=msg.get_attr("RTA_OIF"),
                    gateway=msg.get_attr("RTA_GATEWAY"),
                    protocol=int(msg["proto"]),
                    family=family,
                    unreachable=msg["type"] == RTN_UNREACHABLE,
                    dst=f"{msg.get_attr('RTA_DST')}/{dst_len}" if dst_len else None,
                )
            )
    # In the order a dump per table gave (stable: the kernel's order within a table).
    entries.sort(key=lambda e: (families.index(e.family), e.table))
    return entries


def nl_apply(
    ipr: Any, changes: Sequence[Change], indexes: Mapping[str, int], protocol: int
) -> list[tuple[Change, str]]:
    """Apply each change on its own; one that fails (a gateway not on-link, an
    interface gone meanwhile) must not stop the others, least of all the
    selected default route. Returns the failures."""
    failed: list[tuple[Change, str]] = []
    for change in changes:
        try:
            _apply_one(ipr, change, indexes, protocol)
        except Exception as err:  # NetlinkError is no OSError; any failure is reported, not raised
            failed.append((change, str(err)))
    return failed


def _apply_one(ipr: Any, change: Change, indexes: Mapping[str, int], protocol: int) -> None:
    if change.kind == "replace_route" and change.route is not None and change.route.unreachable:
        route = change.route
        ipr.route(
            "replace",
            dst=DEFAULT_DST[route.family],
            table=route.table,
            type="unreachable",
            priority=UNREACHABLE_METRIC,
            proto=protocol,
            family=ADDRESS_FAMILY[route.family],
        )
    elif change.kind == "replace_route" and change.route is not None:
        route = change.route
        args: dict[str, Any] = dict(
            dst=DEFAULT_DST[route.family],
            table=route.table,
            oif=indexes[route.interface],
            proto=protocol,
            family=ADDRESS_FAMILY[route.family],
        )
        if route.gateway is not None:
            args["gateway"] = route.gateway
        else:
            args["scope"] = 253  # link: a point-to-point default needs no gateway
        ipr.route("replace", **args)
    elif change.kind in ("add_rule", "del_rule") and change.rule is not None:
        ipr.rule("add" if change.kind == "add_rule" else "del", **_rule_args(change.rule, protocol))
    elif change.kind == "del_route" and change.table is not None:
        _delete_default(ipr, change.table, change.family, protocol, change.unreachable)
    else:
        raise ValueError(f"malformed change {change}")


def _delete_default(ipr: Any, table: int, family: int, protocol: int, unreachable: bool = False) -> None:
    # Type and metric name the one route meant: an uplink table holds two defaults.
    ipr.route(
        "del",
        dst=DEFAULT_DST[family],
        table=table,
        proto=protocol,
        family=ADDRESS_FAMILY[family],
        type="unreachable" if unreachable else "unicast",
        priority=UNREACHABLE_METRIC if unreachable else DEFAULT_METRIC[family],
    )


def _rule_source(address: str | None, length: int, family: int) -> str | None:
    """A rule's source as RuleSpec spells it: an address, or a network ("2001:db8:10::/56")."""
    if not length or address is None:
        return None
    return address if length == HOST_PREFIX[family] else f"{address}/{length}"


def _rule_args(rule: RuleSpec, protocol: int) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        family=ADDRESS_FAMILY[rule.family], priority=rule.priority, table=rule.table, protocol=protocol
    )
    if rule.fwmark is not None:
        args["fwmark"] = rule.fwmark
        args["fwmask"] = rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF
    if rule.source is not None:
        address, _, length = rule.source.partition("/")
        args["src"] = address
        args["src_len"] = int(length) if length else HOST_PREFIX[rule.family]
    if rule.oifname is not None:
        args["oifname"] = rule.oifname
    if rule.suppress_prefixlength is not None:
        # pyroute2 0.7 drops `suppress_prefixlength=0` (falsy); the raw NLA name works on all versions.
        args["FRA_SUPPRESS_PREFIXLEN"] = rule.suppress_prefixlength
    return args


def nl_remove_own(ipr: Any, config: Config, tables: Iterable[int]) -> list[str]:
    """--cleanup: our rules first (traffic falls back to main), then our routes."""
    done: list[str] = []
    for rule in nl_rules(ipr):
        if owns_rule(config, rule):
            ipr.rule("del", **_rule_args(rule.spec(), config.agent.route_protocol))
            done.append(f"del_rule {FAMILY_NAME[rule.family]} {rule.spec().describe()}")
    for route in nl_routes(ipr, tables):
        if route.protocol == config.agent.route_protocol and route.dst is None:
            change = Change(
                "del_route", table=route.table, family=route.family, unreachable=route.unreachable
            )
            _apply_one(ipr, change, {}, route.protocol)
            done.append(change.describe())
    return done


class NetlinkEvents:
    """Wakes the daemon on link, address, route and rule changes (no polling)."""

    GROUPS: Final = (
        RTMGRP_LINK
        | RTMGRP_IPV4_IFADDR
        | RTMGRP_IPV4_ROUTE
        | RTMGRP_IPV4_RULE
        | RTMGRP_IPV6_IFADDR
        | RTMGRP_IPV6_ROUTE
        | RTMGRP_IPV6_RULE
    )

    def __init__(self, on_event: Callable[[], None]) -> None:
        self._on_event = on_event
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind((0, self.GROUPS))
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        seen = False
        for _ in range(256):
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ENOBUFS: events were lost; a fresh dump covers them.
                seen = True
                break
            if len(data) >= NLMSG_HEADER.size:
                seen = True
        if seen:
            self._on_event()

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class RouteEdge:
    """The routes and rules, carried out: a task that takes the newest RouteWork, sends
    its urgent replaces, then dumps, diffs and applies the rest, and posts what it saw;
    and that dumps links and addresses when asked (the answer is an on_links).

    Newer work replaces work not yet started (it is planned on newer facts).
    """

    def __init__(
        self, worker: NetlinkWorker, config: Config, post: Callable[[Observation], None], dry_run: bool
    ) -> None:
        self.worker = worker
        #: The config whose families and protocol a link dump is for (the pump updates it).
        self.config = config
        self._post = post
        self._dry_run = dry_run
        self._wake = asyncio.Event()
        self._links_wanted = False
        self._work: RouteWork | None = None
        self._dry_run_changes: list[Change] = []
        #: Cleared while a reconcile runs: a conntrack count pauses meanwhile (it shares the interpreter).
        self.quiet = threading.Event()
        self.quiet.set()

    def want_links(self) -> None:
        self._links_wanted = True
        self._wake.set()

    def want(self, work: RouteWork) -> None:
        self._work = work
        self._wake.set()

    async def run(self) -> None:
        events = NetlinkEvents(self.want_links)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                try:
                    # Route work first, then the dump: events that keep coming (a busy routing
                    # daemon, a flapping VPN) can delay a failover by one dump, never starve it.
                    if self._work is not None:
                        work, self._work = self._work, None
                        self._post(await self._reconcile(work))
                    if self._links_wanted:
                        self._links_wanted = False
                        config = self.config
                        # Only the families configured: a dump less on the path of every failover.
                        interfaces = await self.worker.call(
                            nl_interfaces, config.agent.route_protocol, config.families
                        )
                        self._post(LinksObserved(interfaces))
                    if self._work is not None or self._links_wanted:
                        self._wake.set()
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # NetlinkError is no OSError: the core retries with back-off
                    self._post(RoutesFailed(f"{type(err).__name__}: {err}"))
        finally:
            events.close()

    async def _reconcile(self, work: RouteWork) -> RoutesReconciled:
        config, plan = work.config, work.plan
        protocol = config.agent.route_protocol
        self.quiet.clear()
        try:
            failed: list[tuple[Change, str]] = []
            if work.urgent and not self._dry_run:
                # The new selection first, before the verifying dumps (which then find it in place).
                for change in work.urgent:
                    log.info("netlink: %s", change.describe())
                failed += await self.worker.call(nl_apply, work.urgent, work.indexes, protocol)
            urgent_done_at = asyncio.get_running_loop().time()
            # Every family here: objects of a family a reload dropped must go too.
            rules = await self.worker.call(nl_rules)
            routes = await self.worker.call(nl_routes, work.managed_tables)
            changes = diff_network(config, plan, rules, routes, work.indexes, work.managed_tables)
            if self._dry_run:
                if changes != self._dry_run_changes:  # say it once, not on every reconcile
                    for change in changes:
                        log.info("dry-run: would %s", change.describe())
                    self._dry_run_changes = changes
            elif changes:
                for change in changes:
                    log.info("netlink: %s", change.describe())
                failed += await self.worker.call(nl_apply, changes, work.indexes, protocol)
            return RoutesReconciled(work, tuple(failed), tuple(rules), tuple(routes), urgent_done_at)
        finally:
            self.quiet.set()

    async def answers(self, timeout_s: float) -> bool:
        """Whether the netlink worker thread answers within `timeout_s` (for the watchdog)."""
        try:
            await wait_within(self.worker.call(lambda ipr: None), timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return False
        return True


# Conntrack ###################################################################
#
# Owns what the agent asks of conntrack: counting each uplink's marked
# connections (read-only) and release_flows (deletes one by one, never a flush).


def conntrack_counts(
    marks: Mapping[str, int],
    mask: int,
    quiet: threading.Event | None = None,
    beat: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Tracked connections per uplink mark, both families; read-only.

    The kernel filters the dump by mark (CTA_MARK/CTA_MARK_MASK) and we only
    count its messages: a router tracks tens of thousands of connections, and
    decoding each of them (as pyroute2 does) every few seconds costs a core.
    Between chunks it waits for `quiet`, so that a reconcile (a failover)
    never shares the interpreter with it.
    """
    counts = dict.fromkeys(marks, 0)
    with _ctnetlink_socket() as sock:
        if len(marks) <= CONNTRACK_FILTERED_MARKS_MAX:
            for name, mark in marks.items():
                for family in FAMILIES:
                    attrs = _mark_filter(mark, mask)
                    request = _ct_message(CT_GET, NLM_F_DUMP, family, attrs, next(_sequence))
                    counts[name] += sum(1 for _ in _ct_answers(sock, request, quiet, beat))
            return counts
        # Every dump walks the kernel's whole hash table (262,144 buckets: 12 ms even when
        # empty), so many marks are counted from one unfiltered dump per family instead,
        # each entry's mark read here: at 64 uplinks 2 walks, not 128.
        name_of = {mark & mask: name for name, mark in marks.items()}
        for family in FAMILIES:
            request = _ct_message(CT_GET, NLM_F_DUMP, family, b"", next(_sequence))
            for payload in _ct_answers(sock, request, quiet, beat):
                entry_mark = _ct_mark(payload)
                owner = name_of.get(entry_mark & mask) if entry_mark is not None else None
                if owner is not None:
                    counts[owner] += 1
    return counts


def _ct_mark(payload: bytes) -> int | None:
    """A conntrack entry's CTA_MARK (the payload after nfgenmsg), if it has one."""
    for kind, start, _end in _nla_walk(payload, 0, len(payload)):
        if kind == CTA_MARK:
            return int(struct.unpack_from("!I", payload, start)[0])
    return None


@dataclass(frozen=True, slots=True)
class Released:
    """What conntrack_release did."""

    deleted: int = 0
    #: Connections that came in from the internet (port forwards, to the router): kept.
    inbound_kept: int = 0
    failed: int = 0
    error: str | None = None
    #: Stopped before the end: the uplink recovered, or carries these families again.
    cancelled: bool = False


def conntrack_release(
    mark: int,
    mask: int,
    local: frozenset[str],
    families: Iterable[int] = FAMILIES,
    cancelled: threading.Event | None = None,
    beat: Callable[[], None] | None = None,
) -> Released:
    """Delete the connections placed on one uplink, one by one; never a flush.

    Each delete names the entry's original tuple and its id, so an entry that
    was re-created meanwhile (a new flow with the same ports, already on the new
    path) is left alone: the kernel refuses a stale id. An entry without a
    tuple is never sent (a delete without one is a flush), nor one whose mark
    we do not see ourselves. Connections that came in from the internet
    (destination NAT, or addressed to one of `local`) are kept. `cancelled`
    stops it between batches (the uplink carries these flows again).
    """
    deleted = inbound = failed = 0
    error: str | None = None
    stop = cancelled or threading.Event()
    with _ctnetlink_socket() as sock:
        for family in sorted(families):
            if stop.is_set():
                break
            # The whole dump first: a delete on the socket would cut it short.
            entries = [
                e for e in _ct_dump(sock, family, mark, mask, beat) if e.tuple_orig and e.mark & mask == mark
            ]
            doomed: list[TrackedEntry] = []
            for entry in entries:
                # Labelled by our table; the other two catch those from before it was installed.
                if entry.inbound or entry.status & IPS_DST_NAT or entry.destination in local:
                    inbound += 1
                else:
                    doomed.append(entry)
            for batch in range(0, len(doomed), CT_DELETE_BATCH):
                if stop.is_set():
                    break
                if beat is not None:
                    beat()
                done, errors = _ct_delete(sock, family, doomed[batch : batch + CT_DELETE_BATCH])
                deleted += done
                # ENOENT: it went meanwhile (closed, timed out), or was re-created (a new id).
                errors = [e for e in errors if e.errno != errno.ENOENT]
                failed += len(errors)
                error = str(errors[-1]) if errors else error
    return Released(deleted, inbound, failed, error, stop.is_set())


# ctnetlink, spoken directly: pyroute2 decodes every attribute of every entry,
# which is seconds of CPU for a busy router's table; we need a few of them.


@dataclass(frozen=True, slots=True)
class TrackedEntry:
    status: int
    mark: int
    destination: str | None
    #: Labelled INBOUND_LABEL by our table: it came in from the internet.
    inbound: bool
    #: CTA_TUPLE_ORIG as the kernel sent it (empty if it sent none).
    tuple_orig: bytes
    #: CTA_ID and CTA_ZONE as the kernel sent them.
    identity: bytes


def _ctnetlink_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    # Bounds a wait for the kernel, and so how long a stopping agent can wait for this thread.
    sock.settimeout(CONNTRACK_RECV_TIMEOUT_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, 0))
    return sock


def _nla(kind: int, payload: bytes) -> bytes:
    attr = struct.pack("=HH", NLA_HEADER + len(payload), kind) + payload
    return attr + b"\0" * (-len(attr) % 4)


def _nla_walk(data: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in data[offset:end]."""
    while offset + NLA_HEADER <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < NLA_HEADER:
            return
        yield kind & NLA_TYPE_MASK, offset + NLA_HEADER, offset + length
        offset += (length + 3) & ~3


_sequence = itertools.count(1)
#: Set at exit: a dump in progress ends at its next datagram (the thread is joined at exit).
CONNTRACK_STOP: Final = threading.Event()


def _mark_filter(mark: int, mask: int) -> bytes:
    # nla headers are host order; these payloads network order.
    return _nla(CTA_MARK, struct.pack("!I", mark)) + _nla(CTA_MARK_MASK, struct.pack("!I", mask))


def _ct_message(kind: int, flags: int, family: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", ADDRESS_FAMILY[family], 0, 0) + attrs  # nfgenmsg: family, v0, res_id
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def _ct_answers(
    sock: socket.socket,
    request: bytes,
    quiet: threading.Event | None = None,
    beat: Callable[[], None] | None = None,
) -> Iterator[bytes]:
    """Send a dump request; yield each answer's payload (after nfgenmsg) until NLMSG_DONE."""
    (seq,) = struct.unpack_from("=I", request, 8)
    sock.send(request)
    while True:
        if CONNTRACK_STOP.is_set():
            raise OSError(errno.ECANCELED, "the agent is stopping")
        data = sock.recv(1 << 20)
        if beat is not None:
            beat()
        if quiet is not None:
            quiet.wait(CONNTRACK_PAUSE_MAX_S)
        for msg_type, msg_seq, payload in _nl_messages(data):
            if msg_seq != seq:
                continue
            if msg_type in (NLMSG_DONE, NLMSG_ERROR):
                (code,) = struct.unpack_from("=i", payload, 0) if len(payload) >= 4 else (0,)
                if code < 0:
                    raise OSError(-code, os.strerror(-code))
                return
            yield payload[4:]


def _nl_messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in one datagram."""
    for msg_type, msg_seq, _flags, payload in _nl_flagged_messages(data):
        yield msg_type, msg_seq, payload


def _nl_flagged_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, seq, flags, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, msg_type, flags, msg_seq, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return
        yield msg_type, msg_seq, flags, data[offset + NLMSG_HEADER.size : offset + length]
        offset += (length + 3) & ~3


def _ct_dump(
    sock: socket.socket, family: int, mark: int, mask: int, beat: Callable[[], None] | None = None
) -> Iterator[TrackedEntry]:
    """The entries of one family whose mark matches, filtered by the kernel."""
    request = _ct_message(CT_GET, NLM_F_DUMP, family, _mark_filter(mark, mask), next(_sequence))
    for payload in _ct_answers(sock, request, beat=beat):
        status = entry_mark = 0
        destination, tuple_orig, identity, inbound = None, b"", b"", False
        for kind, start, end in _nla_walk(payload, 0, len(payload)):
            if kind == CTA_STATUS:
                (status,) = struct.unpack_from("!I", payload, start)
            elif kind == CTA_MARK:
                (entry_mark,) = struct.unpack_from("!I", payload, start)
            elif kind == CTA_LABELS:
                inbound = _label_set(payload[start:end], INBOUND_LABEL)
            elif kind in (CTA_ID, CTA_ZONE):
                identity += _nla(kind, payload[start:end])
            elif kind == CTA_TUPLE_ORIG:
                tuple_orig = _nla(kind, payload[start:end])
                for ip_kind, ip_start, ip_end in _nla_walk(payload, start, end):
                    if ip_kind == CTA_TUPLE_IP:
                        for addr_kind, a_start, a_end in _nla_walk(payload, ip_start, ip_end):
                            if addr_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                                destination = str(ipaddress.ip_address(payload[a_start:a_end]))
        yield TrackedEntry(status, entry_mark, destination, inbound, tuple_orig, identity)


def _label_set(labels: bytes, bit: int) -> bool:
    """Whether a label bit is set in CTA_LABELS: the kernel's bitmap of native unsigned longs."""
    size = struct.calcsize("L")
    word, within = divmod(bit, size * 8)
    chunk = labels[word * size : (word + 1) * size]
    return len(chunk) == size and bool(int.from_bytes(chunk, sys.byteorder) >> within & 1)


def _ct_delete(
    sock: socket.socket, family: int, entries: Sequence[TrackedEntry]
) -> tuple[int, list[OSError]]:
    """Delete these entries in one datagram of requests; (deleted, errors) from their acks."""
    pending: set[int] = set()
    requests = b""
    for entry in entries:
        if not entry.tuple_orig:  # never: without a tuple the kernel would flush the table
            continue
        seq = next(_sequence)
        pending.add(seq)
        requests += _ct_message(CT_DELETE, NLM_F_ACK, family, entry.tuple_orig + entry.identity, seq)
    if not requests:
        return 0, []
    sock.send(requests)
    deleted, errors = 0, []
    while pending:
        for msg_type, msg_seq, payload in _nl_messages(sock.recv(1 << 20)):
            if msg_type != NLMSG_ERROR or msg_seq not in pending:
                continue
            pending.discard(msg_seq)
            (code,) = struct.unpack_from("=i", payload, 0)
            if code == 0:
                deleted += 1
            else:
                errors.append(OSError(-code, os.strerror(-code)))
    return deleted, errors


class ConntrackEdge:
    """Counting and releasing, carried out in a thread of its own: a dump of a big table
    takes a while, and neither route changes (the netlink worker) nor the watchdog may
    wait behind it. Releases go first, one at a time; counts fill the quiet time."""

    def __init__(
        self, config: Config, post: Callable[[Observation], None], quiet: threading.Event, dry_run: bool
    ) -> None:
        #: The config whose uplink marks are counted (the pump updates it).
        self.config = config
        self._post = post
        self._quiet = quiet
        self._dry_run = dry_run
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conntrack")
        CONNTRACK_STOP.clear()  # an agent run in-process again (tests) starts afresh
        self._jobs: collections.deque[FlowRelease] = collections.deque()
        self._cancel: dict[str, threading.Event] = {}
        self._wake = asyncio.Event()
        self._warned = False
        #: When the running job started and when it last made progress (monotonic), for the watchdog.
        self._busy_since: float | None = None
        self._progress_at = 0.0

    def release(self, job: FlowRelease) -> None:
        self._cancel[job.uplink] = threading.Event()
        self._jobs.append(job)
        self._wake.set()

    def cancel(self, uplink: str) -> None:
        flag = self._cancel.get(uplink)
        if flag is not None:
            flag.set()

    def stuck_for(self, now: float) -> float | None:
        """How long the running job has made no progress, if longer than CONNTRACK_STUCK_S."""
        if self._busy_since is None:
            return None
        idle = now - max(self._busy_since, self._progress_at)
        return idle if idle > CONNTRACK_STUCK_S else None

    def close(self) -> None:
        # The thread is joined at exit: whatever it does must end now, not at its next timeout.
        CONNTRACK_STOP.set()
        for flag in self._cancel.values():
            flag.set()
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_count = loop.time()
        while True:
            try:
                await wait_within(self._wake.wait(), max(next_count - loop.time(), 0.0))
            except (asyncio.TimeoutError, TimeoutError):
                pass
            self._wake.clear()
            while self._jobs:
                job = self._jobs.popleft()
                released = await self._release(job)
                self._cancel.pop(job.uplink, None)
                self._post(ReleaseFinished(job.uplink, released))
            if loop.time() >= next_count:
                counts, cpu_s = await self._count()
                self._post(ConnectionsCounted(counts))
                # A huge table makes the count dearer: keep it to CONNTRACK_COUNT_CPU_SHARE
                # (its CPU time, not its wall time, which includes the pauses for reconciles).
                next_count = loop.time() + max(CONNTRACK_PERIOD_S, cpu_s / CONNTRACK_COUNT_CPU_SHARE)

    def _beat(self) -> None:
        self._progress_at = time.monotonic()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        self._busy_since = self._progress_at = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        finally:
            self._busy_since = None

    async def _release(self, job: FlowRelease) -> Released:
        if self._dry_run:
            return Released(error="dry run: nothing was deleted")
        cancelled = self._cancel.get(job.uplink, threading.Event())
        try:
            return await self._in_thread(
                conntrack_release, job.mark, job.mask, job.local, job.families, cancelled, self._beat
            )
        except OSError as err:  # no nf_conntrack_netlink, no permission
            return Released(error=str(err))
        except Exception as err:  # the job's boundary: a bug here must not lose the uplink's releases
            log.exception("uplink=%s release of its connections failed", job.uplink)
            return Released(error=f"{type(err).__name__}: {err}")

    async def _count(self) -> tuple[dict[str, int] | None, float]:
        """The counts (None: conntrack cannot be read), and the CPU time they took."""
        marks = {u.name: u.mark for u in self.config.uplinks}
        mask = self.config.agent.mark_mask

        def count() -> tuple[dict[str, int], float]:
            began = time.thread_time()
            counts = conntrack_counts(marks, mask, self._quiet, self._beat)
            return counts, time.thread_time() - began

        try:
            counts, cpu_s = await self._in_thread(count)
        except OSError as err:  # no nf_conntrack_netlink: status shows no counts
            if not self._warned:
                log.info("conntrack counts unavailable: %s", err)
                self._warned = True
            return None, 0.0
        except Exception:  # a bug in counting feeds only status: say it once, never end the agent for it
            if not self._warned:
                log.exception("conntrack counts failed; status shows none")
                self._warned = True
            return None, 0.0
        self._warned = False
        return counts, cpu_s


# Passive health, from conntrack events --------------------------------------------
#
# The kernel multicasts a message for every new connection and every status change
# (ctnetlink's NEW and UPDATE groups); we only listen. A new TCP connection, or a
# DNS query, marked for an uplink is pending until its first reply (IPS_SEEN_REPLY).
# Connections from the internet (labelled inbound, or DNATed) say nothing of the path.


class PassiveEdge:
    """Feeds PassiveHealth from conntrack events and posts its suspicions and views."""

    def __init__(
        self,
        config: Callable[[], Config],
        post: Callable[[Observation], None],
        health: PassiveHealth | None = None,
    ) -> None:
        self._config = config
        self._post = post
        self.health = health or PassiveHealth()
        self._configured: Config | None = None
        self._by_mark: dict[int, str] = {}
        self._mask = 0
        self._judged_at = -math.inf
        self._views: dict[str, PassiveView] = {}
        self._overflow_logged = False
        self.events = 0

    def _sync(self) -> None:
        config = self._config()
        if config is self._configured:
            return
        self._configured = config
        self.health.configure(config.uplinks)
        self._by_mark = {u.mark: u.name for u in config.uplinks if u.check.passive}
        self._mask = config.agent.mark_mask

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._sync()
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, CT_EVENT_GROUPS))
        except OSError as err:
            sock.close()
            log.warning("passive health is off: conntrack events cannot be read: %s", err.strerror or err)
            await asyncio.Event().wait()  # nothing to do, and no reason to be restarted
            return
        loop.add_reader(sock.fileno(), self._readable, sock)
        try:
            while True:
                self._sync()
                await asyncio.sleep(PASSIVE_TICK_S if self.health.busy else PASSIVE_IDLE_TICK_S)
                self._judge(loop.time())
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()

    def _readable(self, sock: socket.socket) -> None:
        now = asyncio.get_running_loop().time()
        for _ in range(64):  # bounded: the rest waits for the next wake-up
            try:
                data = sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                # The kernel dropped events: pending connections can no longer be judged.
                self.health.forget()
                if not self._overflow_logged:
                    log.warning(
                        "passive health lost conntrack events (receive buffer full); it starts afresh"
                    )
                    self._overflow_logged = True
                continue
            for msg_type, _seq, flags, payload in _nl_flagged_messages(data):
                if msg_type == CT_NEW_EVENT:
                    self._event(payload, bool(flags & NLM_F_CREATE), now)
        if now - self._judged_at >= PASSIVE_TICK_S:
            self._judge(now)

    def _event(self, payload: bytes, created: bool, now: float) -> None:
        self.events += 1
        status = mark = conn = proto = port = 0
        destination = ""
        inbound = False
        for kind, start, end in _nla_walk(payload, 4, len(payload)):  # after nfgenmsg
            if kind == CTA_ID:
                (conn,) = struct.unpack_from("!I", payload, start)
            elif kind == CTA_STATUS:
                (status,) = struct.unpack_from("!I", payload, start)
            elif kind == CTA_MARK:
                (mark,) = struct.unpack_from("!I", payload, start)
            elif kind == CTA_LABELS:
                inbound = _label_set(payload[start:end], INBOUND_LABEL)
            elif kind == CTA_TUPLE_ORIG and created:
                destination, proto, port = _tuple_destination(payload, start, end)
        if not created:
            if status & IPS_SEEN_REPLY:
                self.health.connection_answered(conn, now)
            return
        uplink = self._by_mark.get(mark & self._mask)
        if uplink is None or inbound or status & IPS_DST_NAT or not destination:
            return
        # TCP handshakes and DNS queries expect an answer; other UDP (and ICMP, our probes) may not.
        if proto == socket.IPPROTO_TCP or (proto == socket.IPPROTO_UDP and port == 53):
            if status & IPS_SEEN_REPLY:
                return
            self.health.connection_new(conn, uplink, destination, now)

    def _judge(self, now: float) -> None:
        self._judged_at = now
        for suspicion in self.health.judge(now):
            self._post(SuspicionObserved(suspicion))
        views = {name: view for name in self._by_mark.values() if (view := self.health.view(name, now))}
        if views != self._views:
            self._views = views
            self._post(PassiveObserved(views))


def _tuple_destination(payload: bytes, start: int, end: int) -> tuple[str, int, int]:
    """(destination address, protocol, destination port) of a CTA_TUPLE_ORIG."""
    destination, proto, port = "", 0, 0
    for kind, k_start, k_end in _nla_walk(payload, start, end):
        if kind == CTA_TUPLE_IP:
            for addr_kind, a_start, a_end in _nla_walk(payload, k_start, k_end):
                if addr_kind in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    raw = payload[a_start:a_end]
                    destination = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
        elif kind == CTA_TUPLE_PROTO:
            for proto_kind, p_start, _p_end in _nla_walk(payload, k_start, k_end):
                if proto_kind == CTA_PROTO_NUM:
                    proto = payload[p_start]
                elif proto_kind == CTA_PROTO_DST_PORT:
                    (port,) = struct.unpack_from("!H", payload, p_start)
    return destination, proto, port


# nftables ####################################################################
#
# Owns the table `inet multiwan`: rendering it, running nft (always with a
# timeout), and the edge that keeps the live table as the core wants it.
#
# The agent's own table, `inet multiwan`, holds what routing rules cannot:
# connection stickiness. A new connection is marked (ct mark) with the uplink
# it actually leaves through; later packets of it in the original direction
# get that mark back (meta mark), and the fwmark rules send them through that
# uplink's table whatever the current default is. Replies are never marked, so
# they route normally towards the LAN. New connections from the LAN are also
# *placed* here (chain `steer`): policies first, then the balance group, by
# setting the mark of the chosen uplink before routing. The chains that change
# with health (`balance`, `policy_<name>`) are rewritten in one transaction of
# their own, so per-host placements survive; otherwise the table is written
# whole in one `nft -f` transaction. No other table is ever touched.

NFT_TABLE: Final = "inet multiwan"
#: nft's keyword for each family's header.
NFT_ADDRESS: Final = {4: "ip", 6: "ip6"}
#: NFNLGRP_NFTABLES: every nftables change, also another firewall's `flush ruleset`.
NFNLGRP_NFTABLES: Final = 7


def render_nft(config: Config, steering: Steering | None = None, labels: bool = True) -> str:
    """The whole table, as one transaction that replaces whatever version is live.

    `labels`: label connections from the internet (bit INBOUND_LABEL) so release_flows keeps
    them; a kernel without conntrack labels gets the table without (release_flows then knows
    them by their DNAT and by the router's own addresses only).

    Only the `mark_mask` bits of the packet and connection marks are ever
    changed: each uplink's chains `to_<uplink>` (packet) and `ct_<uplink>`
    (connection) set its mark into those bits and keep the others.
    """
    mask = f"{config.agent.mark_mask:#x}"
    # A connection's uplink, from its mark, and an interface's uplink: verdict maps to those chains.
    by_mark = ", ".join(f"{u.mark:#x} : goto to_{u.name}" for u in config.uplinks)
    by_oif = ", ".join(f'"{u.interface}" : goto ct_{u.name}' for u in config.uplinks)
    by_iif = ", ".join(f'"{u.interface}" : goto in_{u.name}' for u in config.uplinks)
    restore = f"ct direction original ct mark and {mask} vmap {{ {by_mark} }}"
    dynamic = _steering_chains(config, steering or Steering())
    out = [f"add table {NFT_TABLE}", f"delete table {NFT_TABLE}", f"table {NFT_TABLE} {{"]
    for family, name in _source_sets(config):
        out += [
            f"\tset source{family}_{name} {{",
            f"\t\ttypeof {NFT_ADDRESS[family]} saddr",
            "\t\tflags dynamic, timeout",
            f"\t\ttimeout {max(1, round(config.agent.sticky_timeout_s))}s",
            "\t}",
        ]
    out += [
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
        f"\t\t{restore}",
        # The replies of a port forward leave through the uplink its connection came in on
        # (their source is the LAN host's until the reverse NAT; nothing else would route them back).
        f"\t\tct direction reply ct status dnat ct mark and {mask} vmap {{ {by_mark} }}",
        # New connections from the LAN are placed; those from the internet belong to their uplink.
        f"\t\tct state new ct mark and {mask} == 0 iifname != {{ {_uplink_interfaces(config)} }} jump steer",
        f"\t\tct state new ct mark and {mask} == 0 iifname vmap {{ {by_iif} }}",
        "\t}",
        "\tchain steer {",
        # A LAN prefix leaves by its own uplink (a rule), or by the selection: never balanced
        # or placed, which would send it to an ISP that drops it (BCP38).
        *(
            f"\t\tip6 saddr {{ {', '.join(prefixes)} }} return"
            for prefixes in [_lan_prefixes(config)]
            if prefixes
        ),
        *(f"\t\t{_policy_match(policy, f)} jump policy_{policy.name}" for policy, f in _policy_rows(config)),
        "\t\tjump balance",
        "\t}",
    ]
    for chain, rules in dynamic.items():
        out += [f"\tchain {chain} {{", *(f"\t\t{rule}" for rule in rules), "\t}"]
    for family, name in _source_sets(config):
        address = f"{NFT_ADDRESS[family]} saddr"
        out += [
            f"\tchain new{family}_{name} {{",
            f"\t\tadd @source{family}_{name} {{ {address} }} goto to_{name}",
            "\t}",
        ]
    keep = f"{~config.agent.mark_mask & 0xFFFFFFFF:#x}"
    for uplink in config.uplinks:
        out += [
            f"\tchain to_{uplink.name} {{",
            f"\t\tmeta mark set meta mark and {keep} or {uplink.mark:#x} accept",
            "\t}",
            f"\tchain ct_{uplink.name} {{",
            f"\t\tct mark set ct mark and {keep} or {uplink.mark:#x}",
            "\t}",
            # Came in from the internet: its uplink's, and labelled so release_flows keeps it.
            f"\tchain in_{uplink.name} {{",
            f"\t\tct mark set ct mark and {keep} or {uplink.mark:#x}"
            + (f" ct label set {INBOUND_LABEL}" if labels else ""),
            "\t}",
        ]
    out += [
        "\tchain output {",
        "\t\ttype route hook output priority mangle; policy accept;",
        f"\t\t{restore}",
        "\t}",
        "\tchain postrouting {",
        "\t\ttype filter hook postrouting priority mangle; policy accept;",
        # A new connection belongs to the uplink it actually leaves through.
        f"\t\tct mark and {mask} == 0 oifname vmap {{ {by_oif} }}",
        "\t}",
    ]
    return "\n".join(out) + "\n" + _render_nat(config) + "}\n"


def _lan_prefixes(config: Config) -> list[str]:
    return [p for u in config.uplinks for p in u.lan_prefixes6]


def _uplink_interfaces(config: Config) -> str:
    """The uplinks' interfaces as the elements of an anonymous nft set."""
    return ", ".join(f'"{u.interface}"' for u in config.uplinks)


def render_steering_update(config: Config, before: Steering, after: Steering) -> str:
    """One transaction that moves the live table from `before` to `after` without
    rewriting it: the per-host placements of `sticky = "source"` survive, except
    those on uplinks that left their balance group (those hosts are placed anew)."""
    out: list[str] = []
    for chain, rules in _steering_chains(config, after).items():
        out.append(f"flush chain {NFT_TABLE} {chain}")
        out += [f"add rule {NFT_TABLE} {chain} {rule}" for rule in rules]
    for family, name in _source_sets(config):
        kept = {n for n, _ in after.balance.get(family, ())}
        if name in {n for n, _ in before.balance.get(family, ())} - kept:
            out.append(f"flush set {NFT_TABLE} source{family}_{name}")
    return "\n".join(out) + "\n"


def _source_sets(config: Config) -> list[tuple[int, str]]:
    """With `sticky = "source"`: per family and uplink, the hosts placed on it."""
    if config.agent.sticky != "source":
        return []
    return [(f, u.name) for f in config.families for u in config.uplinks if f in u.families]


def _policy_rows(config: Config) -> list[tuple[PolicyConfig, int]]:
    return [(p, f) for p in config.policies for f in p.match.families if f in config.families]


def _policy_match(policy: PolicyConfig, family: int) -> str:
    """The nft match of one policy in one family."""
    match = policy.match
    address = NFT_ADDRESS[family]
    parts = [f"meta nfproto {FAMILY_NAME[family]}"]
    if match.iif:
        parts.append(f"iifname {{ {', '.join(json.dumps(i) for i in match.iif)} }}")
    for key, field in (("src", "saddr"), ("dst", "daddr")):
        nets = match.networks(key, family)
        if nets:
            parts.append(f"{address} {field} {{ {', '.join(nets)} }}")
    if match.protocol and not (match.src_port or match.dst_port):
        parts.append(f"meta l4proto {'ipv6-icmp' if match.protocol == 'icmpv6' else match.protocol}")
    for key, field in (("src_port", "sport"), ("dst_port", "dport")):
        ports: tuple[str, ...] = getattr(match, key)
        if ports:
            parts.append(f"{match.protocol} {field} {{ {', '.join(ports)} }}")
    return " ".join(parts)


def _steering_chains(config: Config, steering: Steering) -> dict[str, list[str]]:
    """The bodies of the chains that change with health: `balance` and one per policy."""
    chains = {"balance": _balance_rules(config, steering)}
    for policy in config.policies:
        rules: list[str] = []
        chosen = steering.policies.get(policy.name, {})
        for family in policy.match.families:
            if family not in config.families:
                continue
            nfproto = f"meta nfproto {FAMILY_NAME[family]}"
            uplink = chosen.get(family)
            if uplink is not None:
                rules.append(f"{nfproto} goto to_{uplink}")
            elif policy.fallback == "drop":
                # Only what would leave through an uplink: main's LANs and VPNs stay reachable.
                rules.append(f"{nfproto} fib daddr oifname {{ {_uplink_interfaces(config)} }} drop")
        chains[f"policy_{policy.name}"] = rules
    return chains


def _balance_rules(config: Config, steering: Steering) -> list[str]:
    rules: list[str] = []
    by_source = config.agent.sticky == "source"
    for family in config.families:
        members = steering.balance.get(family, ())
        if len(members) < 2:
            continue  # the selection table's default route carries it all
        nfproto = f"meta nfproto {FAMILY_NAME[family]}"
        host = f"{NFT_ADDRESS[family]} saddr"
        if by_source:
            # A host already placed on a member stays there (and its placement is refreshed).
            for name, _ in members:
                placed = f"@source{family}_{name}"
                rules.append(f"{nfproto} {host} {placed} update {placed} {{ {host} }} goto to_{name}")
        target = f"new{family}_" if by_source else "to_"
        spans: list[str] = []
        start = 0
        for name, weight in members:
            end = start + weight - 1
            spans.append(f"{start if end == start else f'{start}-{end}'} : goto {target}{name}")
            start = end + 1
        rules.append(f"{nfproto} numgen random mod {start} vmap {{ {', '.join(spans)} }}")
    return rules


def _render_nat(config: Config) -> str:
    """Masquerade on the uplinks with `nat = true`, but not towards their `nat_exclude`; and
    the LAN prefixes of uplinks with lan_prefix_failover = "nat66" wherever else they leave."""
    rules: list[str] = []
    for uplink in config.uplinks:
        others = [f'"{u.interface}"' for u in config.uplinks if u is not uplink and 6 in u.families]
        if uplink.lan_prefix_failover == "nat66" and others:
            # masquerade, not NPTv6: the other uplink's address is all its ISP lets out.
            prefixes = ", ".join(uplink.lan_prefixes6)
            rules.append(f"oifname {{ {', '.join(others)} }} ip6 saddr {{ {prefixes} }} masquerade")
    for uplink in config.uplinks:
        if not uplink.nat:
            continue
        oif = f'oifname "{uplink.interface}"'
        for family, keyword in ((4, "ip"), (6, "ip6")):
            nets = [n for n in uplink.nat_exclude if ipaddress.ip_network(n).version == family]
            if nets:
                rules.append(f"{oif} {keyword} daddr {{ {', '.join(nets)} }} return")
        rules.append(f"{oif} masquerade")
    if not rules:
        return ""
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return f"\tchain nat {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n{body}\t}}\n"


async def nft_run(*args: str, script: str | None = None, timeout_s: float = NFT_TIMEOUT_S) -> tuple[int, str]:
    """Run the nft CLI (present wherever nftables is); (exit code, stderr).

    Never longer than `timeout_s`: a hung nft is killed (its whole process group:
    a wrapper script's children too) and reported as NFT_TIMED_OUT.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            "nft",
            *args,
            stdin=asyncio.subprocess.PIPE if script is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as err:
        return NFT_MISSING, str(err)
    try:
        _, stderr = await wait_within(
            proc.communicate(script.encode() if script is not None else None), timeout_s
        )
    except (asyncio.TimeoutError, TimeoutError):
        await _reap(proc)
        return NFT_TIMED_OUT, f"nft did not answer within {format_duration(timeout_s)} and was killed"
    except BaseException:  # cancelled (shutdown): leave no nft behind
        _kill_group(proc)
        raise
    return proc.returncode or 0, stderr.decode(errors="replace").strip()


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill a process that outlived its timeout, and wait (boundedly) for it to be gone."""
    _kill_group(proc)
    try:
        await wait_within(proc.wait(), 2.0)
    except TimeoutError:
        pass


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def nft_check(config: Config, steering: Steering) -> str:
    """Why this config's table cannot be checked or would not load, or "" if `nft -c` accepts it."""
    code, error = await nft_run("-c", "-f", "-", script=render_nft(config, steering))
    if code == 0:
        return ""
    if code == NFT_MISSING:
        return f"nft is not available ({error})"
    return f"nft -c refuses the new table: {error}" if code != NFT_TIMED_OUT else error


class NftEvents:
    """Wakes the daemon on any nftables change (NFNLGRP_NFTABLES), to notice a flushed table."""

    def __init__(self, on_event: Callable[[], None]) -> None:
        self._on_event = on_event
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self._sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(256):
            try:
                self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
        self._on_event()

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class NftEdge:
    """The table `inet multiwan`, carried out: desired (the newest SteeringWanted) versus live.

    A task of its own: routing never waits for nft. Every nft run has a timeout. A wanted
    table that does not load is retried with a doubling back-off, and what goes wrong is
    logged once and reported to the core (status), not on every retry; meanwhile the table
    that is loaded, if any, keeps following the steering as far as it can carry it.
    """

    def __init__(self, post: Callable[[Observation], None], dry_run: bool) -> None:
        self._post = post
        self._dry_run = dry_run
        self._wanted: SteeringWanted | None = None
        self._wake = asyncio.Event()
        #: What is loaded in the kernel: the config and steering of the last table that loaded
        #: (None: no table of ours, as far as we know).
        self._live_config: Config | None = None
        self._live_steering: Steering | None = None
        #: The config of the last install attempt, and whether our table was found gone.
        self._tried_config: Config | None = None
        #: Whether the kernel takes conntrack labels (until a table with them is refused).
        self._labels = True
        self._gone = False
        #: Another program changed nftables (or it is time to look): is our table still there?
        self._check = False
        self._failing: str | None = None
        self._retry_delay_s = 0.0
        self._retry_at = 0.0
        self._reported = NftStatus()
        #: When the nft run in progress started (monotonic), for the watchdog.
        self._busy_since: float | None = None

    def want(self, wanted: SteeringWanted) -> None:
        self._wanted = wanted
        self._wake.set()

    def changed(self) -> None:
        self._check = True
        self._wake.set()

    def stuck_for(self, now: float) -> float | None:
        """How long an nft run has gone on past its timeout (it should have been killed)."""
        if self._busy_since is None:
            return None
        late = now - self._busy_since - NFT_TIMEOUT_S
        return late if late > NFT_STUCK_GRACE_S else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            events: NftEvents | None = NftEvents(self.changed)
        except OSError as err:
            events = None
            log.warning("nft: no change events (%s); checking every %.0fs", err, RESYNC_PERIOD_S)
        try:
            while True:
                wait_s = RESYNC_PERIOD_S if not self._failing else max(self._retry_at - loop.time(), 0.0)
                try:
                    await wait_within(self._wake.wait(), wait_s)
                except TimeoutError:
                    self._check = True
                self._wake.clear()
                wanted = self._wanted
                if wanted is None:
                    continue
                if self._dry_run:
                    if wanted.config is not self._tried_config:
                        log.info("dry-run: would install nft table %s (stickiness and steering)", NFT_TABLE)
                        self._tried_config = wanted.config
                    continue
                await self._converge(wanted, loop.time())
                self._report(wanted)
        finally:
            if events is not None:
                events.close()

    async def _converge(self, wanted: SteeringWanted, now: float) -> None:
        # What is wanted first (a steering change is on a switch's path), the look second.
        await self._follow(wanted, now)
        if self._check and self._live_config is not None:
            self._check = False
            code, _ = await self._nft("list", "table", *NFT_TABLE.split())
            if code not in (0, NFT_TIMED_OUT):  # a hung nft says nothing about the table
                log.warning("nft: table %s is gone; re-installing", NFT_TABLE)
                self._live_config = self._live_steering = None
                self._gone = True
                await self._follow(wanted, now)
        self._check = False

    async def _follow(self, wanted: SteeringWanted, now: float) -> None:
        if wanted.config is not self._live_config:
            backing_off = self._failing is not None and now < self._retry_at
            if not backing_off or wanted.config is not self._tried_config:
                if await self._install(wanted):
                    return
            if self._live_config is None:
                return
            # The new table does not load, the old one is live: it steers as far as it can.
            target = carry_steering(wanted.steering, self._live_config)
        else:
            target = wanted.steering
        if target == self._live_steering:
            return
        script = render_steering_update(self._live_config, self._live_steering or Steering(), target)
        code, error = await self._nft("-f", "-", script=script)
        if code == 0:
            self._live_steering = target
            return
        log.warning("nft: cannot update the steering of %s: %s; re-installing the table", NFT_TABLE, error)
        self._live_config = self._live_steering = None
        self._wake.set()

    async def _install(self, wanted: SteeringWanted) -> bool:
        """Write the whole table in one transaction; an error is logged once, routing works on."""
        if self._gone:
            why = "it was removed, e.g. by another firewall's reload"
        elif self._tried_config is None:
            why = "start"
        elif wanted.config is not self._tried_config:
            why = "config changed"
        else:
            why = "retry"
        code, error = await self._nft(
            "-f", "-", script=render_nft(wanted.config, wanted.steering, self._labels)
        )
        if code not in (0, NFT_TIMED_OUT, NFT_MISSING) and self._labels and "label" in error:
            # A kernel without conntrack labels (nf_conntrack_labels): the table without them.
            unlabelled = render_nft(wanted.config, wanted.steering, labels=False)
            code, plain_error = await self._nft("-f", "-", script=unlabelled)
            if code == 0:
                self._labels = False
                log.warning(
                    "nft: conntrack labels are not available here (%s); the table is installed without "
                    "them: release_flows knows connections from the internet by their DNAT and by the "
                    "router's own addresses only",
                    error.splitlines()[0] if error else "refused",
                )
            else:
                error = plain_error
        tried, self._tried_config = self._tried_config, wanted.config
        if code == 0:
            log.info("nft: installed table %s (%s)", NFT_TABLE, why)
            self._live_config, self._live_steering = wanted.config, wanted.steering
            self._failing, self._retry_delay_s, self._gone = None, 0.0, False
            return True
        if error != self._failing or wanted.config is not tried:
            log.error(
                "nft: cannot install table %s (%s): %s; connections will not stick to their uplink "
                "(routing and failover work on); retrying with back-off",
                NFT_TABLE,
                why,
                error,
            )
        self._failing = error
        self._retry_delay_s = min(max(self._retry_delay_s * 2, 1.0), RESYNC_PERIOD_S)
        self._retry_at = asyncio.get_running_loop().time() + self._retry_delay_s
        return False

    async def _nft(self, *args: str, script: str | None = None) -> tuple[int, str]:
        self._busy_since = time.monotonic()
        try:
            return await nft_run(*args, script=script)
        finally:
            self._busy_since = None

    def _report(self, wanted: SteeringWanted) -> None:
        live = self._live_steering if self._live_config is not None else None
        current = wanted.config is self._live_config and wanted.steering == self._live_steering
        report = NftStatus(live, current, self._failing)
        if report != self._reported:
            self._reported = report
            self._post(NftReported(report))

    async def remove(self) -> None:
        """--cleanup: delete our table (and nothing else)."""
        code, error = await nft_run("delete", "table", *NFT_TABLE.split(), timeout_s=NFT_CLEANUP_TIMEOUT_S)
        if code == 0:
            log.info("cleanup: deleted nft table %s", NFT_TABLE)
        elif self._live_config is not None or code == NFT_TIMED_OUT:
            log.warning("cleanup: cannot delete nft table %s: %s", NFT_TABLE, error)


# Status document #############################################################
#
# Owns status.json: the one function that builds it from the agent state, its
# atomic writes, the lock that says an agent runs, and reading any such file
# back as untrusted input: a bad one is named and ignored, never a crash.


def _running_task_count() -> int | None:
    """How many asyncio tasks the running loop holds, or None when no loop runs."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return None


def status_document(
    state: AgentState, *, running: bool, dry_run: bool, boot_id: str | None, mono_now: float, wall_now: float
) -> dict[str, Any]:
    config = state.config
    primary = primary_family(config)
    hysteresis = agent_hysteresis(config.agent)
    balancing = {f: _balancing(state, f) for f in config.families}
    routed_prefixes = lan_routed(state)
    uplinks: dict[str, Any] = {}
    for uplink in config.uplinks:
        health = state.healths[uplink.name]
        ready_at = proof_ready_at(health, hysteresis) if health.state is State.UP else None
        interface = state.interfaces.get(uplink.interface)
        quality = health.quality
        uplinks[uplink.name] = {
            "state": health.state.value,
            "since": round(wall_now - (mono_now - health.since), 3),
            "since_monotonic": round(health.since, 6),
            "reason": health.reason,
            "selected": any(state.selected(f) == uplink.name for f in config.families),
            "families": [FAMILY_NAME[f] for f in uplink.families],
            "selected_for": [FAMILY_NAME[f] for f in config.families if state.selected(f) == uplink.name],
            "interface": uplink.interface,
            # ready: the interface exists, is up, has an address and a gateway; else not probed.
            "ready": health.link_usable,
            "ready_reason": None if health.link_usable else link_observation(uplink, interface).reason,
            "failure": health.failure if health.state is State.DOWN else None,
            "address": interface.address if interface else None,
            "gateway": uplink_gateway(uplink, interface, 4),
            "address6": interface.address6 if interface else None,
            "gateway6": uplink_gateway(uplink, interface, 6),
            "priority": uplink.priority,
            "weight": uplink.weight,
            "balanced_for": [FAMILY_NAME[f] for f in config.families if uplink.name in balancing[f]],
            "table": uplink.table,
            "mark": uplink.mark,
            "rtt_ms": None if health.rtt_ms is None else round(health.rtt_ms, 3),
            # over the quality window (the last `window` rounds)
            "loss_pct": None if quality is None else round(quality.loss_pct, 1),
            "median_rtt_ms": None if quality is None or quality.rtt_ms is None else round(quality.rtt_ms, 3),
            "jitter_ms": None
            if quality is None or quality.jitter_ms is None
            else round(quality.jitter_ms, 3),
            "window_rounds": 0 if quality is None else quality.rounds,
            "good_rounds": health.good_rounds,
            "bad_rounds": health.bad_rounds,
            # came back from a failure: owes the hysteresis before traffic returns
            "recovered": health.recovered,
            "has_failed": health.has_failed,
            # flap damping: its failures that still weigh, their figure of merit now, the
            # penalty its proof owes beyond the hysteresis, and how long it still proves itself
            "flaps": len(recent_failures(health, hysteresis, mono_now)),
            "flap_merit": round(flap_merit(health.failures, hysteresis.half_life_s, mono_now), 3),
            "flap_penalty_s": round(owed_hysteresis_s(health, hysteresis) - hysteresis.base_s, 3),
            "hysteresis_owed_s": 0.0 if ready_at is None else round(max(ready_at - mono_now, 0.0), 3),
            # tracked connections that stick to this uplink (its connection mark)
            "connections": None if state.connections is None else state.connections.get(uplink.name),
            # probes whose own code raised (a bug in the agent; they count neither way)
            "probe_errors": state.probe_errors.get(uplink.name, 0),
            # rounds in a row that judged nothing: past `fall`, its health stands still
            "unjudged_rounds": state.unjudged.get(uplink.name, 0),
            # taken out of selection, balance and policies by an operator (its probes go on)
            "drained": uplink.name in state.drained,
            # per ICMP target, how long its probes wait now (the adaptive timeout, or the ceiling)
            "timeouts_ms": dict(health.timeouts_ms),
            # the confirmation burst running ("fall after a failed round"), or null
            "burst": health.burst,
            # replies in the quality window that came after their adaptive timeout (not lost)
            "late_replies": sum(sample.late for sample in health.samples),
            # passive health from its forwarded connections (null: off); the last suspicion
            "passive": _passive_status(state.passive.get(uplink.name)),
            "suspicion": health.suspicion,
            # IPv6 prefixes of the LAN its ISP delegated, and whether they leave through it now
            # (else, with lan_prefix_failover = "nat66", masqueraded by the IPv6 selection)
            "lan_prefixes6": list(uplink.lan_prefixes6),
            "lan_prefixes_here": bool(uplink.lan_prefixes6) and uplink.name in routed_prefixes,
            # per family it carries, that family's own health (`state` above is the best of them)
            "health": {
                FAMILY_NAME[f]: _family_status(state, uplink, f, h, mono_now, wall_now)
                for f, h in state.uplink_healths(uplink.name).items()
            },
        }
    primary_decision = state.decisions.get(primary, Decision(None, "starting"))
    return {
        "version": STATUS_VERSION,
        "pid": os.getpid(),
        # asyncio tasks alive in the agent (null outside its loop): a soak watches it for leaks
        "tasks": _running_task_count(),
        "boot_id": boot_id,
        "running": running,
        "dry_run": dry_run,
        "updated": round(wall_now, 3),
        "updated_monotonic": round(mono_now, 6),
        # `selected`/`reason`/`stranded` speak of IPv4 (IPv6 when only IPv6 is configured);
        # `families` has each configured family's own.
        "selected": primary_decision.selected,
        "reason": primary_decision.reason,
        "stranded": primary_decision.stranded,
        "families": {
            FAMILY_NAME[f]: {
                "selected": state.selected(f),
                "reason": state.decisions.get(f, Decision(None, "starting")).reason,
                "stranded": state.decisions.get(f, Decision(None, "starting")).stranded,
                # the uplinks sharing new connections, with their weights (empty: no balancing)
                "balance": _balancing(state, f),
            }
            for f in config.families
        },
        "sticky": config.agent.sticky,
        # per policy and family: the uplink its traffic takes (null: its fallback)
        "policies": {
            policy.name: {
                "fallback": policy.fallback,
                **{
                    FAMILY_NAME[f]: {"uplink": d.selected, "reason": d.reason}
                    for f, d in state.policy_decisions.get(policy.name, {}).items()
                },
            }
            for policy in config.policies
        },
        # objects of other programs that defeat one of the agent's guarantees (never deleted)
        "foreign": [{"object": f.what, "defeats": f.defeats} for f in state.foreign],
        # the nft table (stickiness, steering, NAT): routing and failover never depend on it
        # `installed`: a table of ours is loaded; `current`: it is the one wanted; `problem`: why not
        "nft": {
            "installed": state.nft.live is not None,
            "current": state.nft.current,
            "problem": state.nft.problem,
        },
        # route changes that fail and are being retried
        "route_failures": [f"{what}: {error}" for what, error in sorted(state.route_failures)],
        "uplinks": uplinks,
    }


def _family_status(
    state: AgentState, uplink: UplinkConfig, family: int, health: Health, mono_now: float, wall_now: float
) -> dict[str, Any]:
    """One family's health of an uplink, for status."""
    quality = health.quality
    interface = state.interfaces.get(uplink.interface)
    return {
        "state": health.state.value,
        "since": round(wall_now - (mono_now - health.since), 3),
        "since_monotonic": round(health.since, 6),
        "reason": health.reason,
        "selected": state.selected(family) == uplink.name,
        "ready": health.link_usable,
        "ready_reason": None
        if health.link_usable
        else link_observation(uplink, interface, family if len(uplink.families) > 1 else None).reason,
        "failure": health.failure if health.state is State.DOWN else None,
        "rtt_ms": None if health.rtt_ms is None else round(health.rtt_ms, 3),
        "loss_pct": None if quality is None else round(quality.loss_pct, 1),
        "window_rounds": 0 if quality is None else quality.rounds,
        "good_rounds": health.good_rounds,
        "bad_rounds": health.bad_rounds,
        "recovered": health.recovered,
        "has_failed": health.has_failed,
    }


def _passive_status(view: PassiveView | None) -> dict[str, Any] | None:
    if view is None:
        return None
    return {
        "state": view.state,
        "connections": view.resolved,
        "unanswered": view.unanswered,
        "destinations": view.destinations,
        "baseline_pct": view.baseline_pct,
        "suspicions": view.suspicions,
    }


def track_value(state: AgentState) -> int:
    """keepalived's track_file value: how many configured families no uplink carries now
    (0 while all is well). Multiplied by the track_file's `weight` in keepalived.conf."""
    return sum(1 for f in state.config.families if state.decisions.get(f, Decision(None, "", True)).stranded)


def write_track_file(path: str, value: int) -> None:
    """Atomically, never deleted: keepalived takes a missing file for healthy."""
    _write_atomically(Path(path), f"{value}\n")


def primary_family(config: Config) -> int:
    """The family `selected` in status and STATUS= speaks of: IPv4 when configured."""
    return config.families[0] if config.families else 4


def _balancing(state: AgentState, family: int) -> dict[str, int]:
    """The uplinks sharing this family's new connections, by weight (empty: none shared)."""
    members = state.steering.balance.get(family, ())
    return dict(members) if len(members) > 1 else {}


def status_summary(state: AgentState) -> str:
    """One line for sd_notify's STATUS=."""
    config = state.config
    states = ", ".join(f"{n} {h.state.value}{_family_note(state, n)}" for n, h in state.healths.items())
    selected = " ".join(
        f"selected{'' if f == primary_family(config) else '6'}={state.selected(f) or 'none'}"
        for f in config.families
    )
    stranded = any(d.stranded for d in state.decisions.values())
    return f"{selected}; {states}" + ("; NO UPLINK UP" if stranded else "")


def _family_note(state: AgentState, name: str) -> str:
    """' (ipv6 down)' for an uplink whose families' states differ; '' otherwise."""
    healths = state.uplink_healths(name)
    if len({h.state for h in healths.values()}) < 2:
        return ""
    whole = state.healths[name].state
    return (
        " ("
        + ", ".join(f"{FAMILY_NAME[f]} {h.state.value}" for f, h in healths.items() if h.state is not whole)
        + ")"
    )


def write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one.

    Compact, in one dumps: only then does json use its C encoder, and at 64 uplinks the
    indented, streamed form took 3 ms of the event loop per write (11 ms at 250), which
    probes scheduled meanwhile waited for. `status --json` prints it indented."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    os.replace(tmp, path)


class StatusError(Exception):
    """A status.json that is not one, rendered like a config error: `file: key.path: message`."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        where = f"{source}: {key_path}: " if key_path else f"{source}: "
        super().__init__(where + message)


#: What each field of a status document may hold, as far as a reader relies on it.
_NUMBER: Final = (int, float)
_UPLINK_FIELDS: Final[Mapping[str, tuple[type, ...]]] = {
    "state": (str,),
    "since": _NUMBER,
    "since_monotonic": _NUMBER,
    "reason": (str,),
    "selected": (bool,),
    "interface": (str,),
    "recovered": (bool,),
    "has_failed": (bool,),
    "flaps": (int,),
    "flap_merit": _NUMBER,
    "flap_penalty_s": _NUMBER,
    "hysteresis_owed_s": _NUMBER,
    "rtt_ms": (*_NUMBER, type(None)),
    "loss_pct": (*_NUMBER, type(None)),
    "connections": (int, type(None)),
    "priority": (int,),
    "weight": (int,),
    "probe_errors": (int,),
    "timeouts_ms": (dict,),
    "burst": (str, type(None)),
    "passive": (dict, type(None)),
}
_TOP_FIELDS: Final[Mapping[str, tuple[type, ...]]] = {
    "version": (int,),
    "pid": (int,),
    "tasks": (int, type(None)),
    "boot_id": (str, type(None)),
    "running": (bool,),
    "dry_run": (bool,),
    "updated": _NUMBER,
    "updated_monotonic": _NUMBER,
    "selected": (str, type(None)),
    "reason": (str,),
    "stranded": (bool,),
    "sticky": (str,),
    "families": (dict,),
    "policies": (dict,),
    "foreign": (list,),
    "nft": (dict,),
    "route_failures": (list,),
    "uplinks": (dict,),
}
_REQUIRED: Final = ("version", "pid", "updated", "updated_monotonic", "uplinks")


def parse_status(text: str, source: str) -> dict[str, Any]:
    """A status document, checked like a config: the fields a reader uses have the right
    types (bools are not numbers), states are states. Raises StatusError."""
    if len(text) > STATUS_MAX_BYTES:
        raise StatusError(source, "", f"expected at most {STATUS_MAX_BYTES} bytes, got {len(text)}")
    try:
        document = json.loads(text)
    except RecursionError:
        raise StatusError(source, "", "nested too deeply") from None
    except ValueError as err:
        raise StatusError(source, "", f"not JSON: {err}") from None

    def check(value: Any, path: str, types: tuple[type, ...]) -> None:
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise StatusError(source, path, f"expected {names}, got {_show(value)}")

    check(document, "", (dict,))
    _check_values(document, source, "")
    for key in _REQUIRED:
        if key not in document:
            raise StatusError(source, key, "is missing")
    for key, types in _TOP_FIELDS.items():
        if key in document:
            check(document[key], key, types)
    if document["version"] != STATUS_VERSION:
        raise StatusError(source, "version", f"expected {STATUS_VERSION}, got {document['version']}")
    for name, uplink in document["uplinks"].items():
        path = f"uplinks.{name}"
        check(uplink, path, (dict,))
        for key, types in _UPLINK_FIELDS.items():
            if key in uplink:
                check(uplink[key], f"{path}.{key}", types)
        if uplink.get("state") not in {s.value for s in State}:
            raise StatusError(
                source,
                f"{path}.state",
                f'expected "up", "degraded" or "down", got {_show(uplink.get("state"))}',
            )
    for family, about in document.get("families", {}).items():
        check(about, f"families.{family}", (dict,))
        check(about.get("selected"), f"families.{family}.selected", (str, type(None)))
        balance = about.get("balance", {})
        check(balance, f"families.{family}.balance", (dict,))
        for name, weight in balance.items():
            check(weight, f"families.{family}.balance.{name}", (int,))
    for name, policy in document.get("policies", {}).items():
        check(policy, f"policies.{name}", (dict,))
        for family, about in policy.items():
            if family != "fallback":
                check(about, f"policies.{name}.{family}", (dict,))
                check(about.get("uplink"), f"policies.{name}.{family}.uplink", (str, type(None)))
                check(about.get("reason", ""), f"policies.{name}.{family}.reason", (str,))
    for index, foreign in enumerate(document.get("foreign", [])):
        check(foreign, f"foreign[{index}]", (dict,))
        check(foreign.get("object"), f"foreign[{index}].object", (str,))
        check(foreign.get("defeats"), f"foreign[{index}].defeats", (str,))
    result: dict[str, Any] = document
    return result


def _check_values(value: Any, source: str, path: str) -> None:
    """Every number finite (1e400 as an integer is valid JSON), every string printable as UTF-8."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, source, path)
            _check_values(item, source, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_values(item, source, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            finite = math.isfinite(float(value))
        except OverflowError:
            finite = False
        if not finite:
            raise StatusError(source, path, "expected a finite number")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise StatusError(source, path, "expected text that is valid UTF-8") from None


def read_status(path: Path) -> dict[str, Any]:
    """The status document at `path`. Raises StatusError (also for a file that cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(STATUS_MAX_BYTES + 1)
    except OSError as err:
        raise StatusError(str(path), "", f"cannot read: {err.strerror}") from None
    return parse_status(text, str(path))


def previous_run(document: Mapping[str, Any]) -> PreviousRun:
    """What a restart needs of a (parsed) status document."""
    uplinks = {
        name: PreviousUplink(
            State(u["state"]),
            bool(u.get("has_failed", True)),
            bool(u.get("recovered", False)),
            float(u.get("since_monotonic", 0.0)),
        )
        for name, u in document["uplinks"].items()
    }
    return PreviousRun(document.get("boot_id"), uplinks)


def read_boot_id() -> str | None:
    """The kernel's id of this boot: CLOCK_MONOTONIC times compare only within one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def lock_state_dir(state_dir: str) -> int:
    """Take the lock that makes this the one agent for `state_dir`; the fd holds it.

    Raises StartupRefused when another agent holds it (nothing is changed).
    """
    path = Path(state_dir) / LOCK_FILE
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise StartupRefused(f"cannot open the lock {path}: {err.strerror}") from None
    try:
        # A `status` that looks at this moment holds the lock shared for microseconds:
        # try a few times before taking a held lock for another agent.
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_ATTEMPTS - 1:
                    raise
                time.sleep(LOCK_RETRY_S)
    except OSError as err:
        holder = _lock_holder_pid(fd)
        os.close(fd)
        if err.errno in (errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder else ""
            raise StartupRefused(
                f"another multiwan-agent{who} already runs with state_dir {state_dir}; stop it first"
            ) from None
        raise StartupRefused(f"cannot lock {path}: {err.strerror}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_holder_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def agent_running(state_dir: str) -> tuple[bool, int | None]:
    """Whether an agent holds the lock of `state_dir`, and its pid (read-only: takes nothing)."""
    path = Path(state_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True, _lock_holder_pid(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


class StatusWriter:
    """Writes status.json: at once on a decision, at most once a second for metrics, and
    every STATUS_HEARTBEAT_S anyway (a reader tells a dead or stuck agent by its age).
    A write that fails is warned about once, not on every attempt."""

    def __init__(
        self, path: Path, document: Callable[[bool], dict[str, Any]], hold: Callable[[], bool]
    ) -> None:
        self.path = path
        self._document = document
        #: True while a write would show decisions whose routes are not in place yet.
        self._hold = hold
        self._dirty = False
        self._now_pending = False
        self._written_at = float("-inf")
        #: How long metric-only changes wait to be written (see STATUS_METRICS_CPU_SHARE).
        self.metrics_period_s = STATUS_METRICS_PERIOD_S
        self._failing = False

    def note(self, urgency: StatusWrite) -> None:
        if urgency is StatusWrite.NOW:
            # Once per turn of the event loop, after the observations it handles: eight
            # uplinks of one probe slot coming up at once are one write, not eight (at 250
            # uplinks a write is tens of ms).
            if not self._now_pending:
                self._now_pending = True
                asyncio.get_running_loop().call_soon(self._write_now)
        elif urgency is StatusWrite.SOON:
            self._dirty = True

    def _write_now(self) -> None:
        self._now_pending = False
        self.write()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(STATUS_METRICS_PERIOD_S)
            since = time.monotonic() - self._written_at
            due = (self._dirty and since >= self.metrics_period_s) or since >= STATUS_HEARTBEAT_S
            if due and not self._hold():
                self.write()

    def write(self, running: bool = True) -> None:
        self._dirty = False
        self._written_at = time.monotonic()
        cpu_before = time.thread_time()
        try:
            write_json_atomically(self.path, self._document(running))
            cost_s = time.thread_time() - cpu_before
            self.metrics_period_s = min(
                max(cost_s / STATUS_METRICS_CPU_SHARE, STATUS_METRICS_PERIOD_S), STATUS_HEARTBEAT_S
            )
        except OSError as err:
            if not self._failing:
                log.warning("cannot write %s: %s; status stays stale until it can be written", self.path, err)
                self._failing = True
            return
        if self._failing:
            log.info("status: %s is written again", self.path)
            self._failing = False


# History ######################################################################
#
# Owns the record of what the agent decided: one flat JSON object per event (the
# same for history, hooks, webhooks and metrics), a bounded ring of them kept
# atomically in state_dir across restarts, and the drains an operator made.


def event_record(event: Event, wall_now: float, mono_now: float) -> dict[str, Any]:
    """An event as everyone outside the agent sees it: `event` (a HOOK_EVENTS name), `time`
    (wall clock, for people), `monotonic` (for order within a boot) and its fields."""
    record: dict[str, Any] = {
        "time": round(wall_now - (mono_now - event.at), 3),
        "monotonic": round(event.at, 6),
    }
    match event:
        case Transition(uplink, old, new, reason, _at, family):
            record |= {
                "event": f"uplink_{new.value}",
                "uplink": uplink,
                "state": new.value,
                "previous": old.value,
            }
            if family is not None:
                # An uplink that carries several families changes state per family.
                record["family"] = FAMILY_NAME[family]
            record["reason"] = reason
        case SelectionChanged(family, old, new, reason, _at, _evidence):
            record |= {"event": "switch", "family": FAMILY_NAME[family], "selected": new, "previous": old}
            record |= {"uplink": new, "reason": reason}
        case NoUplinkUp(family, kept, reason, _at):
            record |= {
                "event": "no_uplink",
                "family": FAMILY_NAME[family],
                "selected": kept,
                "reason": reason,
            }
        case FailbackWaiting(family, reason, _at):
            record |= {"event": "failback_waiting", "family": FAMILY_NAME[family], "reason": reason}
        case BalanceChanged(family, members, changes, _at):
            record |= {"event": "balance", "family": FAMILY_NAME[family], "members": dict(members)}
            record["reason"] = ", ".join(changes)
        case PolicyChanged(policy, family, old, new, fallback, reason, _first, _at):
            record |= {"event": "policy", "policy": policy, "family": FAMILY_NAME[family], "uplink": new}
            record |= {"selected": new, "previous": old, "fallback": fallback, "reason": reason}
        case Renumbered(uplink, change, _at):
            record |= {"event": "renumbered", "uplink": uplink, "reason": change}
        case Adopted(uplink, family, _at):
            record |= {
                "event": "adopted",
                "uplink": uplink,
                "family": FAMILY_NAME[family],
                "selected": uplink,
            }
            record["reason"] = "the selected default route of a previous run points at it"
        case FlowsReleased(uplink, families, why, _mark, _mask, released, _at):
            record |= {
                "event": "flows_released",
                "uplink": uplink,
                "reason": why,
                "released": released.deleted,
            }
            record |= {"families": [FAMILY_NAME[f] for f in sorted(families)], "kept": released.inbound_kept}
            record |= {"failed": released.failed, "error": released.error, "cancelled": released.cancelled}
        case RouteChangeFailed(change, error, _at):
            record |= {"event": "route_change_failed", "reason": f"{change}: {error}"}
        case RouteChangeRecovered(change, _at):
            record |= {"event": "route_change_recovered", "reason": change}
        case ForeignAppeared(foreign, _at):
            record |= {"event": "foreign_object", "reason": f"{foreign.what}: {foreign.defeats}"}
        case ForeignGone(foreign, _at):
            record |= {"event": "foreign_object_gone", "reason": foreign.what}
        case Drained(uplink, release, stranded, _at):
            reason = "drained by the operator" + (", its flows released" if release else "")
            if stranded:
                reason += f"; forced, the last uplink up for {'/'.join(FAMILY_TITLE[f] for f in stranded)}"
            record |= {"event": "drain", "uplink": uplink, "release": release, "reason": reason}
        case Undrained(uplink, _at):
            record |= {"event": "undrain", "uplink": uplink, "reason": "undrained by the operator"}
        case HealthUnjudged(uplink, rounds, state, _at):
            record |= {"event": "health_unjudged", "uplink": uplink, "state": state.value}
            record["reason"] = f"{rounds} rounds in a row judged nothing (its probes raise)"
        case HealthJudgedAgain(uplink, rounds, _at):
            record |= {"event": "health_judged", "uplink": uplink, "reason": f"after {rounds} rounds"}
        case ProberDied(uplink, error, _at):
            record |= {"event": "prober_died", "uplink": uplink, "reason": error}
        case Reloaded(source, uplinks, nft_note, changed, _at):
            reason = ("applied" if changed else "applied, no change") + (f"; {nft_note}" if nft_note else "")
            record |= {"event": "reload", "config": source, "uplinks": uplinks, "reason": reason}
        case ReloadRejected(reason, _at):
            record |= {"event": "reload_rejected", "reason": reason}
        case Suspected(uplink, evidence, _at):
            record |= {"event": "suspect", "uplink": uplink, "reason": evidence}
    return record


class History:
    """The last HISTORY_SIZE events, in state_dir/history.json: written atomically at most
    once a second (and at exit), read back at start like any state file (a bad one is
    named and set aside, never a reason not to start)."""

    def __init__(self, path: Path, boot_id: str | None) -> None:
        self.path = path
        self._boot_id = boot_id
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_SIZE)
        self._seq = 0
        self._dirty = False
        self._failing = False

    def load(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                text = handle.read(HISTORY_MAX_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("ignoring the history in %s: cannot read: %s", self.path, err.strerror)
            return
        try:
            events = parse_history(text, str(self.path))
        except StatusError as err:
            log.warning("ignoring the history: %s", err)
            return
        self._events.extend(events)
        self._seq = max((e["seq"] for e in events), default=0)

    def add(self, record: dict[str, Any]) -> None:
        self._seq += 1
        self._events.append({"seq": self._seq, "boot_id": self._boot_id, **record})
        self._dirty = True

    def since(self, wall_s: float) -> list[dict[str, Any]]:
        return [e for e in self._events if e["time"] >= wall_s]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HISTORY_WRITE_PERIOD_S)
            if self._dirty:
                # Encoding 1,000 events takes milliseconds: a thread, off the pump's loop.
                await loop.run_in_executor(None, self.save)

    def save(self) -> None:
        self._dirty = False
        events = list(self._events)  # a snapshot: the ring goes on while this writes
        try:
            _write_atomically(self.path, json.dumps({"version": HISTORY_VERSION, "events": events}) + "\n")
        except OSError as err:
            if not self._failing:
                log.warning("cannot write %s: %s; history is kept in memory until it can be", self.path, err)
                self._failing = True
            self._dirty = True
            return
        self._failing = False


def parse_history(text: str, source: str) -> list[dict[str, Any]]:
    """A history file's events, checked like a status document. Raises StatusError."""
    if len(text) > HISTORY_MAX_BYTES:
        raise StatusError(source, "", f"expected at most {HISTORY_MAX_BYTES} bytes, got {len(text)}")
    try:
        document = json.loads(text)
    except RecursionError:
        raise StatusError(source, "", "nested too deeply") from None
    except ValueError as err:
        raise StatusError(source, "", f"not JSON: {err}") from None
    if not isinstance(document, dict) or document.get("version") != HISTORY_VERSION:
        raise StatusError(source, "version", f"expected a history document of version {HISTORY_VERSION}")
    _check_values(document, source, "")
    events = document.get("events")
    if not isinstance(events, list):
        raise StatusError(source, "events", f"expected an array, got {_show(events)}")
    for index, event in enumerate(events):
        where = f"events[{index}]"
        if not isinstance(event, dict):
            raise StatusError(source, where, f"expected an object, got {_show(event)}")
        for key, types in (
            ("seq", (int,)),
            ("event", (str,)),
            ("time", (int, float)),
            ("monotonic", (int, float)),
        ):
            value = event.get(key)
            if isinstance(value, bool) or not isinstance(value, types):
                raise StatusError(
                    source, f"{where}.{key}", f"expected a {types[0].__name__}, got {_show(value)}"
                )
    return events[-HISTORY_SIZE:]


def read_drains(path: Path) -> dict[str, Drain]:
    """The drains a previous run left (state_dir/drains.json). Raises StatusError."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(STATUS_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise StatusError(str(path), "", f"cannot read: {err.strerror}") from None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise StatusError(str(path), "", "not JSON") from None
    drained = document.get("drained") if isinstance(document, dict) else None
    if not isinstance(drained, dict):
        raise StatusError(str(path), "drained", "expected an object of uplink names")
    result: dict[str, Drain] = {}
    for name, drain in drained.items():
        since = drain.get("since") if isinstance(drain, dict) else None
        release = drain.get("release", False) if isinstance(drain, dict) else None
        if isinstance(since, bool) or not isinstance(since, (int, float)) or not isinstance(release, bool):
            raise StatusError(str(path), f"drained.{name}", 'expected {"since": <time>, "release": <bool>}')
        if not math.isfinite(float(since)) or not isinstance(name, str) or not NAME_RE.match(name):
            raise StatusError(str(path), f"drained.{name}", "expected an uplink name and a finite time")
        result[name] = Drain(float(since), release)
    return result


def write_drains(path: Path, drained: Mapping[str, Drain]) -> None:
    document = {n: {"since": round(d.since_wall, 3), "release": d.release} for n, d in drained.items()}
    write_json_atomically(path, {"version": 1, "drained": document})


# Control socket ###############################################################
#
# Owns state_dir/control.sock: line-delimited JSON requests and replies for the
# CLI (status, history, drain, undrain, reload), bounded in size, clients and
# time, so that no client can stall probing or switching.


class ControlServer:
    """One request per line, one reply per line: {"cmd": ...} -> {"ok": true, ...} or
    {"ok": false, "error": "..."}. Garbage gets an error reply; the agent goes on."""

    def __init__(
        self,
        path: Path,
        group: str,
        answer: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]],
    ) -> None:
        self.path = path
        self._group = group
        self._answer = answer
        self._clients = 0

    async def run(self) -> None:
        _remove_stale_socket(self.path)
        try:
            server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=CONTROL_MAX_REQUEST
            )
        except OSError as err:  # e.g. a state_dir path too long for a unix socket: the agent runs on
            log.error(
                "control socket %s: cannot listen: %s; status comes from status.json only", self.path, err
            )
            await asyncio.Event().wait()
            return
        try:
            os.chmod(self.path, 0o660)
            gid = grp.getgrnam(self._group).gr_gid if self._group != "root" else 0
            os.chown(self.path, -1, gid)
        except (KeyError, OSError) as err:
            log.error("control socket %s: cannot give it to group %s: %s", self.path, self._group, err)
        try:
            async with server:
                await server.serve_forever()
        finally:
            _remove_stale_socket(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= CONTROL_MAX_CLIENTS:
            writer.write(_reply_line({"ok": False, "error": f"busy: {CONTROL_MAX_CLIENTS} clients at once"}))
            await _close(writer)
            return
        self._clients += 1
        # One deadline for the whole connection: a slow client cannot hold its slot for long.
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        try:
            for _ in range(CONTROL_MAX_REQUESTS):
                try:
                    line = await wait_within(reader.readline(), max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    break
                except (ValueError, asyncio.LimitOverrunError):  # longer than the limit
                    writer.write(
                        _reply_line(
                            {"ok": False, "error": f"a request is at most {CONTROL_MAX_REQUEST} bytes"}
                        )
                    )
                    break
                if not line.endswith(b"\n"):
                    break  # EOF, or a half-closed client's last words
                reply = await self._request(line)
                writer.write(_reply_line(reply))
                await wait_within(writer.drain(), max(deadline - time.monotonic(), 0.0))
        except (TimeoutError, OSError):
            pass  # a slow or gone client: its loss
        finally:
            self._clients -= 1
            await _close(writer)

    async def _request(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return {"ok": False, "error": 'expected one JSON object per line, such as {"cmd": "status"}'}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'expected an object with a "cmd", such as {"cmd": "status"}'}
        try:
            return await self._answer(request)
        except Exception as err:  # the request's boundary: a bug answers an error, the server goes on
            log.exception("control: %s failed", request["cmd"])
            return {"ok": False, "error": f"the agent failed to answer: {type(err).__name__}"}


def _reply_line(reply: Mapping[str, Any]) -> bytes:
    return (json.dumps(reply, separators=(",", ":")) + "\n").encode()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await wait_within(writer.wait_closed(), 1.0)
    except (TimeoutError, OSError):
        pass


def _remove_stale_socket(path: Path) -> None:
    # Only a socket: the lock says no other agent runs, so one found here is a dead one's.
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def control_request(
    state_dir: str, request: Mapping[str, Any], timeout_s: float = CONTROL_CLIENT_WAIT_S
) -> dict[str, Any]:
    """One request to a running agent; raises OSError when none answers."""
    path = Path(state_dir) / CONTROL_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(_reply_line(request))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"{path}: the agent closed the connection")
            data += chunk
            if len(data) > CONTROL_MAX_REPLY:
                raise ConnectionError(f"{path}: a reply longer than {CONTROL_MAX_REPLY} bytes")
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ConnectionError(f"{path}: not a reply: {data[:80]!r}")
    return reply


# Hooks and webhooks ###########################################################
#
# Owns what tells the world: [[hook]] programs (no shell, the event in MULTIWAN_*
# and on stdin) and [[webhook]] POSTs (retried with back-off). Both queue boundedly
# and run off the pump: a hook that hangs or a receiver that is dead delays nothing.


def hook_environment(record: Mapping[str, Any]) -> dict[str, str]:
    """The MULTIWAN_* variables of one event ("" for a field it does not have)."""
    fields = ("event", "uplink", "family", "state", "previous", "selected", "reason")
    return {f"MULTIWAN_{key.upper()}": str(record.get(key) or "").replace("\0", "") for key in fields}


class Notifications:
    """Every event record goes to the hooks and webhooks that asked for it. A task of its
    own runs them: at most HOOK_CONCURRENCY hooks at once, one sender per webhook."""

    def __init__(self, config: Config) -> None:
        self._hooks: tuple[HookConfig, ...] = ()
        self._hook_queue: collections.deque[tuple[HookConfig, Mapping[str, Any]]] = collections.deque()
        self._senders: dict[WebhookConfig, WebhookSender] = {}
        self._wake = asyncio.Event()
        #: Events dropped because a queue was full, since start (a metric).
        self.dropped = 0
        self._dropped_logged_at = float("-inf")
        self.configure(config)

    def configure(self, config: Config) -> None:
        """At start and on reload: the hooks and webhooks of this config (a kept webhook keeps its queue)."""
        self._hooks = config.hooks
        kept = {w: s for w, s in self._senders.items() if w in config.webhooks}
        for sender in kept.values():
            sender.reread_token()
        self._senders = {w: kept.get(w) or WebhookSender(w, self._drop) for w in config.webhooks}
        self._wake.set()

    def submit(self, record: Mapping[str, Any]) -> None:
        for hook in self._hooks:
            if record.get("event") in hook.events:
                if len(self._hook_queue) >= HOOK_QUEUE:
                    self._hook_queue.popleft()
                    self._drop("hooks")
                self._hook_queue.append((hook, record))
                self._wake.set()
        for sender in self._senders.values():
            sender.submit(record)

    def _drop(self, where: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._dropped_logged_at >= NOTIFY_DROP_LOG_S:
            self._dropped_logged_at = now
            log.warning(
                "%s: queue full, the oldest event dropped (%d dropped since start)", where, self.dropped
            )

    async def run(self) -> None:
        running: set[asyncio.Task[None]] = set()
        senders: dict[WebhookSender, asyncio.Task[None]] = {}
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                for sender in [s for s in senders if s not in self._senders.values()]:
                    senders.pop(sender).cancel()
                for sender in self._senders.values():
                    task = senders.get(sender)
                    if task is not None and task.done() and not task.cancelled() and task.exception():
                        error = task.exception()
                        log.error(
                            "webhook=%s: sender died; restarting it", sender.webhook.shown, exc_info=error
                        )
                    if task is None or task.done():
                        senders[sender] = asyncio.ensure_future(sender.run())
                        senders[sender].add_done_callback(lambda _done: self._wake.set())
                while self._hook_queue and len(running) < HOOK_CONCURRENCY:
                    hook, record = self._hook_queue.popleft()
                    task = asyncio.ensure_future(self._run_hook(hook, record))
                    running.add(task)

                    def finished(done: asyncio.Task[None]) -> None:
                        running.discard(done)
                        self._wake.set()  # the next hook may start

                    task.add_done_callback(finished)
        finally:
            for task in [*running, *senders.values()]:
                task.cancel()

    async def _run_hook(self, hook: HookConfig, record: Mapping[str, Any]) -> None:
        name, event = hook.exec[0], record.get("event")
        try:
            proc = await asyncio.create_subprocess_exec(
                *hook.exec,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                # The agent's environment, but MULTIWAN_* is the event's alone.
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("MULTIWAN_")},
                    **hook_environment(record),
                },
                start_new_session=True,  # its children too can be killed at the timeout
            )
        except OSError as err:
            log.warning("hook=%s event=%s cannot run: %s", name, event, err.strerror or err)
            return

        async def exchange() -> bytes:
            assert proc.stdin is not None and proc.stderr is not None
            try:
                proc.stdin.write(json.dumps(record).encode() + b"\n")
                await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it did not read its stdin: its business
            tail = b""
            while chunk := await proc.stderr.read(4096):
                tail = (tail + chunk)[-HOOK_STDERR_KEPT:]  # a chatty hook costs no memory
            await proc.wait()
            return tail

        try:
            stderr = await wait_within(exchange(), hook.timeout_s)
        except TimeoutError:
            await _reap(proc)
            log.warning(
                "hook=%s event=%s killed: still running after its %s timeout",
                name,
                event,
                format_duration(hook.timeout_s),
            )
            return
        except BaseException:
            _kill_group(proc)
            raise
        if proc.returncode:
            last = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            log.warning("hook=%s event=%s exited %d: %s", name, event, proc.returncode, last[0][:200])


class WebhookSender:
    """One [[webhook]]: POSTs its events in order, retried with a doubling back-off; a full
    queue drops the oldest. Never logs a header value or the token (secrets)."""

    def __init__(self, webhook: WebhookConfig, drop: Callable[[str], None]) -> None:
        self.webhook = webhook
        self._drop = drop
        self._queue: collections.deque[Mapping[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self._token = _read_token(webhook.bearer_token_file)
        self._tls: Any = None

    def reread_token(self) -> None:
        """On reload: the token file may have been rotated."""
        self._token = _read_token(self.webhook.bearer_token_file)

    def submit(self, record: Mapping[str, Any]) -> None:
        if record.get("event") not in self.webhook.events:
            return
        if len(self._queue) >= WEBHOOK_QUEUE:
            self._queue.popleft()
            self._drop(f"webhook {self.webhook.shown}")
        self._queue.append(record)
        self._wake.set()

    async def run(self) -> None:
        delay_s = 0.0
        attempts = 0
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outcome = await self._post(self._queue[0])
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the attempt's boundary: a bug here drops no event
                log.exception("webhook=%s: an attempt failed", self.webhook.shown)
                outcome = f"{type(err).__name__}: {err}"
            if outcome is None:
                self._queue.popleft()
                delay_s, attempts = 0.0, 0
                continue
            attempts += 1
            if outcome.startswith("refused") or attempts >= WEBHOOK_ATTEMPTS:
                self._queue.popleft()
                log.warning(
                    "webhook=%s event dropped after %d attempts: %s", self.webhook.shown, attempts, outcome
                )
                delay_s, attempts = 0.0, 0
                continue
            delay_s = min(max(delay_s * 2, WEBHOOK_RETRY_S), WEBHOOK_RETRY_MAX_S)
            if attempts == 1:
                log.warning("webhook=%s: %s; retrying with back-off", self.webhook.shown, outcome)
            await asyncio.sleep(delay_s)

    async def _post(self, record: Mapping[str, Any]) -> str | None:
        """None when delivered; else why not ("refused ..." for an answer that a retry cannot change)."""
        webhook = self.webhook
        url = urllib.parse.urlsplit(webhook.url)
        body = json.dumps(record).encode()
        context: Any = None
        if url.scheme == "https":
            if self._tls is None:  # it reads the whole CA bundle: tens of ms, once, in a thread
                self._tls = await asyncio.get_running_loop().run_in_executor(
                    None, _webhook_tls, webhook.tls_verify
                )
            context = self._tls
        host = url.hostname or ""
        port = url.port or (443 if url.scheme == "https" else 80)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = [
            f"POST {path} HTTP/1.1",
            f"Host: {url.netloc.rsplit('@', 1)[-1]}",
            f"User-Agent: multiwan-agent/{__version__}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in webhook.headers),
        ]
        if self._token:
            headers.append(f"Authorization: Bearer {self._token}")
        writer: asyncio.StreamWriter | None = None
        try:

            async def exchange() -> int:
                nonlocal writer
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if context else None
                )
                writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
                await writer.drain()
                found = HTTP_STATUS_RE.match(await reader.readline())
                if found is None:
                    raise ProbeFailure("not an HTTP response")
                return int(found[1])

            code = await wait_within(exchange(), webhook.timeout_s)
        except TimeoutError:
            return f"no answer within {format_duration(webhook.timeout_s)}"
        except (OSError, ProbeFailure, ValueError) as err:  # ssl.SSLError is an OSError; a too long line
            return f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
        finally:
            if writer is not None:
                writer.close()
        if 200 <= code < 300:
            return None
        if 400 <= code < 500 and code not in (408, 429):
            return f"refused with HTTP {code}"
        return f"HTTP {code}"


def _webhook_tls(verify: bool) -> Any:
    import ssl

    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _read_token(path: str | None) -> str:
    if path is None:
        return ""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        log.error("webhook: cannot read bearer_token_file %s: %s; sending without a token", path, err)
        return ""
    if any(c in token for c in "\r\n\0"):
        log.error("webhook: bearer_token_file %s holds more than one line; sending without a token", path)
        return ""
    return token


# Metrics ######################################################################
#
# Owns the Prometheus exposition (text format 0.0.4): counters fed by rounds and
# events, gauges read off the agent state, served on metrics_listen and/or
# written atomically as a node_exporter textfile. Labels: uplink, family,
# target, method (and reason on probe failures, version on build info).

#: Histogram buckets, in seconds.
RTT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DETECTION_BUCKETS: Final = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    15.0,
    30.0,
    60.0,
)
ROUTE_CHANGE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Probe failure reasons, as the failures counter's `reason` label (a bounded set).
FAILURE_REASONS: Final = (
    "timeout",
    "unreachable",
    "ttl_exceeded",
    "refused",
    "status",
    "tls",
    "dns",
    "error",
)


def failure_reason(reason: str) -> str:
    """A probe's reason ("unreachable (from 203.0.113.1)") as a bounded label value."""
    for prefix, label in (
        ("timeout", "timeout"),
        ("unreachable", "unreachable"),
        ("ttl exceeded", "ttl_exceeded"),
        ("refused", "refused"),
        ("status ", "status"),
        ("tls", "tls"),
    ):
        if reason.startswith(prefix):
            return label
    return "dns" if reason in DNS_RCODES.values() or reason.startswith("rcode") else "error"


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Counted in the bucket it falls in (render() makes the counts cumulative): every
        probe's RTT comes here, and scanning every bucket per probe showed in profiles."""
        self.total += 1
        self.sum += value
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1


Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Counters and histograms fed by the pump; render() adds the gauges of the state."""

    def __init__(self) -> None:
        self.requests: dict[Labels, int] = {}
        self.failures: dict[Labels, int] = {}
        self.rtt: dict[Labels, Histogram] = {}
        self.state_changes: dict[Labels, int] = {}
        self.switches: dict[Labels, int] = {}
        self.released: dict[Labels, int] = {}
        self.detection: dict[Labels, Histogram] = {}
        self.route_change = Histogram(ROUTE_CHANGE_BUCKETS)
        self.reload_ok = 1
        self.burst_rounds: dict[Labels, int] = {}

    def on_round(self, result: RoundResult) -> None:
        if result.burst_trigger is not None:
            key = (("uplink", result.uplink),)
            self.burst_rounds[key] = self.burst_rounds.get(key, 0) + 1
        for probe in result.judged:
            labels = (("uplink", result.uplink), ("target", probe.target), ("method", probe.method.value))
            self.requests[labels] = self.requests.get(labels, 0) + 1
            if probe.ok and probe.rtt_ms is not None:
                histogram = self.rtt.get(labels)
                if histogram is None:  # not setdefault: that would build one per probe
                    histogram = self.rtt[labels] = Histogram(RTT_BUCKETS)
                histogram.observe(probe.rtt_ms / 1000)
            elif not probe.ok:
                failed = (*labels, ("reason", failure_reason(probe.reason)))
                self.failures[failed] = self.failures.get(failed, 0) + 1

    def submit(self, record: Mapping[str, Any]) -> None:
        event = record.get("event", "")
        if event.startswith("uplink_"):
            key = (("uplink", str(record["uplink"])),)
            self.state_changes[key] = self.state_changes.get(key, 0) + 1
        elif event == "switch":
            key = (("family", str(record["family"])),)
            self.switches[key] = self.switches.get(key, 0) + 1
        elif event == "flows_released":
            key = (("uplink", str(record["uplink"])),)
            self.released[key] = self.released.get(key, 0) + int(record.get("released", 0))
        elif event in ("reload", "reload_rejected"):
            self.reload_ok = 1 if event == "reload" else 0

    def on_switch_done(self, family: int, detection_s: float | None, route_change_s: float) -> None:
        """A switch's route change is in the kernel: how long it took from the decision, and
        (a failover) from the first evidence of the failure."""
        self.route_change.observe(route_change_s)
        if detection_s is not None:
            key = (("family", FAMILY_NAME[family]),)
            self.detection.setdefault(key, Histogram(DETECTION_BUCKETS)).observe(detection_s)

    def render(self, state: AgentState, dropped: int, now: float | None = None) -> str:
        """`now`: the monotonic time the gauges that decay are read at (default: the clock's)."""
        now = time.monotonic() if now is None else now
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def sample(name: str, labels: Labels, value: float) -> None:
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels)
            # Exact: %g would turn 1234567 into 1.23457e+06, and counters would stop growing.
            number = str(value) if isinstance(value, int) else repr(float(value))
            out.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

        current = {u.name for u in state.config.uplinks}

        def now_configured(labels: Labels) -> bool:
            # Series of uplinks a reload removed are left out (they would grow with every reload).
            return all(v in current for k, v in labels if k == "uplink")

        def histograms(name: str, series: Mapping[Labels, Histogram]) -> None:
            for labels, histogram in sorted(series.items()):
                if not now_configured(labels):
                    continue
                cumulative = 0
                for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
                    cumulative += count
                    sample(f"{name}_bucket", (*labels, ("le", repr(float(bound)))), cumulative)
                sample(f"{name}_bucket", (*labels, ("le", "+Inf")), histogram.total)
                sample(f"{name}_sum", labels, histogram.sum)
                sample(f"{name}_count", labels, histogram.total)

        config = state.config
        family("multiwan_build_info", "gauge", "The agent's version.")
        sample("multiwan_build_info", (("version", __version__),), 1)
        family("multiwan_uplink_up", "gauge", "1 while the uplink is up.")
        for u in config.uplinks:
            sample("multiwan_uplink_up", (("uplink", u.name),), int(state.healths[u.name].state is State.UP))
        family("multiwan_uplink_state", "gauge", "The uplink's state, one-hot.")
        for u in config.uplinks:
            for s in State:
                sample(
                    "multiwan_uplink_state",
                    (("uplink", u.name), ("state", s.value)),
                    int(state.healths[u.name].state is s),
                )
        family("multiwan_uplink_selected", "gauge", "1 while the uplink carries the family's new traffic.")
        for u in config.uplinks:
            for f in u.families:
                sample(
                    "multiwan_uplink_selected",
                    (("uplink", u.name), ("family", FAMILY_NAME[f])),
                    int(state.selected(f) == u.name),
                )
        family("multiwan_uplink_family_up", "gauge", "1 while the uplink is up for the family.")
        for u in config.uplinks:
            for f, h in state.uplink_healths(u.name).items():
                sample(
                    "multiwan_uplink_family_up",
                    (("uplink", u.name), ("family", FAMILY_NAME[f])),
                    int(h.state is State.UP),
                )
        family("multiwan_uplink_drained", "gauge", "1 while an operator has drained the uplink.")
        for u in config.uplinks:
            sample("multiwan_uplink_drained", (("uplink", u.name),), int(u.name in state.drained))
        family("multiwan_uplink_state_changes_total", "counter", "State changes of the uplink since start.")
        for u in config.uplinks:
            key = (("uplink", u.name),)
            sample("multiwan_uplink_state_changes_total", key, self.state_changes.get(key, 0))
        hysteresis = agent_hysteresis(config.agent)
        family(
            "multiwan_uplink_flap_merit", "gauge", "Flap damping's figure of merit: 1 per failure, decaying."
        )
        for u in config.uplinks:
            merit = flap_merit(state.healths[u.name].failures, hysteresis.half_life_s, now)
            sample("multiwan_uplink_flap_merit", (("uplink", u.name),), round(merit, 4))
        family(
            "multiwan_uplink_hysteresis_owed_seconds",
            "gauge",
            "How long a recovered uplink still proves itself.",
        )
        for u in config.uplinks:
            health = state.healths[u.name]
            ready_at = proof_ready_at(health, hysteresis) if health.state is State.UP else None
            owed = 0.0 if ready_at is None else max(ready_at - now, 0.0)
            sample("multiwan_uplink_hysteresis_owed_seconds", (("uplink", u.name),), round(owed, 3))
        family("multiwan_probe_rtt_seconds", "histogram", "Round-trip times of answered probes.")
        histograms("multiwan_probe_rtt_seconds", self.rtt)
        family("multiwan_probe_loss_ratio", "gauge", "Share of probes lost over the quality window.")
        for u in config.uplinks:
            loss = state.healths[u.name].loss_pct
            if loss is not None:
                sample("multiwan_probe_loss_ratio", (("uplink", u.name),), round(loss / 100, 4))
        family("multiwan_probe_timeout_seconds", "gauge", "How long an ICMP probe waits now (adaptive).")
        for u in config.uplinks:
            for target, timeout_ms in state.healths[u.name].timeouts_ms:
                sample(
                    "multiwan_probe_timeout_seconds",
                    (("uplink", u.name), ("target", target)),
                    timeout_ms / 1000,
                )
        family("multiwan_uplink_burst", "gauge", "1 while a confirmation burst probes the uplink.")
        for u in config.uplinks:
            sample(
                "multiwan_uplink_burst", (("uplink", u.name),), int(state.healths[u.name].burst is not None)
            )
        family("multiwan_burst_rounds_total", "counter", "Probe rounds sent early, to confirm a change.")
        for u in config.uplinks:
            key = (("uplink", u.name),)
            sample("multiwan_burst_rounds_total", key, self.burst_rounds.get(key, 0))
        family("multiwan_passive_suspicions_total", "counter", "Times passive health suspected the uplink.")
        family("multiwan_passive_unanswered_ratio", "gauge", "Share of new connections left unanswered.")
        for u in config.uplinks:
            view = state.passive.get(u.name)
            if view is not None:
                key = (("uplink", u.name),)
                sample("multiwan_passive_suspicions_total", key, view.suspicions)
                ratio = view.unanswered / view.resolved if view.resolved else 0.0
                sample("multiwan_passive_unanswered_ratio", key, round(ratio, 4))
        family("multiwan_probe_requests_total", "counter", "Probes sent and judged.")
        for labels, count in sorted(self.requests.items()):
            if now_configured(labels):
                sample("multiwan_probe_requests_total", labels, count)
        family("multiwan_probe_failures_total", "counter", "Probes that failed, by reason.")
        for labels, count in sorted(self.failures.items()):
            if now_configured(labels):
                sample("multiwan_probe_failures_total", labels, count)
        family("multiwan_switches_total", "counter", "Changes of the selected uplink, per family.")
        for f in config.families:
            key = (("family", FAMILY_NAME[f]),)
            sample("multiwan_switches_total", key, self.switches.get(key, 0))
        family(
            "multiwan_detection_seconds",
            "histogram",
            "From the first evidence of a failure to its route change.",
        )
        histograms("multiwan_detection_seconds", self.detection)
        family(
            "multiwan_route_change_seconds",
            "histogram",
            "From a switch's decision to its route change in the kernel.",
        )
        histograms("multiwan_route_change_seconds", {(): self.route_change})
        family(
            "multiwan_flows_released_total", "counter", "Tracked connections released (deleted one by one)."
        )
        for u in config.uplinks:
            key = (("uplink", u.name),)
            sample("multiwan_flows_released_total", key, self.released.get(key, 0))
        if state.connections is not None:
            family("multiwan_tracked_connections", "gauge", "Tracked connections marked for the uplink.")
            for u in config.uplinks:
                sample(
                    "multiwan_tracked_connections", (("uplink", u.name),), state.connections.get(u.name, 0)
                )
        family("multiwan_config_last_reload_successful", "gauge", "1 when the last reload was applied.")
        sample("multiwan_config_last_reload_successful", (), self.reload_ok)
        family(
            "multiwan_notifications_dropped_total",
            "counter",
            "Hook and webhook events dropped by full queues.",
        )
        sample("multiwan_notifications_dropped_total", (), dropped)
        return "\n".join(out) + "\n"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """GET /metrics on metrics_listen, and/or the textfile; both read `render()` when asked."""

    def __init__(
        self, render: Callable[[], str], listen: tuple[str, int] | None, textfile: str | None
    ) -> None:
        self._render = render
        self.listen = listen
        self.textfile = textfile
        self._clients = 0

    async def run(self) -> None:
        server = None
        failing = False
        if self.listen is not None:
            host, port = self.listen
            try:
                server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
            except OSError as err:  # the agent runs on without metrics
                log.error("metrics: cannot listen on %s:%d: %s", host, port, err.strerror or err)
        try:
            while True:
                if self.textfile is not None:
                    try:
                        _write_atomically(Path(self.textfile), self._render())
                        failing = False
                    except OSError as err:
                        if not failing:
                            log.warning("metrics: cannot write %s: %s (said once)", self.textfile, err)
                        failing = True
                await asyncio.sleep(METRICS_TEXTFILE_PERIOD_S)
        finally:
            if server is not None:
                server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._clients >= CONTROL_MAX_CLIENTS:
                return
            self._clients += 1
            try:
                request = await wait_within(reader.readuntil(b"\r\n\r\n"), CONTROL_TIMEOUT_S)
                words = request.split(b" ", 2)
                if len(words) >= 2 and words[0] == b"GET" and words[1].split(b"?")[0] == b"/metrics":
                    body, status = self._render().encode(), "200 OK"
                    kind = "text/plain; version=0.0.4; charset=utf-8"
                else:
                    body, status, kind = b"not found: try /metrics\n", "404 Not Found", "text/plain"
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await wait_within(writer.drain(), CONTROL_TIMEOUT_S)
            finally:
                self._clients -= 1
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            await _close(writer)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# systemd notification ########################################################
#
# Owns sd_notify: READY, RELOADING, STOPPING, STATUS and WATCHDOG datagrams.


class Notifier:
    """sd_notify: READY/RELOADING/STOPPING/STATUS/WATCHDOG. A no-op outside systemd."""

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET")
        self._sdnotify: Any = None
        if self._address:
            try:
                import sdnotify

                self._sdnotify = sdnotify.SystemdNotifier()
            except ImportError:  # OpenWrt has no sdnotify; the protocol is one datagram
                self._sdnotify = None
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_s = int(watchdog_usec) / 1e6

    def send(self, message: str) -> None:
        if not self._address:
            return
        if self._sdnotify is not None:
            self._sdnotify.notify(message)
            return
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall(message.encode())
        except OSError as err:
            log.debug("sd_notify failed: %s", err)


# Daemon ######################################################################
#
# Owns the tasks and threads (one supervisor) and the signals. One pump holds the
# agent state: observations in, the core, intents out to the edges. Once the
# pump takes a finished probe round, it reaches the default route's `replace` in
# four calls: on_round() -> RouteEdge.want() -> RouteEdge._reconcile() -> nl_apply().


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """asyncio.wait_for without its flaw before Python 3.12 (bpo-42130): a cancellation
    that arrives as the awaited thing completes is never swallowed, so a long-lived task
    always stops when it is told to. Raises TimeoutError."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task})  # let it run its cleanup (an nft run kills its process)
        raise TimeoutError
    return task.result()


# Observations: what the edges post to the pump.


@dataclass(frozen=True, slots=True)
class RoundObserved:
    result: RoundResult


@dataclass(frozen=True, slots=True)
class LinksObserved:
    interfaces: Mapping[str, Interface]


@dataclass(frozen=True, slots=True)
class RoutesReconciled:
    work: RouteWork
    failed: tuple[tuple[Change, str], ...]
    rules: tuple[RuleEntry, ...]
    routes: tuple[RouteEntry, ...]
    #: Loop time when the urgent replaces were in the kernel (for the route-change metric).
    urgent_done_at: float = 0.0


@dataclass(frozen=True, slots=True)
class RoutesFailed:
    """A dump or the reconcile itself raised (netlink trouble): retried with back-off."""

    error: str


@dataclass(frozen=True, slots=True)
class ReloadPrepared:
    config: Config
    rules: tuple[RuleEntry, ...]
    routes: tuple[RouteEntry, ...]
    nft_note: str
    #: Who asked through the control socket, waiting for the result.
    waiters: tuple[asyncio.Future[Reply], ...] = ()


@dataclass(frozen=True, slots=True)
class ReloadFailed:
    reason: str
    waiters: tuple[asyncio.Future[Reply], ...] = ()


@dataclass(frozen=True, slots=True)
class ReleaseFinished:
    uplink: str
    released: Released


@dataclass(frozen=True, slots=True)
class ConnectionsCounted:
    counts: Mapping[str, int] | None


@dataclass(frozen=True, slots=True)
class NftReported:
    report: NftStatus


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """An operator's drain or undrain (control socket); the reply goes to `reply_to`."""

    command: Command
    reply_to: asyncio.Future[Reply]


@dataclass(frozen=True, slots=True)
class TaskDied:
    """A supervised task died (it is being restarted): what it knew is gone."""

    task: str
    error: str


@dataclass(frozen=True, slots=True)
class LateReplyObserved:
    """A probe's reply came after its adaptive timeout, before the ceiling."""

    uplink: str
    seq: int
    rtt_ms: float
    #: Its target's family (each family has its own quality window).
    family: int | None = None


@dataclass(frozen=True, slots=True)
class SuspicionObserved:
    suspicion: Suspicion


@dataclass(frozen=True, slots=True)
class PassiveObserved:
    views: Mapping[str, PassiveView]


@dataclass(frozen=True, slots=True)
class Tick:
    pass


Observation = (
    RoundObserved
    | LinksObserved
    | RoutesReconciled
    | RoutesFailed
    | ReloadPrepared
    | ReloadFailed
    | ReleaseFinished
    | ConnectionsCounted
    | NftReported
    | CommandReceived
    | TaskDied
    | LateReplyObserved
    | SuspicionObserved
    | PassiveObserved
    | Tick
)


class Supervisor:
    """Owns every long-running task. One that dies is logged with its traceback and
    started again after a back-off; one that may not be restarted (the pump), or that
    dies SUPERVISOR_MAX_DEATHS times within SUPERVISOR_WINDOW_S, ends the agent with
    a failure so that systemd or procd restarts it. Nothing dies silently."""

    def __init__(self, fatal: Callable[[str], None], died: Callable[[str, str], None]) -> None:
        self._fatal = fatal
        #: Told of every death (name, error) that is restarted: the core knows what was lost.
        self._died = died
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._factories: dict[str, tuple[Callable[[], Coroutine[Any, Any, None]], str]] = {}
        self._deaths: dict[str, list[float]] = {}
        self._stopping = False

    def start(
        self, name: str, factory: Callable[[], Coroutine[Any, Any, None]], restart: str = "limited"
    ) -> None:
        """restart: "never" (its death ends the agent), "limited" or "always" (a prober)."""
        self._factories[name] = (factory, restart)
        task = asyncio.get_running_loop().create_task(factory(), name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._on_done(name, done))

    def cancel(self, name: str) -> None:
        self._factories.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def _on_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(name) is not task or self._stopping:
            return
        del self._tasks[name]
        if task.cancelled():
            return
        error = task.exception()
        factory, restart = self._factories[name]
        what = "it ended by itself" if error is None else f"{type(error).__name__}: {error}"
        if error is None:
            log.error("task=%s died: it ended by itself; it should run until the agent stops", name)
        else:
            log.error("task=%s died: %s", name, what, exc_info=error)
        now = time.monotonic()
        deaths = [t for t in self._deaths.get(name, []) if now - t < SUPERVISOR_WINDOW_S] + [now]
        self._deaths[name] = deaths
        if restart == "never" or (restart == "limited" and len(deaths) >= SUPERVISOR_MAX_DEATHS):
            often = "" if restart == "never" else f" {len(deaths)} times within {SUPERVISOR_WINDOW_S:.0f}s"
            self._fatal(f"task {name} died{often}")
            return
        delay_s = min(SUPERVISOR_RESTART_S * 2 ** (len(deaths) - 1), RESYNC_PERIOD_S)
        log.warning("task=%s restarts in %.1fs", name, delay_s)
        asyncio.get_running_loop().call_later(delay_s, self._restart, name)
        self._died(name, what)

    def _restart(self, name: str) -> None:
        if self._stopping or name not in self._factories or name in self._tasks:
            return
        factory, restart = self._factories[name]
        self.start(name, factory, restart)

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.warning("task=%s did not stop within %.1fs", task.get_name(), timeout_s)
        self._tasks.clear()


class ProberSet:
    """One supervised prober task per uplink; a reload restarts only those whose uplink changed,
    so the others keep their rounds (and their evidence) across it."""

    def __init__(
        self,
        supervisor: Supervisor,
        source: Callable[[str], ProbeSource | None],
        deliver: Callable[[RoundResult], None],
        verbose: bool,
    ) -> None:
        self._supervisor = supervisor
        self._source = source
        self._deliver = deliver
        self._verbose = verbose
        self._running: dict[str, UplinkConfig] = {}
        #: ICMP ids tell our echoes apart from other pingers' and each uplink's; stable per name.
        self._idents: dict[str, int] = {}
        #: The probers running now (a restarted task makes a new one).
        self.probers: dict[str, UplinkProber] = {}
        #: Where late replies go: (uplink, seq, rtt_ms); set by the daemon.
        self.late: Callable[[str, int, float, int], None] | None = None

    def suspect(self, name: str, trigger: str) -> None:
        prober = self.probers.get(name)
        if prober is not None:
            prober.suspect(trigger)

    def sync(self, config: Config) -> None:
        wanted = {u.name: u for u in config.uplinks}
        # Rounds of many uplinks spread over the interval, not all at its start: a burst of
        # sends and replies every interval is what delays some of them (send jitter). But in
        # groups (slots) of up to PROBE_SLOT_UPLINKS: the rounds of one slot are due at the
        # same time, so one turn of the event loop sends them and one wake-up reads their
        # replies. Spread one by one, every round cost a loop turn, an epoll and a pump wake-up.
        slots = max(1, math.ceil(len(config.uplinks) / PROBE_SLOT_UPLINKS))
        offsets = {u.name: u.check.interval_s * (i % slots) / slots for i, u in enumerate(config.uplinks)}
        for name in [n for n in self._running if n not in wanted]:
            self._supervisor.cancel(f"prober {name}")
            del self._running[name]
        for name, uplink in wanted.items():
            running = self._running.get(name)
            # Only what the prober uses: a new priority or weight keeps its rounds in flight.
            if running is not None and _probed_as(running) == _probed_as(uplink):
                self._running[name] = uplink
                continue
            self._supervisor.cancel(f"prober {name}")
            ident = self._idents.setdefault(name, (os.getpid() * 31 + len(self._idents)) & 0xFFFF)
            prober = functools.partial(self._run, uplink, ident, offsets[name])
            self._supervisor.start(f"prober {name}", prober, restart="always")
            self._running[name] = uplink

    async def _run(self, uplink: UplinkConfig, ident: int, offset_s: float = 0.0) -> None:
        # It probes as `uplink` says; the source (address, gateways) comes from the state.
        late = self.late

        def deliver_late(target: str, seq: int, rtt_ms: float) -> None:
            if late is not None:
                late(uplink.name, seq, rtt_ms, family_of(target))

        prober = UplinkProber(
            uplink,
            ident,
            lambda: self._source(uplink.name),
            self._deliver,
            verbose=self._verbose,
            late=deliver_late,
            offset_s=offset_s,
        )
        self.probers[uplink.name] = prober
        try:
            await prober.run()
        finally:
            if self.probers.get(uplink.name) is prober:
                del self.probers[uplink.name]


class ProbeSources:
    """probe_source for the probers, worked out again only when what it reads changed: the
    config, the interface dump and the uplink's link_usable (frozen values, compared by
    identity). Every round asks, and at 64 uplinks working it out each time was a few
    per cent of the event loop."""

    def __init__(self, state: Callable[[], AgentState]) -> None:
        self._state = state
        self._config: Config | None = None
        self._memo: dict[str, tuple[Mapping[str, Interface], bool, ProbeSource | None]] = {}

    def __call__(self, name: str) -> ProbeSource | None:
        state = self._state()
        if state.config is not self._config:
            self._config = state.config
            self._memo.clear()
        health = state.healths.get(name)
        usable = health is not None and health.link_usable
        hit = self._memo.get(name)
        if hit is not None and hit[0] is state.interfaces and hit[1] == usable:
            return hit[2]
        source = probe_source(state, name)
        self._memo[name] = (state.interfaces, usable, source)
        return source


def _probed_as(uplink: UplinkConfig) -> tuple[object, ...]:
    """What an uplink's prober depends on."""
    return (uplink.name, uplink.interface, uplink.gateway, uplink.gateway6, uplink.check)


class Pump:
    """Observations in, the core, intents out: the only code that holds the agent state.

    The state is replaced, never mutated; edges read `pump.state` (a frozen snapshot)."""

    def __init__(
        self,
        state: AgentState,
        *,
        routes: RouteEdge,
        nft: NftEdge,
        conntrack: ConntrackEdge,
        status: StatusWriter,
        probers: ProberSet,
        notifier: Notifier,
        dry_run: bool,
        history: History,
        drains_path: Path,
        metrics: Metrics,
        sinks: Sequence[EventSink] = (),
    ) -> None:
        self.state = state
        self._history = history
        self._metrics = metrics
        #: What the keepalived track file says, as last written: (path, value).
        self._tracked: tuple[str, int] = ("", -1)
        #: Switches whose route work is not yet in the kernel: (its generation, the switch).
        self._switches: list[tuple[int, SelectionChanged]] = []
        self._drains_path = drains_path
        self._drained = state.drained
        #: Hooks, webhooks and metrics: each takes every event record, never blocking.
        self._sinks = sinks
        self._routes = routes
        self._nft = nft
        self._conntrack = conntrack
        self._status = status
        self._probers = probers
        self._notifier = notifier
        self._dry_run = dry_run
        #: Observations not yet taken, and the future run() waits on while there are none.
        #: (An asyncio.Queue read with a timeout costs a task and a wait per observation:
        #: at 64 uplinks, a tenth of the event loop.) Posts come from the loop's thread only.
        self._queue: collections.deque[Observation] = collections.deque()
        self._waiting: asyncio.Future[None] | None = None
        self.ready = asyncio.Event()
        #: The newest route work handed to the routes edge and not yet answered, and since when.
        self._routes_given: RouteWork | None = None
        self._routes_given_at = 0.0
        #: A decision's status write waits for its routes (see routes_settling).
        self._status_deferred = False
        #: When the core wants to be ticked (the newest intent's wake_at, as aioquic's get_timer).
        self._wake_at = next_wake(state)
        #: Monotonic time the last observation was taken (for the watchdog).
        self._handled_at = time.monotonic()

    def post(self, observation: Observation) -> None:
        self._queue.append(observation)
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    def stuck_for(self, now: float) -> float | None:
        """How long observations have waited untaken, if longer than PUMP_STUCK_S."""
        if not self._queue:
            return None
        waited = now - self._handled_at
        return waited if waited > PUMP_STUCK_S else None

    def begin(self, intent: Intent) -> None:
        """Carry out the intent of start_agent."""
        self._probers.sync(self.state.config)
        self._carry_out(intent)
        self._track(self.state)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and self._wake_at > loop.time():
                await self._wait(loop)
            observation = self._queue.popleft() if self._queue else Tick()
            self._handle(observation, loop.time())
            # A busy queue must not starve the timers (hysteresis, retries, resync).
            if not isinstance(observation, Tick) and loop.time() >= self._wake_at:
                self._handle(Tick(), loop.time())

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Until an observation is posted or the core's wake-up time comes."""
        self._waiting = waiting = loop.create_future()
        timer = None
        if math.isfinite(self._wake_at):
            timer = loop.call_at(self._wake_at, _resolve, waiting)
        try:
            await waiting
        finally:
            self._waiting = None
            if timer is not None:
                timer.cancel()

    def _handle(self, observation: Observation, now: float) -> None:
        self._handled_at = time.monotonic()
        state = self.state
        config = state.config
        match observation:
            case RoundObserved(result):
                self._metrics.on_round(result)
                state, intent = on_round(state, result, now)
            case LinksObserved(interfaces):
                state, intent = on_links(state, interfaces, now)
            case RoutesReconciled(work, failed, rules, routes, done_at):
                state, intent = on_routes(state, work, failed, rules, routes, now)
                self._switch_done(work.generation, done_at)
                if not self.ready.is_set():
                    self.ready.set()  # READY=1 after the first reconcile
            case RoutesFailed(error):
                state, intent = on_routes_failed(state, error, now)
            case ReloadPrepared(new, rules, routes, nft_note, _waiters):
                state, intent = on_reload(state, new, rules, routes, nft_note, now)
            case ReloadFailed(reason, _waiters):
                state, intent = on_reload_refused(state, reason, now)
            case CommandReceived(command, _reply_to):
                state, intent = on_command(state, command, now, time.time())
            case ReleaseFinished(uplink, released):
                state, intent = on_released(state, uplink, released, now)
            case ConnectionsCounted(counts):
                state, intent = on_counts(state, counts)
            case NftReported(report):
                state, intent = on_nft(state, report, now)
            case TaskDied(task, error):
                state, intent = on_task_died(state, task, error, now)
            case LateReplyObserved(uplink, seq, rtt_ms, family):
                state, intent = on_late(state, uplink, seq, rtt_ms, now, family)
            case SuspicionObserved(suspicion):
                state, intent = on_suspect(state, suspicion, now)
            case PassiveObserved(views):
                state = evolve(state, passive=views)
                intent = Intent(status=StatusWrite.SOON, wake_at=next_wake(state))
            case Tick():
                state, intent = on_tick(state, now)
        self.state = state
        if state.config is not config:
            self._routes.config = self._conntrack.config = state.config
            self._probers.sync(state.config)
            for sink in self._sinks:
                if isinstance(sink, Notifications):
                    sink.configure(state.config)
            if evolve(config, source=state.config.source) != state.config:
                log_effective_config(state.config, self._dry_run)
        if isinstance(observation, RoutesFailed) or (
            isinstance(observation, RoutesReconciled) and observation.work is self._routes_given
        ):
            self._routes_given = None
        self._carry_out(intent)
        if self._status_deferred and not self.routes_settling():
            self._status_deferred = False
            self._write_status(StatusWrite.NOW)
        if isinstance(observation, (ReloadPrepared, ReloadFailed)):
            self._notifier.send("READY=1\nSTATUS=" + status_summary(state))
            _answer_reload(observation.waiters, intent)
        if isinstance(observation, CommandReceived) and not observation.reply_to.done():
            observation.reply_to.set_result(intent.reply or Reply(False, "no answer"))
        if state.drained is not self._drained:
            self._drained = state.drained
            self._save_drains(state.drained)
        self._track(state)

    def _carry_out(self, intent: Intent) -> None:
        self._wake_at = intent.wake_at
        wall_now, mono_now = time.time(), time.monotonic()
        for event in intent.events:
            log_event(event)
            if isinstance(event, SelectionChanged) and intent.routes is not None:
                self._switches.append((intent.routes.generation, event))
            record = event_record(event, wall_now, mono_now)
            self._history.add(record)
            for sink in self._sinks:
                sink.submit(record)
        if intent.refresh_links:
            self._routes.want_links()
        if intent.routes is not None:
            self._routes.want(intent.routes)
        if intent.nft is not None:
            self._nft.want(intent.nft)
        for release in intent.releases:
            self._conntrack.release(release)
        for uplink in intent.cancel_releases:
            self._conntrack.cancel(uplink)
        for uplink, trigger in intent.bursts:
            self._probers.suspect(uplink, trigger)
        if intent.routes is not None:
            if self._routes_given is None:
                self._routes_given_at = time.monotonic()
            self._routes_given = intent.routes
        self._write_status(intent.status)

    def _switch_done(self, generation: int, done_at: float) -> None:
        """The route work of these switches is in the kernel: time them (metrics)."""
        for entry in [e for e in self._switches if e[0] <= generation]:
            self._switches.remove(entry)
            _, switch = entry
            detection = None if switch.evidence_at is None else done_at - switch.evidence_at
            self._metrics.on_switch_done(switch.family, detection, max(done_at - switch.at, 0.0))

    def _track(self, state: AgentState) -> None:
        path = state.config.agent.keepalived_track_file
        if path is None or self._dry_run:
            return
        value = track_value(state)
        if (path, value) == self._tracked:
            return
        try:
            write_track_file(path, value)
        except OSError as err:
            if self._tracked[0] != "failed":
                log.error("cannot write keepalived's track file %s: %s", path, err)
            self._tracked = ("failed", -1)
            return
        log.info("keepalived track file %s = %d (families without an uplink)", path, value)
        self._tracked = (path, value)

    def _save_drains(self, drained: Mapping[str, Drain]) -> None:
        try:
            write_drains(self._drains_path, drained)
        except OSError as err:  # the drain holds; only a restart would forget it
            log.error("cannot write %s: %s; a restart would forget the drains", self._drains_path, err)

    def routes_settling(self) -> bool:
        """Route work is on its way into the kernel (for at most STATUS_HOLD_S): status waits
        for it, so that it never says what is not in place yet."""
        return self._routes_given is not None and time.monotonic() - self._routes_given_at < STATUS_HOLD_S

    def _write_status(self, status: StatusWrite) -> None:
        if status is StatusWrite.NOW and self.routes_settling():
            self._status_deferred = True
            return
        self._status.note(status)
        if status is StatusWrite.NOW and self.ready.is_set():
            self._notifier.send("STATUS=" + status_summary(self.state))


def _answer_reload(waiters: Sequence[asyncio.Future[Reply]], intent: Intent) -> None:
    """Tell those who asked for the reload what came of it."""
    reply = Reply(False, "no answer")
    for event in intent.events:
        if isinstance(event, Reloaded):
            note = f"; {event.nft_note}" if event.nft_note else ""
            reply = Reply(True, f"applied {event.source}{'' if event.changed else ' (no change)'}{note}")
        elif isinstance(event, ReloadRejected):
            reply = Reply(False, f"{event.reason}; kept the running config")
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(reply)


class EventSink(Protocol):
    """Takes every event record (hooks, webhooks, metrics); must never block."""

    def submit(self, record: Mapping[str, Any]) -> None: ...


class Operator:
    """The control socket's answers: status from the pump's state, history from the ring,
    drain and undrain through the core, reload through the reloader."""

    def __init__(
        self, pump: Pump, history: History, reloader: Reloader, document: Callable[[bool], dict[str, Any]]
    ) -> None:
        self._pump = pump
        self._history = history
        self._reloader = reloader
        self._document = document

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return {"ok": True, "status": self._document(True)}
        if cmd == "history":
            since = request.get("since", "1h")
            try:
                seconds = (
                    float(since)
                    if isinstance(since, (int, float)) and not isinstance(since, bool)
                    else parse_duration(since)
                )
            except ValueError:
                return {
                    "ok": False,
                    "error": f'"since": expected a duration such as "1h" or "30m", got {_show(since)}',
                }
            events = self._history.since(time.time() - seconds)
            return {
                "ok": True,
                "events": events[-CONTROL_MAX_EVENTS:],
                "truncated": len(events) > CONTROL_MAX_EVENTS,
            }
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Reply] = loop.create_future()
        if cmd in ("drain", "undrain"):
            uplink = request.get("uplink")
            flags = {k: request.get(k, False) for k in ("release", "force")}
            if not isinstance(uplink, str) or not all(isinstance(v, bool) for v in flags.values()):
                return {
                    "ok": False,
                    "error": f'{cmd}: expected {{"uplink": "<name>"}} (and "release", "force": true/false)',
                }
            command: Command = (
                DrainCommand(uplink, flags["release"], flags["force"])
                if cmd == "drain"
                else UndrainCommand(uplink)
            )
            self._pump.post(CommandReceived(command, waiter))
        elif cmd == "reload":
            self._reloader.request(waiter)
        else:
            return {
                "ok": False,
                "error": f"unknown cmd {_show(cmd)}: expected status, history, drain, undrain or reload",
            }
        try:
            reply = await wait_within(waiter, CONTROL_CLIENT_WAIT_S)
        except TimeoutError:
            return {
                "ok": False,
                "error": f"{cmd}: the agent did not answer within {CONTROL_CLIENT_WAIT_S:g}s",
            }
        return {"ok": True, "message": reply.message} if reply.ok else {"ok": False, "error": reply.message}


class Reloader:
    """SIGHUP: read and check the new config off the pump (file, netlink dump, `nft -c`),
    then hand it to the core. Requests that arrive meanwhile become one more reload."""

    def __init__(
        self,
        path: str,
        wanted: asyncio.Event,
        pump: Pump,
        worker: NetlinkWorker,
        notifier: Notifier,
        dry_run: bool,
    ) -> None:
        self._path = path
        self._wanted = wanted
        self._pump = pump
        self._worker = worker
        self._notifier = notifier
        self._dry_run = dry_run
        self._waiters: list[asyncio.Future[Reply]] = []

    def request(self, waiter: asyncio.Future[Reply]) -> None:
        """A reload asked for through the control socket: `waiter` gets its result."""
        self._waiters.append(waiter)
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            waiters, self._waiters = tuple(self._waiters), []
            self._notifier.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                new = load_config(self._path)
            except ConfigError as err:
                self._pump.post(ReloadFailed(str(err), waiters))
                continue
            except Exception as err:  # the task's boundary: a bug in the parser keeps the running config
                log.exception("reload: reading %s failed", self._path)
                self._pump.post(ReloadFailed(f"reading it failed: {type(err).__name__}: {err}", waiters))
                continue
            try:
                rules = await self._worker.call(nl_rules, new.families)
                routes = await self._worker.call(nl_routes, new.tables, new.families)
            except Exception as err:  # NetlinkError is no OSError; the running config stays
                why = f"cannot dump the rules and routes to check it against: {err}"
                self._pump.post(ReloadFailed(why, waiters))
                continue
            note = ""
            if not self._dry_run:
                # The new table is checked, not installed (`nft -c` changes nothing); if it
                # cannot be, routing is reloaded anyway and the running table stays live.
                note = await nft_check(new, carry_steering(self._pump.state.steering, new))
            self._pump.post(ReloadPrepared(new, tuple(rules), tuple(routes), note, waiters))


async def feed_watchdog(
    notifier: Notifier,
    watchdog_s: float,
    pump: Pump,
    routes: RouteEdge,
    nft: NftEdge,
    conntrack: ConntrackEdge,
) -> None:
    """WATCHDOG=1 only while every edge answers: the event loop (this task runs), the pump,
    the netlink worker thread, the nft runs and the conntrack thread."""
    withheld: list[str] = []
    while True:
        problems: list[str] = []
        if not await routes.answers(watchdog_s / 4):
            problems.append(f"the netlink worker has not answered for {watchdog_s / 4:.1f}s")
        now = time.monotonic()
        for name, stuck in (
            ("pump", pump.stuck_for(now)),
            ("nft", nft.stuck_for(now)),
            ("conntrack", conntrack.stuck_for(now)),
        ):
            if stuck is not None:
                problems.append(f"the {name} edge has made no progress for {stuck:.1f}s")
        if problems and problems != withheld:
            log.error("withholding the watchdog: %s", "; ".join(problems))
        elif not problems:
            if withheld:
                log.info("watchdog: every edge answers again")
            notifier.send("WATCHDOG=1")
        withheld = problems
        await asyncio.sleep(watchdog_s / 2)


def log_event(event: Event) -> None:
    """One log line per decision, with its reason."""
    match event:
        case Transition(uplink, _old, new, reason, _at, family):
            log.log(
                logging.WARNING if new is State.DOWN else logging.INFO,
                "uplink=%s %s%s: %s",
                uplink,
                "" if family is None else f"family={FAMILY_NAME[family]} ",
                new.value,
                reason,
            )
        case SelectionChanged(family, old, new, reason, _at, _evidence):
            log.warning("selected=%s family=%s (was %s): %s", new, FAMILY_NAME[family], old or "none", reason)
        case NoUplinkUp(family, kept, reason, _at):
            if kept is None:
                log.info("family=%s waiting for the first uplink to come up", FAMILY_NAME[family])
            else:
                log.error(
                    "NO UPLINK IS UP family=%s: %s; new traffic may fail until one recovers",
                    FAMILY_NAME[family],
                    reason,
                )
        case FailbackWaiting(family, reason, _at):
            log.info("selection family=%s: %s", FAMILY_NAME[family], reason)
        case BalanceChanged(family, members, changes, _at):
            shares = ", ".join(f"{n} (weight {w})" for n, w in members)
            log.warning(
                "balance family=%s: %s; %s",
                FAMILY_NAME[family],
                f"new connections shared by {shares}"
                if members
                else "ended, the selected uplink carries all",
                ", ".join(changes),
            )
        case PolicyChanged(policy, family, old, new, fallback, reason, first, _at):
            log.log(
                logging.INFO if first else logging.WARNING,
                "policy=%s family=%s uplink=%s (was %s): %s",
                policy,
                FAMILY_NAME[family],
                new or f"none, {fallback}",
                "none" if first else old or f"none, {fallback}",
                reason,
            )
        case Renumbered(uplink, change, _at):
            log.info("uplink=%s renumbered: %s", uplink, change)
        case Adopted(uplink, family, _at):
            log.info(
                "uplink=%s adopted: the selected %s default route of a previous run points at it",
                uplink,
                FAMILY_NAME[family],
            )
        case FlowsReleased(uplink, families, why, mark, mask, released, _at):
            which = "/".join(FAMILY_TITLE[f] for f in sorted(families))
            if released.error is not None and not released.deleted:
                log.warning(
                    "uplink=%s cannot release its connections (%s; %s): %s",
                    uplink,
                    why,
                    which,
                    released.error,
                )
                return
            failed = f"; {released.failed} could not be: {released.error}" if released.failed else ""
            log.warning(
                "uplink=%s released %d tracked connection(s) marked %#x/%#x (%s; %s)%s; they re-establish "
                "over the new path; kept %d that came in from the internet; no other entry was touched%s",
                uplink,
                released.deleted,
                mark,
                mask,
                why,
                which,
                "; stopped early: it carries them again" if released.cancelled else "",
                released.inbound_kept,
                failed,
            )
        case RouteChangeFailed(change, error, _at):
            log.warning("netlink: %s failed: %s; retrying with back-off", change, error)
        case RouteChangeRecovered(change, _at):
            log.info("netlink: %s no longer fails", change)
        case ForeignAppeared(foreign, _at):
            log.error("foreign object: %s: %s; the agent never deletes it", foreign.what, foreign.defeats)
        case ForeignGone(foreign, _at):
            log.info("foreign object gone: %s", foreign.what)
        case Reloaded(source, uplinks, nft_note, changed, _at):
            unchanged = "" if changed else " (no change)"
            if not nft_note:
                log.info("reloaded %s: %d uplinks%s", source, uplinks, unchanged)
            else:
                log.warning(
                    "reloaded %s: %d uplinks%s; routing follows the new config, but its nft table could not "
                    "be checked: %s; the running table stays live until the new one loads",
                    source,
                    uplinks,
                    unchanged,
                    nft_note,
                )
        case HealthUnjudged(uplink, rounds, state, _at):
            log.error(
                "uplink=%s has judged nothing for %d rounds (its probes' own code raises: a bug in the "
                "agent); its health stays %s until they work, and a real failure is not seen meanwhile",
                uplink,
                rounds,
                state.value,
            )
        case HealthJudgedAgain(uplink, rounds, _at):
            log.info("uplink=%s is judged again after %d rounds that judged nothing", uplink, rounds)
        case ProberDied(uplink, error, _at):
            log.error(
                "uplink=%s prober died (%s); its health stands still until it runs again", uplink, error
            )
        case ReloadRejected(reason, _at):
            log.error("reload rejected, keeping the running config: %s", reason)
        case Suspected(uplink, evidence, _at):
            log.warning("uplink=%s suspect: %s; confirming with a burst of probes", uplink, evidence)


def log_effective_config(config: Config, dry_run: bool) -> None:
    agent = config.agent
    log.info(
        "config %s: hysteresis=%s flap_penalty=%s flap_half_life=%s flap_max_hysteresis=%s "
        "default_table=%d rules=%d-%d protocol=%d mark_mask=%#x%s",
        config.source,
        format_duration(agent.hysteresis_s),
        format_duration(agent_hysteresis(agent).penalty_s),
        format_duration(agent.flap_half_life_s),
        format_duration(agent.flap_max_hysteresis_s),
        agent.default_table,
        agent.rule_priority,
        agent.rule_priority + RULE_BLOCK - 1,
        agent.route_protocol,
        agent.mark_mask,
        " (dry run: no change will be made)" if dry_run else "",
    )
    for uplink in config.uplinks:
        check = uplink.check
        log.info(
            "uplink=%s interface=%s gateway=%s priority=%d table=%d mark=%#x check=%s%s targets=%s "
            "interval=%s timeout=%s fall=%d rise=%d reliability=%d adaptive=%s burst=%s passive=%s",
            uplink.name,
            uplink.interface,
            uplink.gateway,
            uplink.priority,
            uplink.table,
            uplink.mark,
            check.method_names,
            f":{check.port}" if check.port else "",
            ",".join(check.targets),
            format_duration(check.interval_s),
            format_duration(check.timeout_s),
            check.fall,
            check.rise,
            check.reliability,
            f"{format_duration(check.timeout_min_s)}-{format_duration(check.timeout_s)}"
            if check.adaptive_timeout
            else "off",
            f"every {format_duration(check.burst_spacing_s)}" if check.burst else "off",
            f"{format_duration(check.passive_timeout_s)}/{check.passive_destinations} destinations"
            if check.passive
            else "off",
        )


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    dry_run: bool = False
    cleanup: bool = False
    verbose: bool = False


async def run_daemon(
    config: Config,
    options: DaemonOptions,
    stop: asyncio.Event,
    reload: asyncio.Event,
    notifier: Notifier | None = None,
) -> int:
    """The agent until `stop` is set; `reload` set (SIGHUP) reads the config again.

    Returns the exit code: 0 for a clean stop, EXIT_FAILURE when a task could not be
    kept alive. Raises StartupRefused, having changed nothing, when another agent runs
    with the same state_dir or objects of others sit where the agent would write.
    """
    loop = asyncio.get_running_loop()
    notifier = notifier or Notifier()
    lock = lock_state_dir(config.agent.state_dir)
    if not options.dry_run:
        # Only the agent that holds the lock, before its threads: keepalived counts it as running.
        name_this_process(DAEMON_PROCESS_NAME)
    worker = NetlinkWorker()
    failure: list[str] = []
    started = False

    def fail(why: str) -> None:
        failure.append(why)
        stop.set()

    supervisor = Supervisor(fail, lambda name, error: pump.post(TaskDied(name, error)))
    pump: Pump
    try:
        # A look at the system, read-only: a collision refuses the start with nothing changed.
        rules = await worker.call(nl_rules, config.families)
        routes = await worker.call(nl_routes, config.tables, config.families)
        problems = find_collisions(config, rules, routes)
        if problems:
            raise StartupRefused("; ".join(problems))
        interfaces = await worker.call(nl_interfaces, config.agent.route_protocol, FAMILIES)
        status_path = Path(config.agent.state_dir) / "status.json"
        previous: PreviousRun | None = None
        try:
            previous = previous_run(read_status(status_path))
        except StatusError as err:
            if status_path.exists():
                log.warning("ignoring the previous run's status: %s", err)
        except Exception as err:  # any content: never a reason not to start
            what = f"{type(err).__name__}: {err}"
            log.warning("ignoring the previous run's status: %s: %s", status_path, what)
        boot_id = read_boot_id()
        state_dir = Path(config.agent.state_dir)
        drains_path = state_dir / "drains.json"
        try:
            drained = read_drains(drains_path)
        except StatusError as err:
            log.warning("ignoring the drains of the previous run: %s", err)
            drained = {}
        history = History(state_dir / "history.json", boot_id)
        history.load()
        if stop.is_set():
            return 0  # stopped before anything was changed
        state, intent = start_agent(config, interfaces, routes, previous, boot_id, loop.time(), drained)
        for name in state.drained:
            log.warning("uplink=%s stays drained, as the previous run left it", name)
        log_effective_config(config, options.dry_run)

        def document(running: bool) -> dict[str, Any]:
            return status_document(
                pump.state,
                running=running,
                dry_run=options.dry_run,
                boot_id=boot_id,
                mono_now=time.monotonic(),
                wall_now=time.time(),
            )

        metrics = Metrics()
        notifications = Notifications(config)
        route_edge = RouteEdge(worker, config, lambda o: pump.post(o), options.dry_run)
        nft_edge = NftEdge(lambda o: pump.post(o), options.dry_run)
        conntrack_edge = ConntrackEdge(config, lambda o: pump.post(o), route_edge.quiet, options.dry_run)
        status_writer = StatusWriter(status_path, document, lambda: pump.routes_settling())
        probers = ProberSet(
            supervisor,
            ProbeSources(lambda: pump.state),
            lambda result: pump.post(RoundObserved(result)),
            options.verbose,
        )
        probers.late = lambda name, seq, rtt_ms, family: pump.post(
            LateReplyObserved(name, seq, rtt_ms, family)
        )
        passive = PassiveEdge(lambda: pump.state.config, lambda o: pump.post(o))
        pump = Pump(
            state,
            routes=route_edge,
            nft=nft_edge,
            conntrack=conntrack_edge,
            status=status_writer,
            probers=probers,
            notifier=notifier,
            dry_run=options.dry_run,
            history=history,
            drains_path=drains_path,
            metrics=metrics,
            sinks=(notifications, metrics),
        )
        reloader = Reloader(config.source, reload, pump, worker, notifier, options.dry_run)
        operator = Operator(pump, history, reloader, document)
        control = ControlServer(state_dir / CONTROL_SOCKET, config.agent.control_group, operator.answer)
        supervisor.start("pump", pump.run, restart="never")
        supervisor.start("routes", route_edge.run)
        supervisor.start("nft", nft_edge.run)
        supervisor.start("conntrack", conntrack_edge.run)
        supervisor.start("status", status_writer.run)
        supervisor.start("reload", reloader.run)
        supervisor.start("history", history.run)
        supervisor.start("control", control.run)
        supervisor.start("notify", notifications.run)
        supervisor.start("passive", passive.run)  # it follows reloads that turn it on or off
        if config.agent.metrics_listen or config.agent.metrics_textfile:
            exposition = MetricsServer(
                lambda: metrics.render(pump.state, notifications.dropped),
                config.agent.metrics_listen,
                config.agent.metrics_textfile,
            )
            supervisor.start("metrics", exposition.run)
        started = True
        pump.begin(intent)
        return_startup_memory()
        stopped = asyncio.ensure_future(stop.wait())
        ready = asyncio.ensure_future(pump.ready.wait())
        await asyncio.wait({stopped, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not stop.is_set():
            notifier.send("READY=1\nSTATUS=" + status_summary(pump.state))
            if notifier.watchdog_s:
                watchdog = functools.partial(
                    feed_watchdog, notifier, notifier.watchdog_s, pump, route_edge, nft_edge, conntrack_edge
                )
                supervisor.start("watchdog", watchdog)
        await stopped
    finally:
        notifier.send("STOPPING=1")
        await supervisor.stop(SHUTDOWN_TASKS_S)
        if started:
            if options.cleanup and not options.dry_run:
                try:
                    done = await wait_within(
                        worker.call(nl_remove_own, config, pump.state.managed_tables), SHUTDOWN_CLEANUP_S
                    )
                    for line in done:
                        log.info("cleanup: %s", line)
                    await nft_edge.remove()
                    log.info(
                        "cleanup: removed %d routes and rules of the agent and its nft table; "
                        "nothing else was touched",
                        len(done),
                    )
                except (asyncio.TimeoutError, TimeoutError):
                    log.error("cleanup: netlink did not answer within %.0fs", SHUTDOWN_CLEANUP_S)
                except Exception:  # the last thing before exit: report it, still exit cleanly
                    log.exception("cleanup failed")
            elif options.dry_run:
                log.info("stopping: a dry run changed nothing")
            else:
                log.info("stopping: routes and rules stay in place so the router keeps working")
            status_writer.write(running=False)
            history.save()
            track = pump.state.config.agent.keepalived_track_file
            if track is not None and not options.dry_run:
                # Stopped: keepalived must never read "healthy" from an agent that is not there.
                try:
                    write_track_file(track, max(len(pump.state.config.families), 1))
                    log.info(
                        "keepalived track file %s = %d: the agent stops",
                        track,
                        len(pump.state.config.families),
                    )
                except OSError as err:
                    log.error("cannot write keepalived's track file %s: %s", track, err)
            conntrack_edge.close()
        worker.close()
        os.close(lock)
    if failure:
        log.error("stopping with a failure: %s", "; ".join(failure))
        return EXIT_FAILURE
    return 0


#: What the re-executed interpreter runs (`python3 -c SCRIPT_LOADER PATH ARGS...`): the module
#: compiled by compile(), whose parse tree is freed as soon as it returns, then run as __main__.
#: sys.path[0] is the script's real directory, as for a script, not the working directory -c gives.
SCRIPT_LOADER: Final = (
    "import os, sys; sys.argv.pop(0); _FROM_SCRIPT_LOADER = True; __file__ = sys.argv[0]\n"
    "if sys.path and sys.path[0] == '': sys.path[0] = os.path.dirname(os.path.realpath(__file__))\n"
    "with open(__file__, 'rb') as f: code = compile(f.read(), __file__, 'exec')\n"
    "del f; exec(code)"
)


def run_without_the_parse_tree(argv: Sequence[str]) -> None:
    """Replace this process by one that runs the module compiled, not parsed as a script.

    CPython keeps a script's whole parse tree alive until the script's last line has run,
    and for a daemon that is its whole life: run as a file (`python3 multiwan_agent.py
    run`, Debian's single-file install) the agent held some 18 MiB more than imported, a
    seventh of a small router's RAM. The same PID goes on (systemd and the parent see no
    change); the daemon's signals are blocked across the exec and delivered once the new
    interpreter has its handlers, so a SIGHUP in between cannot kill it. Returns only when
    there is nothing to gain or the exec failed (then the agent runs on as it is)."""
    if __name__ != "__main__" or __spec__ is not None or _FROM_SCRIPT_LOADER or not sys.executable:
        return  # imported (-m, the installed command: compiled by importlib) or already done
    path = os.path.abspath(sys.argv[0])
    try:
        with open(path, "rb") as script:
            head = script.read(4)
    except OSError:
        return  # no file to load again (`python3 - run < file`, `python3 -c "..." run`)
    import importlib.util

    if head == importlib.util.MAGIC_NUMBER:
        return  # `python3 multiwan_agent.pyc run`: run from bytecode, there is no parse tree
    sys.stdout.flush()
    sys.stderr.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, _EARLY_SIGNALS_SET)
    # What arrived until now is raised again: pending, it outlives the exec (execve(2)).
    for signum in set(_EARLY_SIGNALS):
        os.kill(os.getpid(), signum)
    _EARLY_SIGNALS.clear()
    try:
        # The interpreter's own options (-I, -E, -X ..., as multiprocessing passes them on).
        flags: list[str] = getattr(subprocess, "_args_from_interpreter_flags", list)()
        os.execv(sys.executable, [sys.executable, *flags, "-c", SCRIPT_LOADER, path, *argv])
    except OSError as err:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _EARLY_SIGNALS_SET)  # delivered to _remember_signal
        print(f"note: could not re-execute {sys.executable} ({err}); running on as a script", file=sys.stderr)


#: The daemon's process name (/proc/PID/comm, what `ps -e`, `top` and `pgrep` show and
#: keepalived's `vrrp_track_process` matches without parameters), however it was started:
#: the single file, `python3 -m`, the installed command. The CLI's commands, `run --dry-run`
#: and a `run` refused at start keep theirs.
DAEMON_PROCESS_NAME: Final = "multiwan-agentd"


PR_SET_NAME: Final = 15  # <linux/prctl.h>


def name_this_process(name: str) -> None:
    """Set the process's name (at most 15 bytes: the kernel's TASK_COMM_LEN), before the
    daemon starts its threads, which inherit it. prctl(PR_SET_NAME) where ctypes is there:
    the kernel tells it to the proc connector (how a running keepalived learns of it) on
    every kernel, a write of /proc/self/comm only since 5.15 (and 5.10 stable)."""
    encoded = name.encode("ascii")[:15]
    prctl = libc_function("prctl")
    if prctl is not None and prctl(PR_SET_NAME, encoded, 0, 0, 0) == 0:
        return
    try:
        Path("/proc/self/comm").write_bytes(encoded)
    except OSError as err:
        log.debug("cannot name the process %s: %s", name, err)


def return_startup_memory() -> None:
    """Hand back to the system the heap that starting left free (the compiler's work when
    the module was not loaded from bytecode: some 14 MiB). glibc keeps freed memory until
    asked; musl (OpenWrt) returns it by itself and has no malloc_trim."""
    gc.collect()
    # What starting made lives as long as the agent: out of the collector's way, so that a
    # full collection (a pause of the event loop) walks only what the agent made since.
    gc.freeze()
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def libc_function(name: str) -> Any:
    """A function of the C library, or None without it: ctypes is optional (OpenWrt ships
    it apart, python3-ctypes), and musl lacks some of glibc's (malloc_trim)."""
    try:
        import ctypes

        return getattr(ctypes.CDLL(None), name, None)
    except (ImportError, OSError) as err:
        log.debug("no C library function %s: %s", name, err)
        return None


def catch_early_signals() -> None:
    """Until the daemon's own handlers are in place, remember SIGTERM/SIGINT/SIGHUP
    instead of dying of them (SIGHUP's default action kills a starting agent)."""
    for signum in _EARLY_SIGNALS_SET:
        if signal.getsignal(signum) is not _remember_signal:
            signal.signal(signum, _remember_signal)


def _remember_signal(signum: int, _frame: Any) -> None:
    _EARLY_SIGNALS.append(signum)


async def run_agent(config: Config, options: DaemonOptions) -> int:
    """The daemon with its signals: handlers only set events (hypercorn style)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    for early in _EARLY_SIGNALS:
        (reload if early == signal.SIGHUP else stop).set()
    _EARLY_SIGNALS.clear()
    loop.set_exception_handler(_log_loop_exception)
    # Each probe's sendto gives up the GIL and takes it back: while the netlink worker
    # decodes a dump (a resync at 64 uplinks is hundreds of messages), every take waited
    # up to the default 5 ms switch interval, and a slot's probes left tens of ms late.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    died: list[str] = []
    threading.excepthook = functools.partial(_thread_died, loop, stop, died)
    code = await run_daemon(config, options, stop, reload)
    return EXIT_FAILURE if died else code


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # A callback (a socket reader) that raised: asyncio would print it to stderr unformatted.
    error = context.get("exception")
    log.error("event loop: %s", context.get("message", "error"), exc_info=error)


def _thread_died(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, died: list[str], args: threading.ExceptHookArgs
) -> None:
    # Our threads are executors' workers, which survive their jobs' exceptions: one
    # that dies anyway is a bug, and the agent exits non-zero to be restarted whole.
    name = args.thread.name if args.thread is not None else "?"
    log.error("thread %s died; stopping so that the agent is restarted", name, exc_info=args.exc_value)
    died.append(name)
    loop.call_soon_threadsafe(stop.set)


# Command line ################################################################
#
# Owns the commands (run, check, status), their output and exit codes, and main().


def describe_plan(config: Config) -> str:
    """`check`: the resolved plan, without touching the system."""
    agent = config.agent
    interfaces = {
        u.interface: Interface(
            u.interface,
            0,
            True,
            True,
            f"<IPv4 of {u.interface}>",
            "<DHCP gateway>" if u.gateway == "auto" else None,
            f"<IPv6 of {u.interface}>",
            "<RA gateway>" if u.gateway6 == "auto" else None,
        )
        for u in config.uplinks
    }
    first = {
        family: next(u.name for u in config.uplinks if family in u.families) for family in config.families
    }
    plan = plan_network(config, interfaces, first)
    lines = [
        f"config {config.source}: OK",
        f"agent: state_dir={agent.state_dir} hysteresis={format_duration(agent.hysteresis_s)} "
        f"route_protocol={agent.route_protocol} families={','.join(FAMILY_NAME[f] for f in config.families)}",
        f"selection table {agent.default_table}: one default route per family, replaced in place, "
        "to the selected uplink",
        "",
        "uplinks (lower priority is preferred):",
    ]
    for uplink in config.uplinks:
        check = uplink.check
        lines.append(
            f"  {uplink.name}: interface={uplink.interface} "
            f"gateway={uplink.gateway} gateway6={uplink.gateway6} "
            f"priority={uplink.priority} table={uplink.table} mark={uplink.mark:#x}/{agent.mark_mask:#x} "
            f"families={','.join(FAMILY_NAME[f] for f in uplink.families)}"
        )
        lines.append(
            f"    probe: {check.method_names}{':' + str(check.port) if check.port else ''} "
            f"{', '.join(check.targets)} every {format_duration(check.interval_s)}, "
            f"timeout {format_duration(check.timeout_s)}, down after {check.fall} failed rounds, "
            f"up after {check.rise} good rounds, round ok with {check.reliability} answer(s); "
            f"bound to {uplink.interface}"
        )
    if 6 in config.families:
        lines += ["", *describe_ipv6_plan(config, agent.rule_priority + RULE_PREFIX_OFFSET)]
    for family in config.families:
        lines += [
            "",
            f"{FAMILY_NAME[family]} rules (priorities {agent.rule_priority}-"
            f"{agent.rule_priority + RULE_BLOCK - 1}, protocol {agent.route_protocol}):",
        ]
        lines += [f"  {rule.describe()}" for rule in plan.rules if rule.family == family]
        lines += ["", f"{FAMILY_NAME[family]} routes (protocol {agent.route_protocol}):"]
        uplink_routes = plan.uplink_routes + plan.unreachable_routes
        lines += [f"  {route.describe()}" for route in uplink_routes if route.family == family]
        lines.append(f"  default via <selected uplink> table {agent.default_table}")
    lines += ["", "operating:"]
    lines.append(
        f"  control socket {agent.state_dir}/{CONTROL_SOCKET} (mode 0660, group {agent.control_group}); "
        f"history and drains in {agent.state_dir}"
    )
    if agent.metrics_listen is not None:
        host, port = agent.metrics_listen
        lines.append(f"  metrics: http://{f'[{host}]' if ':' in host else host}:{port}/metrics")
    if agent.metrics_textfile is not None:
        lines.append(f"  metrics textfile: {agent.metrics_textfile}")
    if agent.keepalived_track_file is not None:
        lines.append(
            f"  keepalived track file {agent.keepalived_track_file}: families without an uplink "
            f"(0 to {len(config.families)}; {len(config.families)} when the agent stops)"
        )
    for hook in config.hooks:
        # Only the program: its arguments may hold a token.
        arguments = f" (+{len(hook.exec) - 1} arguments)" if len(hook.exec) > 1 else ""
        lines.append(
            f"  hook {hook.exec[0]}{arguments} on {', '.join(sorted(hook.events))} "
            f"(timeout {format_duration(hook.timeout_s)})"
        )
    for webhook in config.webhooks:
        # Header values and the token may be secrets: only their names are shown.
        secrets = [f"header {name}" for name, _ in webhook.headers]
        if webhook.bearer_token_file:
            secrets.append(f"bearer token from {webhook.bearer_token_file}")
        lines.append(
            f"  webhook POST {webhook.shown} on {', '.join(sorted(webhook.events))}"
            + (f" ({', '.join(secrets)})" if secrets else "")
            + ("" if webhook.tls_verify else " WITHOUT TLS verification")
        )
    lines += ["", f"nft table {NFT_TABLE} (one transaction; shown with every uplink up):"]
    lines += ["  " + line for line in render_nft(config, steering_when_all_up(config)).splitlines()]
    return "\n".join(lines)


def describe_ipv6_plan(config: Config, prefix_priority: int) -> list[str]:
    """`check`: what IPv6 does, per uplink: its own health, the selection, the LAN prefixes."""
    carrying = [u for u in config.uplinks if 6 in u.families]
    lines = ["ipv6 plan:"]
    for uplink in carrying:
        others = "; its IPv4 is judged apart" if 4 in uplink.families else ""
        targets = ", ".join(t for t in uplink.check.targets if family_of(t) == 6)
        lines.append(f"  {uplink.name}: IPv6 health from {targets}{others}")
    lines.append(
        f"  new IPv6 traffic (the router's own too) takes the IPv6 selection among "
        f"{', '.join(u.name for u in carrying)}; a connection keeps its uplink"
    )
    for uplink in carrying:
        for prefix in uplink.lan_prefixes6:
            when_down = (
                "masqueraded (nat66) out of the uplink the IPv6 selection picks"
                if uplink.lan_prefix_failover == "nat66"
                else "kept on it (lan_prefix_failover = none: hosts must use another prefix)"
            )
            lines.append(
                f"  LAN prefix {prefix}: leaves by {uplink.name} (rule {prefix_priority}: from {prefix} "
                f"lookup {uplink.table}) while it carries IPv6; else {when_down}; never balanced"
            )
    if not any(u.lan_prefixes6 for u in carrying):
        lines.append("  no lan_prefixes6: LAN sources are routed by the selection like any other")
    return lines


def steering_when_all_up(config: Config) -> Steering:
    """`check`: the balance groups and policy uplinks the table would steer by if every uplink were up."""
    balance: dict[int, tuple[tuple[str, int], ...]] = {}
    for family in config.families:
        carrying = [u for u in config.uplinks if family in u.families]
        best = min(u.priority for u in carrying)
        members = tuple((u.name, u.weight) for u in carrying if u.priority == best)
        balance[family] = members
    policies = {
        p.name: {
            f: next((n for n in p.uplinks if f in config.uplink(n).families), None)
            for f in p.match.families
            if f in config.families
        }
        for p in config.policies
    }
    return Steering(balance, policies)


def render_status(document: Mapping[str, Any], *, stale: str | None = None) -> str:
    """The status table; `stale` says why the agent is not running (the state is its last known)."""
    now = time.time()
    head = f"selected: {document.get('selected') or 'none'}  ({document.get('reason', '')})"
    lines = [head + ("  [NO UPLINK UP]" if document.get("stranded") else "")]
    families = document.get("families") or {}
    for family, about in families.items():
        # Another family only where it differs from the first (selected uplink or reason).
        if (about.get("selected"), about.get("reason")) != (document.get("selected"), document.get("reason")):
            line = f"{family}: {about.get('selected') or 'none'}  ({about.get('reason', '')})"
            lines.append(line + ("  [NO UPLINK UP]" if about.get("stranded") else ""))
    if stale is not None:
        lines.insert(0, f"[NOT RUNNING: {stale}; last known state]")
    rows = [
        [
            "UPLINK",
            "IFACE",
            "STATE",
            "SINCE",
            "RTT",
            "LOSS",
            "TIMEOUT",
            "PASSIVE",
            "FLAPS",
            "PRIO",
            "WEIGHT",
            "CONNS",
            "SELECTED",
            "REASON",
        ]
    ]
    for name, u in document.get("uplinks", {}).items():
        state = str(u.get("state", "?")) + (", drained" if u.get("drained") else "")
        rtt = "-" if u.get("rtt_ms") is None else f"{u['rtt_ms']:.1f}ms"
        loss = "-" if u.get("loss_pct") is None else f"{u['loss_pct']:.0f}%"
        conns = "-" if u.get("connections") is None else str(u["connections"])
        selected = ",".join(u.get("selected_for") or []) or ("yes" if u.get("selected") else "-")
        timeouts = [t for t in (u.get("timeouts_ms") or {}).values() if isinstance(t, (int, float))]
        timeout = "-" if not timeouts else f"{max(timeouts):.0f}ms"
        passive = u.get("passive") if isinstance(u.get("passive"), dict) else None
        rows.append(
            [
                name,
                str(u.get("interface", "")),
                state,
                _age(now - float(u.get("since", now))),
                rtt,
                loss,
                timeout,
                "off" if passive is None else str(passive.get("state", "?")),
                str(u.get("flaps", "-")),
                str(u.get("priority", "")),
                str(u.get("weight", "")),
                conns,
                selected,
                str(u.get("reason", "")),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    ]
    for family, about in families.items():
        if about.get("balance"):
            shares = ", ".join(f"{n} x{w}" for n, w in about["balance"].items())
            lines.append(f"balance {family}: {shares} (sticky per {document.get('sticky', 'connection')})")
    for name, policy in document.get("policies", {}).items():
        for family, about in policy.items():
            if isinstance(about, dict):
                where = about.get("uplink") or f"none: {policy.get('fallback')}"
                lines.append(f"policy {name} {family}: {where}  ({about.get('reason', '')})")
    for name, u in document.get("uplinks", {}).items():
        if u.get("burst"):
            lines.append(f"confirming {name}: burst {u['burst']}")
        if u.get("hysteresis_owed_s"):
            penalty = (
                f" ({u.get('flap_penalty_s', 0):g}s of it flap penalty)" if u.get("flap_penalty_s") else ""
            )
            lines.append(f"proving {name}: owes {u['hysteresis_owed_s']:.1f}s more of hysteresis{penalty}")
    for foreign in document.get("foreign", []):
        lines.append(f"WARNING foreign {foreign['object']}: {foreign['defeats']}")
    nft = document.get("nft") or {}
    if isinstance(nft, dict) and nft.get("problem"):
        lines.append(f"WARNING nft table not current: {nft['problem']}")
    for failure in document.get("route_failures", []):
        lines.append(f"WARNING route change failing: {failure}")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def status_liveness(document: Mapping[str, Any], locked: bool, holder: int | None) -> str | None:
    """None if the agent that wrote `document` runs now, else why it does not."""
    if not locked:
        return "no agent holds the lock"
    if holder is not None and document.get("pid") != holder:
        return f"the status was written by pid {document.get('pid')}, not by the running agent (pid {holder})"
    if not document.get("running", True):
        return "the agent said it stopped"
    boot_id = read_boot_id()
    if document.get("boot_id") not in (None, boot_id):
        return "the status is from an earlier boot"
    age = time.monotonic() - float(document["updated_monotonic"])
    if age > STATUS_STALE_S:
        return f"the status has not been rewritten for {age:.0f}s (the agent may be stuck)"
    return None


def carries_traffic(document: Mapping[str, Any]) -> bool:
    """Some family's selected uplink is up or degraded (status exit code 0)."""
    return any(
        u.get("state") in ("up", "degraded") and u.get("selected")
        for u in document.get("uplinks", {}).values()
    )


def render_history(events: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for event in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(event.get("time", 0))))
        where = " ".join(str(event[k]) for k in ("uplink", "family") if event.get(k))
        reason = event.get("reason") or ""
        lines.append(f"{when}  {event.get('event', '?'):<22} {where:<16} {reason}".rstrip())
    return "\n".join(lines) if lines else "(no events in that time)"


EXIT_CODES_HELP: Final = """\
exit codes:
  run     0 clean stop, 1 a task could not be kept alive, 2 bad config, 3 refused to start
  check   0 valid (1 with --strict and a warning), 2 bad config
  status  0 an uplink carries traffic, 1 none is up, 3 the agent is not running
  others  0 done, 1 refused (the message says why), 2 bad config, 3 the agent is not running
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiwan-agent",
        description="Multi-uplink failover for Linux routers.",
        epilog="examples:\n"
        "  multiwan-agent check                  validate /etc/multiwan-agent/multiwan.toml, print the plan\n"
        "  multiwan-agent run -v                 run in the foreground, logging every probe round\n"
        "  multiwan-agent status                 which uplink carries traffic, and why\n"
        "  multiwan-agent history --since 2h     what happened\n"
        "  multiwan-agent drain lte --release    take lte out for maintenance, move its flows now\n"
        "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}\n\n{EXIT_CODES_HELP}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "-c",
            "--config",
            help=f"the config file (default {DEFAULT_CONFIG}; for its state_dir unless run/check)",
        )
        return parser

    run = command(
        "run", "run the agent", "multiwan-agent run -c /etc/multiwan-agent/multiwan.toml --dry-run -v"
    )
    run.add_argument("--dry-run", action="store_true", help="probe and decide, change nothing")
    run.add_argument(
        "--cleanup", action="store_true", help="on exit remove the agent's own routes, rules and nft table"
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("-v", "--verbose", action="store_true", help="log every probe round")
    check = command(
        "check",
        "validate the config and print the resolved plan, with warnings about this host",
        "multiwan-agent check --strict",
    )
    check.add_argument("--strict", action="store_true", help="exit 1 when there is a warning")
    init = sub.add_parser(
        "init",
        help="write a starting config from this host's default routes",
        description="Write a starting config from this host's default routes (read-only look).",
        epilog=f"example:\n  multiwan-agent init -o /etc/multiwan-agent/multiwan.toml\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument("-o", "--output", help=f"where to write it (default {DEFAULT_CONFIG}; - for stdout)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--target", action="append", help="a probe target (repeat; default public resolvers)")
    for name, help_text, example in (
        ("status", "show which uplink carries traffic, and why", "multiwan-agent status --json"),
        (
            "history",
            "show what happened: state changes, switches, drains, reloads, releases",
            "multiwan-agent history --since 1h",
        ),
        (
            "drain",
            "take an uplink out of selection, balance and policies (its probes go on)",
            "multiwan-agent drain lte --release",
        ),
        ("undrain", "give a drained uplink back", "multiwan-agent undrain lte"),
        ("reload", "read the config again (as SIGHUP), and say what came of it", "multiwan-agent reload"),
    ):
        operate = command(name, help_text, example)
        operate.add_argument("--state-dir", help="default: the config's, else /run/multiwan-agent")
        if name in ("status", "history"):
            operate.add_argument("--json", action="store_true", help="print JSON")
        if name == "history":
            operate.add_argument("--since", default="1h", help='how far back, e.g. "30m", "2h" (default 1h)')
        if name in ("drain", "undrain"):
            operate.add_argument("uplink", help="the uplink's name")
        if name == "drain":
            operate.add_argument(
                "--release", action="store_true", help="also release its tracked flows (they move at once)"
            )
            operate.add_argument(
                "--force", action="store_true", help="drain it even if it is the last uplink up"
            )
    return parser


def setup_logging(level: str) -> None:
    # Under systemd the journal stamps each line; elsewhere we add the time.
    fmt = (
        "%(levelname)s %(message)s"
        if os.environ.get("INVOCATION_ID")
        else "%(asctime)s %(levelname)s %(message)s"
    )
    # Libraries log at WARNING and above only: our -v is about probe rounds,
    # not about every netlink message pyroute2 sees.
    logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    log.setLevel(getattr(logging, level.upper()))


#: Capability bits (linux/capability.h) the agent needs: netlink changes, raw ICMP.
CAP_NET_ADMIN: Final = 12
CAP_NET_RAW: Final = 13


def missing_capabilities(status_text: str, dry_run: bool) -> list[str]:
    """Which of CAP_NET_ADMIN/CAP_NET_RAW the process lacks, from /proc/self/status."""
    effective = 0
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
    needed = {"CAP_NET_RAW": CAP_NET_RAW}
    if not dry_run:
        needed["CAP_NET_ADMIN"] = CAP_NET_ADMIN
    return [name for name, bit in sorted(needed.items()) if not effective >> bit & 1]


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging("debug" if args.verbose else args.log_level)
    try:
        config = load_config(args.config or DEFAULT_CONFIG)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        missing = missing_capabilities(Path("/proc/self/status").read_text(), args.dry_run)
    except OSError:
        missing = []
    if missing:
        log.error("refusing to start, nothing was changed: missing %s", " and ".join(missing))
        return EXIT_REFUSED
    options = DaemonOptions(dry_run=args.dry_run, cleanup=args.cleanup, verbose=args.verbose)
    try:
        return asyncio.run(run_agent(config, options))
    except StartupRefused as err:
        log.error("refusing to start, nothing was changed: %s", err)
        return EXIT_REFUSED
    except PermissionError as err:
        log.error("refusing to start: %s (needs CAP_NET_ADMIN and CAP_NET_RAW)", err)
        return EXIT_REFUSED
    finally:
        catch_early_signals()  # the closed loop restored the default actions; threads join now


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What `check` reads of this host (read-only) to warn about what the config cannot see."""

    #: Interfaces by name, with their connected prefixes ("203.0.113.2/30"); None: not readable.
    interfaces: Mapping[str, tuple[str, ...]] | None
    #: Why the interfaces could not be read.
    interfaces_error: str = ""
    #: The sysctls that matter, by key ("net.ipv4.ip_forward"); missing ones are left out.
    sysctl: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Why `nft -c` refuses the agent's table ("" when it takes it).
    nft_problem: str = ""
    #: The kernel takes the table only without conntrack labels (as OpenWrt's).
    labels_missing: bool = False
    #: Groups and files the config names that do not exist or cannot be read.
    missing_groups: tuple[str, ...] = ()
    unreadable_files: tuple[str, ...] = ()


def check_warnings(config: Config, facts: HostFacts) -> list[str]:
    """What would make the agent fail on this host although the config is valid (pure)."""
    warnings: list[str] = []
    if facts.interfaces is None:
        warnings.append(
            f"cannot read this host's interfaces ({facts.interfaces_error}): they are not checked"
        )
    for index, uplink in enumerate(config.uplinks):
        where = f"uplink[{index}] ({uplink.name})"
        if facts.interfaces is not None and uplink.interface not in facts.interfaces:
            warnings.append(
                f"{where}: interface {uplink.interface} does not exist on this host: `run` would wait "
                f"for it, with the uplink down (interface {uplink.interface} is gone)"
            )
        rp = max(
            int(facts.sysctl.get(f"net.ipv4.conf.{key}.rp_filter", "0") or 0)
            for key in ("all", uplink.interface)
        )
        if rp == 1 and 4 in uplink.families:
            warnings.append(
                f"{where}: strict reverse-path filtering on {uplink.interface} (rp_filter = 1): "
                f"connections from the internet (port forwards) arriving through {uplink.name} while it is "
                f"not selected fail the check and are dropped; set "
                f"net.ipv4.conf.{uplink.interface}.rp_filter = 2 (loose)"
            )
        prefixes = (facts.interfaces or {}).get(uplink.interface)
        for key, gateway in (("gateway", uplink.gateway), ("gateway6", uplink.gateway6)):
            if gateway in ("auto", "none") or prefixes is None:
                continue
            address = ipaddress.ip_address(gateway)
            if address.is_link_local:
                continue
            if not any(address in ipaddress.ip_interface(p).network for p in prefixes):
                warnings.append(
                    f"{where}.{key}: {gateway} is not on-link on {uplink.interface} (its prefixes: "
                    f"{', '.join(prefixes) or 'none'}): the kernel refuses a route via it"
                )
    if facts.sysctl.get("net.ipv4.ip_forward") == "0" and 4 in config.families:
        warnings.append(
            "net.ipv4.ip_forward = 0: this host does not forward IPv4, so the LAN's traffic goes nowhere"
        )
    if facts.sysctl.get("net.ipv6.conf.all.forwarding") == "0" and 6 in config.families:
        warnings.append("net.ipv6.conf.all.forwarding = 0: this host does not forward IPv6")
    if facts.nft_problem:
        warnings.append(
            f"{facts.nft_problem}: connection stickiness, steering and NAT would not work "
            "(routing and failover do)"
        )
    targets = {u.check.targets for u in config.uplinks}
    if len(config.uplinks) > 1 and len(targets) == 1 and len(next(iter(targets))) == 1:
        warnings.append(
            f"every uplink probes the one target {next(iter(targets))[0]}: when it stops answering, every "
            "uplink looks down at once; give each check two or more targets"
        )
    rates: dict[str, float] = {}
    for uplink in config.uplinks:
        for target in uplink.check.targets:
            rates[target] = rates.get(target, 0.0) + len(uplink.check.methods) / uplink.check.interval_s
    for target, rate in sorted(rates.items()):
        if rate > PROBE_RATE_WARN_PER_S:
            warnings.append(
                f"{target} gets {rate:g} probes a second from this router: public targets rate-limit "
                f"answers (often to a few a second), which looks like loss; probe it at most "
                f"{PROBE_RATE_WARN_PER_S:g} times a second in all"
            )
    if facts.labels_missing:
        warnings.append(
            "this kernel has no conntrack labels: the agent's table goes without them, and release_flows "
            "knows connections from the internet by their DNAT and the router's own addresses only"
        )
    for group in facts.missing_groups:
        warnings.append(
            f"agent.control_group: no group {group!r} on this host: the control socket stays root's"
        )
    for path in facts.unreadable_files:
        warnings.append(f"{path} cannot be read: a webhook would send no token")
    return warnings


def gather_host_facts(config: Config) -> HostFacts:
    """Read, never change: interfaces and their prefixes, sysctls, `nft -c` of the table."""
    interfaces: dict[str, tuple[str, ...]] | None = None
    error = ""
    try:
        with pyroute2_iproute()() as ipr:
            names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}
            found: dict[str, list[str]] = {name: [] for name in names.values()}
            for msg in ipr.get_addr():
                name = names.get(msg["index"])
                address = msg.get_attr("IFA_ADDRESS")
                if name is not None and address:
                    found[name].append(f"{address}/{msg['prefixlen']}")
            interfaces = {name: tuple(prefixes) for name, prefixes in found.items()}
    except Exception as err:  # no pyroute2, no netlink: the rest is still checked
        error = f"{type(err).__name__}: {err}"
    keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv4.conf.all.rp_filter"]
    keys += [f"net.ipv4.conf.{u.interface}.rp_filter" for u in config.uplinks]
    sysctl = {}
    for key in keys:
        try:
            sysctl[key] = Path("/proc/sys", *key.split(".")).read_text().strip()
        except OSError:
            pass
    labels_missing = False

    def nft_check(labels: bool) -> subprocess.CompletedProcess[str]:
        script = render_nft(config, steering_when_all_up(config), labels)
        return subprocess.run(
            ["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT_S
        )

    try:
        proc = nft_check(labels=True)
        nft_problem = (
            "" if proc.returncode == 0 else f"nft -c refuses the agent's table: {proc.stderr.strip()}"
        )
        if proc.returncode != 0 and "label" in proc.stderr and nft_check(labels=False).returncode == 0:
            # As the agent does (OpenWrt's kernels have no conntrack labels): a lesser table, not none.
            nft_problem = ""
            labels_missing = True
    except FileNotFoundError:
        nft_problem = "nft is not installed"
    except subprocess.TimeoutExpired:
        nft_problem = f"nft did not answer within {format_duration(NFT_TIMEOUT_S)}"
    missing: list[str] = []
    if config.agent.control_group != "root":
        try:
            grp.getgrnam(config.agent.control_group)
        except KeyError:
            missing.append(config.agent.control_group)
    unreadable = []
    for webhook in config.webhooks:
        if webhook.bearer_token_file and not os.access(webhook.bearer_token_file, os.R_OK):
            unreadable.append(webhook.bearer_token_file)
    return HostFacts(
        interfaces,
        error,
        sysctl,
        nft_problem,
        labels_missing=labels_missing,
        missing_groups=tuple(missing),
        unreadable_files=tuple(unreadable),
    )


#: Route protocols a DHCP or RA client leaves (gateway = "auto" follows them).
RTPROT_AUTO: Final = {9: "RA", 16: "DHCP", 11: "RA"}  # ra, dhcp, (zebra's kernel ra)
#: The targets `init` writes unless told: anycast resolvers that answer pings (the config's own choice).
INIT_TARGETS: Final = {4: ("1.1.1.1", "9.9.9.9"), 6: ("2606:4700:4700::1111", "2620:fe::fe")}


@dataclass(frozen=True, slots=True)
class HostUplink:
    """An interface with a default route in main, as `init` found it."""

    interface: str
    #: "auto" (a DHCP/RA client's route), "none" (point-to-point) or the static gateway.
    gateway: str
    gateway6: str
    metric: int
    families: tuple[int, ...]
    why: str


def host_uplinks(ipr: Any) -> list[HostUplink]:
    """Interfaces with a default route in main, lowest metric first (read-only)."""
    names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}
    gateways: dict[str, dict[int, str]] = {}
    metrics: dict[str, int] = {}
    whys: dict[str, list[str]] = {}
    for family in FAMILIES:
        for msg in ipr.get_routes(family=ADDRESS_FAMILY[family], table=RT_TABLE_MAIN):
            if msg["dst_len"] != 0 or _route_table(msg) != RT_TABLE_MAIN or msg["type"] != 1:
                continue
            name = names.get(msg.get_attr("RTA_OIF"))
            if name is None or family in gateways.get(name, {}):
                continue
            gateway = msg.get_attr("RTA_GATEWAY")
            proto = int(msg["proto"])
            if gateway is None:
                spec, why = "none", "no gateway: point-to-point"
            elif proto in RTPROT_AUTO:
                spec, why = "auto", f"its default route comes from {RTPROT_AUTO[proto]}"
            else:
                spec, why = str(gateway), f"a static default route via {gateway}"
            gateways.setdefault(name, {})[family] = spec
            metrics[name] = min(metrics.get(name, 1 << 32), int(msg.get_attr("RTA_PRIORITY") or 0))
            whys.setdefault(name, []).append(f"{FAMILY_TITLE[family]}: {why}")
    uplinks = []
    for name, by_family in gateways.items():
        gateway = by_family.get(4, "auto")
        gateway6 = by_family.get(6, "none" if gateway == "none" else "auto")
        uplinks.append(
            HostUplink(
                name, gateway, gateway6, metrics[name], tuple(sorted(by_family)), "; ".join(whys[name])
            )
        )
    return sorted(uplinks, key=lambda u: (u.metric, u.interface))


def render_init(uplinks: Sequence[HostUplink], targets: Sequence[str] | None) -> str:
    """A starting config for these uplinks: values written by tomli-w, comments saying why."""
    import tomli_w

    families = sorted({f for u in uplinks for f in u.families})
    chosen = list(targets) if targets else [t for f in families for t in INIT_TARGETS[f]]
    lines = [
        "# multiwan-agent config written by `multiwan-agent init` from what this host has now.",
        "# Check it with `multiwan-agent check`; every key is in the README's config reference.",
        "",
        "[agent]",
        "# How long a preferred uplink that failed must stay up before traffic moves back.",
        tomli_w.dumps({"hysteresis": "30s"}).strip(),
        "",
        "[check]",
        "# Probed through each uplink's own interface; two or more targets, so that one",
        "# that stops answering does not look like every uplink failing.",
        tomli_w.dumps({"targets": chosen, "interval": "1s", "timeout": "1s", "fall": 3, "rise": 3}).strip(),
    ]
    for priority, uplink in enumerate(uplinks, start=1):
        name = re.sub(r"[^A-Za-z0-9_-]", "_", uplink.interface)[:32]
        lines += [
            "",
            "[[uplink]]",
            f"# {uplink.interface}: {uplink.why}; metric {uplink.metric} in main, so priority {priority}",
            "# (lower is preferred).",
        ]
        values: dict[str, Any] = {"name": name, "interface": uplink.interface, "priority": priority}
        if uplink.gateway != "auto":
            values["gateway"] = uplink.gateway
        if uplink.gateway6 not in ("auto", "none" if uplink.gateway == "none" else "auto"):
            values["gateway6"] = uplink.gateway6
        lines.append(tomli_w.dumps(values).strip())
    return "\n".join(lines) + "\n"


def cmd_init(args: argparse.Namespace) -> int:
    out = args.output or DEFAULT_CONFIG
    if out != "-" and Path(out).exists() and not args.force:
        print(f"error: {out} exists; add --force to overwrite it", file=sys.stderr)
        return EXIT_REFUSED_COMMAND
    try:
        with pyroute2_iproute()() as ipr:
            uplinks = host_uplinks(ipr)
    except Exception as err:  # no pyroute2, no netlink
        print(f"error: cannot read this host's routes: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_REFUSED_COMMAND
    if not uplinks:
        print(
            "error: no interface has a default route in the main table: nothing to fail over", file=sys.stderr
        )
        return EXIT_REFUSED_COMMAND
    try:
        text = render_init(uplinks, args.target)
    except ImportError:
        print(
            "error: init writes TOML with tomli-w: pip install tomli-w (Debian: python3-tomli-w)",
            file=sys.stderr,
        )
        return EXIT_REFUSED_COMMAND
    parse_config(text, out)  # what init writes, check accepts
    if out == "-":
        sys.stdout.write(text)
        return 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(Path(out), text)
    found = ", ".join(u.interface for u in uplinks)
    print(f"wrote {out} with uplinks {found}; now: multiwan-agent check -c {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config or DEFAULT_CONFIG)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(describe_plan(config))
    warnings = check_warnings(config, gather_host_facts(config))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_WARNINGS if warnings and args.strict else 0


def _state_dir(args: argparse.Namespace) -> str:
    """--state-dir, else the config's (-c, or the default config if it exists), else the default.
    Raises ConfigError for a config that was named and does not validate."""
    if args.state_dir:
        return str(args.state_dir)
    path = args.config or DEFAULT_CONFIG
    if args.config is None and not Path(path).exists():
        return AgentConfig().state_dir
    try:
        return load_config(path).agent.state_dir
    except ConfigError:
        # A config being edited may not validate yet: its state_dir still names the agent to ask
        # (`reload` then answers with the error, from the agent).
        try:
            state_dir = tomllib.loads(Path(path).read_text(encoding="utf-8"))["agent"]["state_dir"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            state_dir = AgentConfig().state_dir if args.command == "reload" else None
        # Only a path the kernel takes: a NUL in it made `status` die in os.open.
        if isinstance(state_dir, str) and _is_path(state_dir):
            return state_dir
        raise


def cmd_status(args: argparse.Namespace) -> int:
    """0: an uplink carries traffic; 1: none is up; 3: the agent is not running (or its status
    cannot be read). A status.json of any content is judged, never trusted."""
    try:
        state_dir = _state_dir(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        reply = control_request(state_dir, {"cmd": "status"})
        document, stale = reply["status"], None
        if not isinstance(document, dict):
            raise ConnectionError("not a status")
    except (OSError, ValueError, KeyError, RecursionError) as err:
        # Not answering: what status.json says, judged (and marked stale if the agent is gone).
        denied = isinstance(err, PermissionError)
        if denied:
            print(
                f"note: no permission on {state_dir}/{CONTROL_SOCKET} (run as root or as a member of "
                "[agent] control_group); this is status.json",
                file=sys.stderr,
            )
        locked, holder = agent_running(state_dir)
        try:
            document = read_status(Path(state_dir) / "status.json")
        except StatusError as err:
            running = f"an agent (pid {holder}) runs, but " if locked else "the agent is not running; "
            print(f"error: {running}its status cannot be read: {err}", file=sys.stderr)
            return EXIT_NOT_RUNNING
        stale = status_liveness(document, locked, holder)
        if stale is None and not denied:
            stale = "it does not answer on its control socket"
    if args.json:
        print(json.dumps({**document, "stale": stale}, indent=2, sort_keys=True))
    else:
        print(render_status(document, stale=stale))
    if stale is not None:
        return EXIT_NOT_RUNNING
    return 0 if carries_traffic(document) else EXIT_NO_UPLINK


def cmd_history(args: argparse.Namespace) -> int:
    try:
        state_dir = _state_dir(args)
        seconds = parse_duration(args.since)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError:
        print(
            f'error: --since: expected a duration such as "30m" or "2h", got {args.since!r}', file=sys.stderr
        )
        return EXIT_CONFIG
    code = 0
    try:
        reply = control_request(state_dir, {"cmd": "history", "since": seconds})
        events = reply["events"]
    except (OSError, ValueError, KeyError, RecursionError):
        code = EXIT_NOT_RUNNING
        try:
            text = (Path(state_dir) / "history.json").read_text(encoding="utf-8", errors="replace")
            events = [
                e
                for e in parse_history(text, f"{state_dir}/history.json")
                if e["time"] >= time.time() - seconds
            ]
        except (OSError, StatusError) as err:
            print(f"error: the agent is not running, and its history cannot be read: {err}", file=sys.stderr)
            return code
        print("(the agent is not running: the history it left)", file=sys.stderr)
    print(json.dumps(events, indent=2) if args.json else render_history(events))
    return code


def cmd_operate(args: argparse.Namespace) -> int:
    """drain, undrain, reload: one request to the running agent."""
    try:
        state_dir = _state_dir(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    request: dict[str, Any] = {"cmd": args.command}
    if args.command in ("drain", "undrain"):
        request["uplink"] = args.uplink
    if args.command == "drain":
        request |= {"release": args.release, "force": args.force}
    try:
        reply = control_request(state_dir, request)
    except PermissionError:
        print(
            f"error: no permission on {state_dir}/{CONTROL_SOCKET}: run as root or as a member of "
            "[agent] control_group",
            file=sys.stderr,
        )
        return EXIT_REFUSED_COMMAND
    except (OSError, ValueError, RecursionError) as err:
        print(
            f"error: the agent is not running (cannot reach {state_dir}/{CONTROL_SOCKET}: {err})",
            file=sys.stderr,
        )
        return EXIT_NOT_RUNNING
    if reply.get("ok"):
        print(reply.get("message", "done"))
        return 0
    print(f"error: {reply.get('error', 'refused')}", file=sys.stderr)
    return EXIT_REFUSED_COMMAND


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        catch_early_signals()
        run_without_the_parse_tree(sys.argv[1:] if argv is None else argv)
    commands = {
        "run": cmd_run,
        "check": cmd_check,
        "init": cmd_init,
        "status": cmd_status,
        "history": cmd_history,
        "drain": cmd_operate,
        "undrain": cmd_operate,
        "reload": cmd_operate,
    }
    try:
        return commands[args.command](args)
    except BrokenPipeError:
        # `check | head`: the reader has gone; nothing more to say, and no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
