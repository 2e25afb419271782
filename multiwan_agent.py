#!/usr/bin/env python3
"""multiwan-agent: multi-uplink failover for Linux routers.

One asyncio process. Per uplink it probes through that uplink's interface
(ICMP echo or TCP connect, sockets bound with SO_BINDTODEVICE and the uplink's
address), runs a fall/rise state machine, selects the best healthy uplink by
priority with hysteresis, and steers traffic through netlink: a routing table
per uplink, source/fwmark/oif rules into it, and one default route in a
selection table that is only ever *replaced*. Everything it creates carries
its own route protocol id, lives in its own tables and its own rule priority
range, and nothing else is ever touched. Conntrack is never flushed.

The module reads in order: constants, errors, config, the pure core (health
state machine, selection, route plan and diff), probes, netlink, status and
systemd notification, the daemon, the command line, main().
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import errno
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import socket
import statistics
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__version__: Final = "0.1.0"

log = logging.getLogger("multiwan")


# Constants ###################################################################

#: Exit code for a configuration that does not validate (nothing was changed).
EXIT_CONFIG: Final = 2
#: Exit code when the agent refuses to start (collision, missing privilege).
EXIT_REFUSED: Final = 3

#: Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
IFNAME_MAX: Final = 15
#: Tables the kernel reserves: unspec, compat, default, main, local.
RESERVED_TABLES: Final = frozenset({0, 252, 253, 254, 255})
#: Route protocol ids 0-4 belong to the kernel (unspec, redirect, kernel, boot, static).
FIRST_FREE_PROTOCOL: Final = 5
#: The rule priority block the agent owns starts at `rule_priority` and is this long.
RULE_BLOCK: Final = 100
#: Offsets inside that block (see plan_network for why this order).
RULE_MAIN_OFFSET: Final = 0
RULE_OIF_OFFSET: Final = 10
RULE_SOURCE_OFFSET: Final = 40
RULE_MARK_OFFSET: Final = 70
RULE_DEFAULT_OFFSET: Final = 99
#: Per-group slots between the offsets above bound the number of uplinks.
MAX_UPLINKS: Final = 29

#: Status metrics (rtt, loss) are rewritten at most this often; transitions at once.
STATUS_METRICS_PERIOD_S: Final = 1.0
#: How often status counts the tracked connections marked for each uplink (a conntrack dump).
CONNTRACK_PERIOD_S: Final = 2.0
#: How long a count of tracked connections waits for a reconcile to end (then goes on anyway).
CONNTRACK_PAUSE_MAX_S: Final = 2.0
#: A full netlink reconcile also runs this often, to repair what events missed.
RESYNC_PERIOD_S: Final = 30.0

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

DURATION_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
#: Interface names as the agent accepts them: what nft takes unquoted-safe in a string.
IFNAME_RE: Final = re.compile(rf"^[A-Za-z0-9_.@-]{{1,{IFNAME_MAX}}}$")
IFNAME_EXPECTED: Final = f"an interface name (letters, digits, '_', '.', '@', '-'; at most {IFNAME_MAX})"
#: A port or a port range, as a policy takes them ("443", "10000-20000").
PORT_RE: Final = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


# Errors ######################################################################


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
    timeout_s: float = 1.0
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

    @property
    def families(self) -> tuple[int, ...]:
        """The families this uplink carries: those its check has targets in."""
        return tuple(
            f for f in FAMILIES if any(ipaddress.ip_address(t).version == f for t in self.check.targets)
        )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    state_dir: str = "/run/multiwan-agent"
    hysteresis_s: float = 30.0
    default_table: int = 200
    rule_priority: int = 5000
    route_protocol: int = 240
    mark_mask: int = 0xFF00
    #: "connection": each new connection is placed by weight; "source": each LAN host.
    sticky: str = "connection"
    #: With sticky = "source": a host idle this long is placed afresh.
    sticky_timeout_s: float = 1800.0


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

    @property
    def families(self) -> tuple[int, ...]:
        """The families this match can apply to (its addresses and protocol allow)."""
        allowed = POLICY_PROTOCOLS.get(self.protocol or "", FAMILIES)
        return tuple(
            f
            for f in allowed
            if (not self.src or self.networks("src", f)) and (not self.dst or self.networks("dst", f))
        )


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

    def uplink(self, name: str) -> UplinkConfig:
        for uplink in self.uplinks:
            if uplink.name == name:
                return uplink
        raise KeyError(name)

    @property
    def tables(self) -> frozenset[int]:
        return frozenset({self.agent.default_table} | {u.table for u in self.uplinks})

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(f for f in FAMILIES if any(f in u.families for u in self.uplinks))


def parse_duration(value: object) -> float:
    """'250ms', '1s', '2m', '1.5s' -> seconds. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError
    match = DURATION_RE.match(value)
    if not match:
        raise ValueError
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


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

    def duration(self, name: str, default: float, minimum_s: float = 0.0) -> float:
        if name not in self.table:
            return default
        value = self.raw(name)
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise self.error(name, 'a duration such as "500ms" or "2s"', value) from None
        if seconds < minimum_s:
            raise self.error(name, f"a duration of at least {format_duration(minimum_s)}", value)
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
                raise ConfigError(self.source, self.key(name), "unknown key")


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
        if not names or any(n not in known for n in names) or len(set(names)) != len(names):
            raise reader.error("method", expected, raw)
        values["methods"] = tuple(Method(n) for n in names)
    if reader.has("targets"):
        targets = reader.raw("targets")
        if not isinstance(targets, list) or not targets:
            raise reader.error("targets", "a non-empty array of IP addresses", targets)
        parsed: list[str] = []
        for index, target in enumerate(targets):
            try:
                address = ipaddress.ip_address(target) if isinstance(target, str) else None
            except ValueError:
                address = None
            if address is None:
                raise reader.error(f"targets[{index}]", "an IPv4 or IPv6 address", target)
            if address.is_link_local or address.is_multicast or address.is_unspecified:
                raise reader.error(f"targets[{index}]", "a unicast, non-link-local address", target)
            if str(address) in parsed:
                raise ConfigError(
                    reader.source, reader.key(f"targets[{index}]"), f"duplicate target {target}"
                )
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
        if not valid:
            raise reader.error(
                "url", 'an http:// or https:// URL such as "http://example.com/generate_204"', url
            )
        values["url"] = url
    if reader.has("expect_status"):
        raw = reader.raw("expect_status")
        codes = raw if isinstance(raw, list) else [raw]
        if not codes or not all(
            isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes
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
        if not encoded or len(encoded) > 253 or any(not 0 < len(label) <= 63 for label in labels):
            raise reader.error("query_name", 'a DNS name such as "example.com"', name)
        values["query_name"] = name
    if reader.has("query_type"):
        query_type = reader.raw("query_type")
        if query_type not in DNS_TYPES:
            raise reader.error("query_type", '"A" or "AAAA"', query_type)
        values["query_type"] = query_type
    values["interval_s"] = reader.duration("interval", base.interval_s, minimum_s=0.05)
    values["timeout_s"] = reader.duration("timeout", base.timeout_s, minimum_s=0.01)
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


def parse_config(text: str, source: str) -> Config:
    """Parse and validate a whole config. Raises ConfigError; has no side effect."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # tomllib renders the position as "(at line 3, column 5)": keep it.
        raise ConfigError(source, "", f"invalid TOML: {err}") from None
    root = _Reader(source, "", document)

    agent_reader = root.sub("agent") or _Reader(source, "agent", {})
    defaults = AgentConfig()
    state_dir = agent_reader.string("state_dir", defaults.state_dir)
    if not state_dir.startswith("/"):
        raise agent_reader.error("state_dir", "an absolute path", state_dir)
    agent = AgentConfig(
        state_dir=state_dir,
        hysteresis_s=agent_reader.duration("hysteresis", defaults.hysteresis_s),
        default_table=agent_reader.integer("default_table", defaults.default_table, 1, 2**31 - 1),
        rule_priority=agent_reader.integer("rule_priority", defaults.rule_priority, 1, 32765 - RULE_BLOCK),
        route_protocol=agent_reader.integer(
            "route_protocol", defaults.route_protocol, FIRST_FREE_PROTOCOL, 255
        ),
        mark_mask=agent_reader.integer("mark_mask", defaults.mark_mask, 1, 0xFFFFFFFF),
        sticky=agent_reader.choice("sticky", STICKY_MODES, defaults.sticky),
        sticky_timeout_s=agent_reader.duration("sticky_timeout", defaults.sticky_timeout_s, minimum_s=1.0),
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
        raise ConfigError(source, "uplink", f"expected at most {MAX_UPLINKS} uplinks")

    mark_shift = (agent.mark_mask & -agent.mark_mask).bit_length() - 1
    uplinks: list[UplinkConfig] = []
    seen: dict[str, dict[object, int]] = {"name": {}, "interface": {}, "table": {}, "mark": {}}
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
            if not isinstance(raw_exclude, list):
                raise reader.error("nat_exclude", 'an array of networks such as "10.0.0.0/8"', raw_exclude)
            for i, network in enumerate(raw_exclude):
                try:
                    nat_exclude.append(str(ipaddress.ip_network(network, strict=False)))
                except (TypeError, ValueError):
                    raise reader.error(
                        f"nat_exclude[{i}]", 'a network such as "10.0.0.0/8"', network
                    ) from None
        initial_state = reader.choice("initial_state", ("up", "down"), "down")
        weight = reader.integer("weight", 1, 1, 1000)
        release_flows = _read_release_flows(reader)
        priority = reader.integer("priority", 1, 0, 1_000_000)
        table = reader.integer("table", agent.default_table + 1 + index, 1, 2**31 - 1)
        if table in RESERVED_TABLES or table == agent.default_table:
            raise reader.error(
                "table", f"a table id other than the reserved ones and {agent.default_table}", table
            )
        default_mark = ((index + 1) << mark_shift) & agent.mark_mask
        mark = reader.integer("mark", default_mark or None, 1, 0xFFFFFFFF)
        if mark & ~agent.mark_mask:
            raise reader.error("mark", f"a mark inside mark_mask {agent.mark_mask:#x}", mark)
        check_reader = reader.sub("check")
        check = _read_check(check_reader, base_check)
        reader.finish()
        _validate_check(source, f"{path}.check", check)
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
            )
        )
    policies = _read_policies(root, uplinks)
    root.finish()
    return Config(source=source, agent=agent, uplinks=tuple(uplinks), policies=policies)


def _one_or_many(reader: _Reader, key: str, expected: str) -> list[tuple[str, Any]]:
    """A value or a non-empty array of values, each with its key path (`dst_port[1]`)."""
    if not reader.has(key):
        return []
    value = reader.raw(key)
    if not isinstance(value, list):
        return [(key, value)]
    if not value:
        raise reader.error(key, f"{expected}, or a non-empty array of them", value)
    return [(f"{key}[{i}]", item) for i, item in enumerate(value)]


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
                parsed.append(str(ipaddress.ip_network(item, strict=False)))
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
# Everything in this section and the next two is pure: data and a clock in,
# decisions out. The daemon feeds observations and carries decisions out.


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

    @property
    def answered(self) -> int:
        return sum(1 for probe in self.probes if probe.ok)

    @property
    def ok(self) -> bool:
        """Every method, in every address family, got `required` answers (all, with fewer targets).

        An uplink is one path: if its IPv4 is black-holed while IPv6 answers,
        it is not healthy for the traffic that selects it.
        """
        groups: dict[tuple[Method, int], list[ProbeResult]] = {}
        for probe in self.probes:
            key = (probe.method, ipaddress.ip_address(probe.target).version)
            groups.setdefault(key, []).append(probe)
        for results in groups.values():
            if sum(1 for p in results if p.ok) < min(self.required, len(results)):
                return False
        return bool(self.probes)

    @property
    def rtt_ms(self) -> float | None:
        rtts = [p.rtt_ms for p in self.probes if p.ok and p.rtt_ms is not None]
        return statistics.median(rtts) if rtts else None

    @property
    def reason(self) -> str:
        """The failure reasons, most common first, e.g. 'timeout' or 'timeout, refused'."""
        several_methods = len({p.method for p in self.probes}) > 1
        reasons: dict[str, int] = {}
        for probe in self.probes:
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


@dataclass(frozen=True, slots=True)
class Quality:
    """Loss, latency and jitter over the window (dpinger's measures)."""

    rounds: int
    loss_pct: float
    rtt_ms: float | None
    #: Median change of the RTT from one round to the next (RFC 3550's idea,
    #: made robust): a single slow reply moves it no more than the median RTT.
    jitter_ms: float | None


def measure_quality(samples: Sequence[RoundSample]) -> Quality | None:
    sent = sum(s.sent for s in samples)
    if not sent:
        return None
    rtts = [r for s in samples for r in s.rtts_ms]
    per_round = [statistics.median(s.rtts_ms) for s in samples if s.rtts_ms]
    steps = [abs(b - a) for a, b in zip(per_round, per_round[1:], strict=False)]
    return Quality(
        rounds=len(samples),
        loss_pct=100.0 * (sent - sum(s.answered for s in samples)) / sent,
        rtt_ms=statistics.median(rtts) if rtts else None,
        jitter_ms=statistics.median(steps) if steps else None,
    )


def quality_problem(samples: Sequence[RoundSample], check: CheckConfig) -> tuple[bool, str | None]:
    """(judged, problem): nothing is judged before the window is full."""
    if len(samples) < check.window:
        return False, None
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


def initial_health(uplink: UplinkConfig, now: float) -> Health:
    """What to assume before the first rounds (mwan3's initial_state)."""
    if uplink.initial_state == "up":
        return Health(uplink.name, State.UP, since=now, reason="assumed up (initial_state = up)")
    return Health(uplink.name, State.DOWN, since=now, reason="not yet confirmed")


def observe_round(
    health: Health, result: RoundResult, check: CheckConfig, now: float
) -> tuple[Health, list[Transition]]:
    """Fold one probe round into an uplink's health.

    Reachability: `fall` consecutive failed rounds make it down, `rise` good
    rounds up. Quality: once the window is full, `fall` consecutive rounds
    with the window past a threshold make an up uplink degraded, `rise`
    rounds within them make it up again. Transitions only, never per round.
    """
    if not health.link_usable:
        # A round that was in flight when the link went away says nothing new.
        return health, []
    sample = RoundSample(
        len(result.probes),
        result.answered,
        tuple(p.rtt_ms for p in result.probes if p.ok and p.rtt_ms is not None),
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
    judged, problem = quality_problem(samples, check)
    good_q, bad_q = health.good_quality, health.bad_quality
    if judged:
        good_q, bad_q = (0, bad_q + 1) if problem else (good_q + 1, 0)
    failure = health.failure
    if not stale and not result.ok and result.gateway_ok is not None:
        failure = "gateway" if result.gateway_ok is False else "upstream"
    updated = dataclasses.replace(
        health,
        good_rounds=good,
        bad_rounds=bad,
        good_quality=good_q,
        bad_quality=bad_q,
        rtt_ms=rtt,
        samples=samples,
        failure=failure,
        last_round_at=last_round_at,
    )
    state = health.state
    if state is not State.DOWN and bad >= check.fall:
        reason = f"{bad} consecutive failed rounds: {result.where} ({result.reason})"
        return _transition(updated, State.DOWN, reason, now)
    if state is State.DOWN and good >= check.rise:
        reason = f"{good} consecutive good rounds"
        return _transition(updated, State.UP, reason, now, recovered=health.has_failed)
    if state is State.UP and problem and bad_q >= check.fall:
        return _transition(updated, State.DEGRADED, problem, now)
    if state is State.DEGRADED and judged and not problem and good_q >= check.rise:
        quality = measure_quality(samples)
        assert quality is not None
        reason = f"quality back within the thresholds (loss {quality.loss_pct:.0f}%) for {good_q} rounds"
        return _transition(updated, State.UP, reason, now, recovered=True)
    return updated, []


def observe_link(health: Health, link: LinkObservation, now: float) -> tuple[Health, list[Transition]]:
    """Carrier loss, a vanished interface or a lost address make an uplink down at once."""
    if link.usable == health.link_usable:
        if not link.usable and health.state is State.DOWN and link.reason != health.reason:
            # Still unusable, for a new reason (down, then deleted): status says what is true now.
            return dataclasses.replace(health, reason=link.reason), []
        return health, []
    if not link.usable:
        updated = dataclasses.replace(
            health, link_usable=False, good_rounds=0, bad_rounds=0, failure=None, last_round_at=now
        )
        if health.state is State.DOWN:
            return dataclasses.replace(updated, reason=link.reason), []
        return _transition(updated, State.DOWN, link.reason, now)
    # The link is back: it must prove itself again through `rise` good rounds
    # (and a round that began before the change proves nothing).
    return dataclasses.replace(health, link_usable=True, good_rounds=0, bad_rounds=0, last_round_at=now), []


def _transition(
    health: Health, state: State, reason: str, now: float, recovered: bool = False
) -> tuple[Health, list[Transition]]:
    # Between up and degraded reachability did not change: a run of failed
    # rounds that started while degraded still counts towards down.
    reachability_changed = (state is State.DOWN) != (health.state is State.DOWN)
    updated = dataclasses.replace(
        health,
        state=state,
        since=now,
        reason=reason,
        recovered=recovered,
        good_rounds=0 if reachability_changed else health.good_rounds,
        bad_rounds=0 if reachability_changed else health.bad_rounds,
        good_quality=0,
        bad_quality=0,
    )
    if state is State.DOWN:
        # What the path did before it failed says nothing about it once back.
        updated = dataclasses.replace(updated, samples=(), has_failed=True)
    if state is State.DEGRADED:
        updated = dataclasses.replace(updated, has_failed=True)
    return updated, [Transition(health.name, health.state, state, reason, now)]


def remap_health(health: Health, check: CheckConfig) -> Health:
    """Carry a health across a reload whose rise/fall/window changed (as keepalived does)."""
    return dataclasses.replace(
        health,
        good_rounds=min(health.good_rounds, max(check.rise - 1, 0)),
        bad_rounds=min(health.bad_rounds, max(check.fall - 1, 0)),
        good_quality=min(health.good_quality, max(check.rise - 1, 0)),
        bad_quality=min(health.bad_quality, max(check.fall - 1, 0)),
        samples=health.samples[-check.window :],
    )


# Core: selection #############################################################


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
    hysteresis_s: float,
    now: float,
) -> Decision:
    """Choose the uplink that carries new traffic.

    The best `up` uplink by priority; a `degraded` one only when none is up.
    Leaving a down or degraded uplink for one that is up is immediate. Moving
    back to a better uplink waits until it has been up for `hysteresis_s` if
    it came back from a failure; one that never failed (at start) takes over
    as soon as it is confirmed. Among equal priorities the current one stays.
    """
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
        return Decision(current, f"no uplink is up; keeping {current}", stranded=True)
    if current is not None and current not in order:
        gone = current not in healths or healths[current].state is State.UP
        why_leave = (
            f"{current} cannot carry this traffic now" if gone else f"{current} is {state(current).value}"
        )
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
    ready_at = candidate.since + hysteresis_s
    if candidate.recovered and now < ready_at:
        return Decision(
            current,
            f"{best} is better but up only {now - candidate.since:.1f}s of {hysteresis_s:g}s hysteresis",
            wake_at=ready_at,
        )
    if candidate.recovered:
        return Decision(best, f"{best} has been up for the {hysteresis_s:g}s hysteresis")
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
    hysteresis_s: float,
    now: float,
) -> BalanceGroup:
    """The uplinks that share new connections with the selected one, by weight.

    Those `up` at the selected uplink's priority. One that recovered from a
    failure joins after `hysteresis_s` up, as a failback would. A degraded or
    stranded selection balances nothing: it is a last resort.
    """
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
        ready_at = health.since + hysteresis_s
        if uplink.name != selected and health.recovered and now < ready_at:
            waits.append(ready_at)
            continue
        members.append((uplink.name, uplink.weight))
    return BalanceGroup(tuple(members), min(waits) if waits else None)


def select_for_policy(
    policy: PolicyConfig,
    healths: Mapping[str, Health],
    candidates: Sequence[UplinkConfig],
    current: str | None,
    hysteresis_s: float,
    now: float,
) -> Decision:
    """The uplink a policy's traffic takes: `select` over its own list, in its order.

    None when none of them is up or degraded: the fallback applies (the normal
    selection, or a drop).
    """
    ranked = [
        dataclasses.replace(u, priority=policy.uplinks.index(u.name))
        for u in candidates
        if u.name in policy.uplinks
    ]
    decision = select(healths, ranked, current, hysteresis_s, now)
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


def link_observation(uplink: UplinkConfig, interface: Interface | None) -> LinkObservation:
    """Usable while at least one family the uplink is checked for can be routed."""
    if interface is None:
        return LinkObservation(False, f"interface {uplink.interface} is gone")
    if not interface.admin_up:
        return LinkObservation(False, f"interface {uplink.interface} is administratively down")
    if not interface.carrier:
        return LinkObservation(False, f"carrier lost on {uplink.interface}")
    if any(routable(uplink, interface, family) for family in uplink.families):
        return LinkObservation(True)
    family = uplink.families[0]
    if interface.source(family) is None:
        return LinkObservation(False, f"no {FAMILY_TITLE[family]} address on {uplink.interface}")
    client = "DHCP" if family == 4 else "RA"
    return LinkObservation(False, f"no default route from {client} on {uplink.interface} yet")


def plan_network(
    config: Config, interfaces: Mapping[str, Interface], selected: Mapping[int, str | None]
) -> NetPlan:
    """The desired routes and rules for these interfaces and this selection.

    Per address family the uplinks are checked for, rule order inside our
    block, lowest priority first:
    - `lookup main suppress_prefixlength 0`: main's specific routes (LANs,
      connected nets, VPNs, static routes) keep winning, while main's default
      routes (the DHCP/RA client's, whatever their metric) never do;
    - `oif X lookup T`: sockets bound to an uplink (our probes) use its table;
    - `from ADDR lookup T`: traffic sourced from an uplink's address leaves by it;
    - `fwmark M/MASK lookup T`: marked traffic (policy, stickiness) uses it;
    - `lookup <default_table>`: everything else takes the selected uplink.
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
    """
    protocol = config.agent.route_protocol
    ours = {(r.family, r.table, r.unreachable): r for r in routes if r.protocol == protocol}
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
    for spec in sorted(installed - wanted, key=lambda r: (r.family, r.priority)):
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


# Probes ######################################################################


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


class IcmpEcho:
    """ICMP/ICMPv6 echo through one interface: the one place that knows icmplib.

    icmplib 2.1 (Debian, Ubuntu) has no asyncio API and 3.0's AsyncSocket lets
    one waiter swallow another's reply, so we use icmplib to open the
    privileged socket, build and send the echo request, and read replies
    ourselves from the event loop, matching them by (target, id, sequence).
    Both versions keep the raw socket in `_sock`. RTTs use the monotonic
    loop clock, not icmplib's wall-clock times.
    """

    def __init__(self, interface: str, source: str, ident: int, ifindex: int = 0) -> None:
        import icmplib  # imported here so `check` and `status` work without it

        self._icmplib = icmplib
        self.interface = interface
        self.source = source
        self.ifindex = ifindex
        self.ident = ident & 0xFFFF
        self.family = ipaddress.ip_address(source).version
        socket_class = icmplib.ICMPv4Socket if self.family == 4 else icmplib.ICMPv6Socket
        self._socket = socket_class(address=source, privileged=True)
        raw: socket.socket = self._socket._sock
        try:
            raw.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
            raw.setblocking(False)
        except OSError:
            self._socket.close()
            raise
        self._raw = raw
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[tuple[str, int], tuple[float, asyncio.Future[ProbeResult]]] = {}
        self._loop.add_reader(raw.fileno(), self._on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self._raw.fileno())
        for _, waiter in self._waiting.values():
            if not waiter.done():
                waiter.cancel()
        self._waiting.clear()
        self._socket.close()

    async def ping(self, target: str, seq: int, timeout_s: float) -> ProbeResult:
        """Echo `target` ("fe80::1%wan0" for a link-local one); answers come back by (target, seq)."""
        seq &= 0xFFFF
        waiter: asyncio.Future[ProbeResult] = self._loop.create_future()
        request = self._icmplib.ICMPRequest(destination=target, id=self.ident, sequence=seq, payload_size=24)
        sent_at = self._loop.time()
        target = target.split("%", 1)[0]
        self._waiting[(target, seq)] = (sent_at, waiter)
        try:
            try:
                self._socket.send(request)
            except self._icmplib.ICMPLibError as err:
                return ProbeResult(target, False, reason=f"error: {err}")
            try:
                return await asyncio.wait_for(waiter, timeout_s)
            except asyncio.TimeoutError:
                return ProbeResult(target, False, reason="timeout")
        finally:
            self._waiting.pop((target, seq), None)

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded: the rest waits for the next wake-up
            try:
                packet, address = self._raw.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            now = self._loop.time()
            sender = str(address[0])
            parsed = _parse_icmp(packet) if self.family == 4 else _parse_icmp6(packet, sender)
            if parsed is None:
                continue
            icmp_type, target, ident, seq = parsed
            if ident != self.ident:
                continue
            entry = self._waiting.get((target, seq))
            if entry is None or entry[1].done():
                continue
            sent_at, waiter = entry
            if icmp_type == 0:
                waiter.set_result(ProbeResult(target, True, rtt_ms=(now - sent_at) * 1000.0))
            else:
                kind = "unreachable" if icmp_type == 3 else "ttl exceeded"
                waiter.set_result(ProbeResult(target, False, reason=f"{kind} (from {sender})"))


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
    except asyncio.TimeoutError:
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
            raise ValueError("no TLS context")
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
            raise ValueError("not an HTTP response")
        return int(parts[1])

    try:
        status = await asyncio.wait_for(exchange(), check.timeout_s)
    except asyncio.TimeoutError:
        return ProbeResult(target, False, reason="timeout", method=method)
    except ConnectionRefusedError:
        return ProbeResult(target, False, reason="refused", method=method)
    except ssl.SSLCertVerificationError as err:
        return ProbeResult(target, False, reason=f"tls: {err.verify_message}", method=method)
    except (OSError, ssl.SSLError, ValueError) as err:
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
        raise ValueError("no matching reply")

    try:
        rcode = await asyncio.wait_for(exchange(), check.timeout_s)
    except asyncio.TimeoutError:
        return ProbeResult(target, False, reason="timeout", method=Method.DNS)
    except (OSError, ValueError) as err:
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
        return self.address if ipaddress.ip_address(target).version == 4 else self.address6


class UplinkProber:
    """Sends one round of probes per interval for one uplink, while it is usable."""

    def __init__(
        self,
        uplink: UplinkConfig,
        ident: int,
        source: Callable[[], ProbeSource | None],
        deliver: Callable[[RoundResult], None],
    ) -> None:
        self.uplink = uplink
        self.ident = ident
        self._source = source
        self._deliver = deliver
        self._echo: dict[int, IcmpEcho] = {}
        self._seq = 0
        self._rounds: set[asyncio.Task[None]] = set()
        self._tls: Any = None
        #: Gateways that have answered a ping since the prober started.
        self._gateway_answered: set[str] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.uplink.check.interval_s
        next_at = loop.time()
        try:
            while True:
                source = self._source()
                if source is not None:
                    self._seq += 1
                    task = asyncio.ensure_future(self._round(self._seq, source))
                    self._rounds.add(task)
                    task.add_done_callback(self._rounds.discard)
                else:
                    self._close_echo()
                # Rounds start on a fixed schedule; a late wake-up skips slots, never bunches.
                next_at += interval
                now = loop.time()
                if next_at < now:
                    next_at = now + interval - ((now - next_at) % interval)
                await asyncio.sleep(next_at - now)
        finally:
            for task in list(self._rounds):
                task.cancel()
            self._close_echo()

    def _close_echo(self) -> None:
        for echo in self._echo.values():
            echo.close()
        self._echo.clear()

    async def _round(self, seq: int, source: ProbeSource) -> None:
        loop = asyncio.get_running_loop()
        check = self.uplink.check
        started = loop.time()
        if Method.HTTPS in check.methods and self._tls is None:
            self._tls = await loop.run_in_executor(None, tls_context, check)
        # Only targets of a family the uplink can route now: an IPv4-only LTE
        # stick in a dual-stack config is judged on its IPv4 answers.
        targets = [t for t in check.targets if source.for_target(t) is not None]
        jobs = [self._probe(m, t, seq, source) for m in check.methods for t in targets]
        names = [(t, m) for m in check.methods for t in targets]
        gateways = self._gateways(source) if check.gateway_check else []
        # A gateway that is also a target is answered by that probe (one ICMP id/seq slot each).
        pinged = [g for g in gateways if not (Method.ICMP in check.methods and g in targets)]
        jobs += [self._ping_gateway(g, seq, source) for g in pinged]
        names += [(g, Method.ICMP) for g in pinged]
        # A probe that raises (icmplib's errors are no OSError; a socket that
        # cannot be opened) is a failed probe, never a lost round.
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        results = [
            outcome
            if isinstance(outcome, ProbeResult)
            else ProbeResult(name, False, reason=f"error: {outcome}", method=method)
            for outcome, (name, method) in zip(outcomes, names, strict=True)
        ]
        probes = tuple(results[: len(results) - len(pinged)])
        answers = {r.target: r.ok for r in results[len(results) - len(pinged) :]}
        answers.update({p.target: p.ok for p in probes if p.method is Method.ICMP and p.target in gateways})
        for gateway, ok in answers.items():
            if ok:
                self._gateway_answered.add(gateway)
        # Blame the gateway only if it answered pings before: many drop ICMP.
        judged = [ok for g, ok in answers.items() if g in self._gateway_answered]
        self._deliver(
            RoundResult(
                self.uplink.name,
                seq,
                started,
                probes,
                check.reliability,
                gateway=", ".join(gateways) or None,
                gateway_ok=any(judged) if judged else None,
            )
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

    async def _ping_gateway(self, gateway: str, seq: int, source: ProbeSource) -> ProbeResult:
        # A link-local IPv6 gateway needs its interface as scope.
        target = f"{gateway}%{self.uplink.interface}" if gateway.lower().startswith("fe80:") else gateway
        echo = self._echo_for(ipaddress.ip_address(gateway).version, source)
        if echo is None:
            return ProbeResult(gateway, False, reason="no source address")
        return await echo.ping(target, seq, self.uplink.check.timeout_s)

    def _echo_for(self, family: int, source: ProbeSource) -> IcmpEcho | None:
        # SO_BINDTODEVICE binds to an ifindex: a re-created interface (new
        # index) or a renumbered one needs a new socket.
        address = source.address if family == 4 else source.address6
        if address is None:
            return None
        echo = self._echo.get(family)
        if echo is None or (echo.source, echo.ifindex) != (address, source.ifindex):
            if echo is not None:
                echo.close()
            echo = self._echo[family] = IcmpEcho(self.uplink.interface, address, self.ident, source.ifindex)
        return echo

    async def _probe(self, method: Method, target: str, seq: int, source: ProbeSource) -> ProbeResult:
        check = self.uplink.check
        address = source.for_target(target)
        family = ipaddress.ip_address(target).version
        if address is None:
            return ProbeResult(target, False, reason=f"no {FAMILY_TITLE[family]} address", method=method)
        interface = self.uplink.interface
        if method is Method.TCP:
            assert check.port is not None
            return await tcp_probe(interface, address, target, check.port, check.timeout_s)
        if method in (Method.HTTP, Method.HTTPS):
            return await http_probe(interface, address, target, check, method, self._tls)
        if method is Method.DNS:
            return await dns_probe(interface, address, target, check)
        echo = self._echo_for(family, source)
        assert echo is not None
        return await echo.ping(target, seq, check.timeout_s)


# Netlink #####################################################################
#
# pyroute2 0.7 (Debian 12, OpenWrt) has no asyncio API, and 0.9 refuses its
# synchronous IPRoute inside a running event loop. Both work from a plain
# thread, so one worker thread owns the IPRoute socket and every request goes
# through it in order; the loop awaits the result. Events come from our own
# non-blocking NETLINK_ROUTE socket on the loop: it only needs the message
# type, and any event triggers a fresh dump, so no parser of ours can drift
# from what the kernel says.

T = TypeVar("T")


class NetlinkWorker:
    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self._local = threading.local()

    def _ipr(self) -> Any:
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            from pyroute2 import IPRoute

            ipr = IPRoute()
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

        self._executor.submit(_close).result(timeout=5)
        self._executor.shutdown(wait=True)


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
                    source=msg.get_attr("FRA_SRC") if msg["src_len"] else None,
                    oifname=msg.get_attr("FRA_OIFNAME"),
                    # 0xFFFFFFFF is the kernel's "not set".
                    suppress_prefixlength=None if suppress in (None, 0xFFFFFFFF) else int(suppress),
                    family=family,
                )
            )
    return entries


def nl_default_routes(
    ipr: Any, tables: Iterable[int], defaults_only: bool = True, families: Sequence[int] = FAMILIES
) -> list[RouteEntry]:
    """Default routes in these tables (or every route, for the collision check)."""
    entries: list[RouteEntry] = []
    for family in families:
        for table in sorted(set(tables)):
            for msg in ipr.get_routes(family=ADDRESS_FAMILY[family], table=table):
                if (defaults_only and msg["dst_len"] != 0) or _route_table(msg) != table:
                    continue
                entries.append(
                    RouteEntry(
                        table=table,
                        oif=msg.get_attr("RTA_OIF"),
                        gateway=msg.get_attr("RTA_GATEWAY"),
                        protocol=int(msg["proto"]),
                        family=family,
                        unreachable=msg["type"] == RTN_UNREACHABLE,
                    )
                )
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


def _rule_args(rule: RuleSpec, protocol: int) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        family=ADDRESS_FAMILY[rule.family], priority=rule.priority, table=rule.table, protocol=protocol
    )
    if rule.fwmark is not None:
        args["fwmark"] = rule.fwmark
        args["fwmask"] = rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF
    if rule.source is not None:
        args["src"] = rule.source
        args["src_len"] = HOST_PREFIX[rule.family]
    if rule.oifname is not None:
        args["oifname"] = rule.oifname
    if rule.suppress_prefixlength is not None:
        # pyroute2 0.7 drops `suppress_prefixlength=0` (falsy); the raw NLA name works on all versions.
        args["FRA_SUPPRESS_PREFIXLEN"] = rule.suppress_prefixlength
    return args


def conntrack_counts(
    marks: Mapping[str, int], mask: int, quiet: threading.Event | None = None
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
        for name, mark in marks.items():
            for family in FAMILIES:
                request = _ct_message(CT_GET, NLM_F_DUMP, family, _mark_filter(mark, mask), next(_sequence))
                counts[name] += sum(1 for _ in _ct_answers(sock, request, quiet))
    return counts


@dataclass(frozen=True, slots=True)
class Released:
    """What conntrack_release did."""

    deleted: int = 0
    #: Connections that came in from the internet (port forwards, to the router): kept.
    inbound_kept: int = 0
    failed: int = 0
    error: str | None = None


def conntrack_release(
    mark: int, mask: int, local: frozenset[str], families: Iterable[int] = FAMILIES
) -> Released:
    """Delete the connections placed on one uplink, one by one; never a flush.

    Each delete names the entry's original tuple and its id, so an entry that
    was re-created meanwhile (a new flow with the same ports, already on the new
    path) is left alone: the kernel refuses a stale id. An entry without a
    tuple is never sent (a delete without one is a flush), nor one whose mark
    we do not see ourselves. Connections that came in from the internet
    (destination NAT, or addressed to one of `local`) are kept.
    """
    deleted = inbound = failed = 0
    error: str | None = None
    with _ctnetlink_socket() as sock:
        for family in sorted(families):
            # The whole dump first: a delete on the socket would cut it short.
            entries = [
                e for e in _ct_dump(sock, family, mark, mask) if e.tuple_orig and e.mark & mask == mark
            ]
            doomed: list[TrackedEntry] = []
            for entry in entries:
                # Labelled by our table; the other two catch those from before it was installed.
                if entry.inbound or entry.status & IPS_DST_NAT or entry.destination in local:
                    inbound += 1
                else:
                    doomed.append(entry)
            for batch in range(0, len(doomed), CT_DELETE_BATCH):
                done, errors = _ct_delete(sock, family, doomed[batch : batch + CT_DELETE_BATCH])
                deleted += done
                # ENOENT: it went meanwhile (closed, timed out), or was re-created (a new id).
                errors = [e for e in errors if e.errno != errno.ENOENT]
                failed += len(errors)
                error = str(errors[-1]) if errors else error
    return Released(deleted, inbound, failed, error)


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
    sock.settimeout(5.0)
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


def _mark_filter(mark: int, mask: int) -> bytes:
    # nla headers are host order; these payloads network order.
    return _nla(CTA_MARK, struct.pack("!I", mark)) + _nla(CTA_MARK_MASK, struct.pack("!I", mask))


def _ct_message(kind: int, flags: int, family: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", ADDRESS_FAMILY[family], 0, 0) + attrs  # nfgenmsg: family, v0, res_id
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def _ct_answers(sock: socket.socket, request: bytes, quiet: threading.Event | None = None) -> Iterator[bytes]:
    """Send a dump request; yield each answer's payload (after nfgenmsg) until NLMSG_DONE."""
    (seq,) = struct.unpack_from("=I", request, 8)
    sock.send(request)
    while True:
        data = sock.recv(1 << 20)
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
    offset = 0
    while offset + NLMSG_HEADER.size <= len(data):
        length, msg_type, _, msg_seq, _ = NLMSG_HEADER.unpack_from(data, offset)
        if length < NLMSG_HEADER.size:
            return
        yield msg_type, msg_seq, data[offset + NLMSG_HEADER.size : offset + length]
        offset += (length + 3) & ~3


def _ct_dump(sock: socket.socket, family: int, mark: int, mask: int) -> Iterator[TrackedEntry]:
    """The entries of one family whose mark matches, filtered by the kernel."""
    request = _ct_message(CT_GET, NLM_F_DUMP, family, _mark_filter(mark, mask), next(_sequence))
    for payload in _ct_answers(sock, request):
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


def nl_remove_own(ipr: Any, config: Config, tables: Iterable[int]) -> list[str]:
    """--cleanup: our rules first (traffic falls back to main), then our routes."""
    done: list[str] = []
    for rule in nl_rules(ipr):
        if owns_rule(config, rule):
            ipr.rule("del", **_rule_args(rule.spec(), config.agent.route_protocol))
            done.append(f"del_rule {FAMILY_NAME[rule.family]} {rule.spec().describe()}")
    for route in nl_default_routes(ipr, tables):
        if route.protocol == config.agent.route_protocol:
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


# nftables ####################################################################
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


def render_nft(config: Config, steering: Steering | None = None) -> str:
    """The whole table, as one transaction that replaces whatever version is live.

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
            f"\t\tct mark set ct mark and {keep} or {uplink.mark:#x} ct label set {INBOUND_LABEL}",
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
    """Masquerade on the uplinks with `nat = true`, but not towards their `nat_exclude`."""
    rules: list[str] = []
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


async def nft_run(*args: str, script: str | None = None) -> tuple[int, str]:
    """Run the nft CLI (present wherever nftables is); (exit code, stderr)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "nft",
            *args,
            stdin=asyncio.subprocess.PIPE if script is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        return 127, str(err)
    _, stderr = await proc.communicate(script.encode() if script is not None else None)
    return proc.returncode or 0, stderr.decode(errors="replace").strip()


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


# Status and systemd ##########################################################


def write_json_atomically(path: Path, document: Mapping[str, Any]) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


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


@dataclass
class UplinkRuntime:
    """What the daemon keeps per uplink besides its Health."""

    uplink: UplinkConfig
    interface: Interface | None = None
    prober_task: asyncio.Task[None] | None = None


class Agent:
    """Wires the pure core to probes, netlink, status and systemd."""

    def __init__(
        self,
        config: Config,
        *,
        dry_run: bool = False,
        cleanup: bool = False,
        verbose: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.dry_run = dry_run
        self.cleanup = cleanup
        self.verbose = verbose
        self.notifier = notifier or Notifier()
        self.healths: dict[str, Health] = {}
        self.runtime: dict[str, UplinkRuntime] = {}
        #: Per address family: the uplink carrying new traffic, and why.
        self.selected: dict[int, str | None] = {family: None for family in FAMILIES}
        self.decisions: dict[int, Decision] = {family: Decision(None, "starting") for family in FAMILIES}
        self.interfaces: dict[str, Interface] = {}
        self.managed_tables: set[int] = set(config.tables)
        self._netlink = NetlinkWorker()
        self._events: NetlinkEvents | None = None
        self._sync_wanted = asyncio.Event()
        self._sync_links = True
        self._status_dirty = False
        self._status_forced = False
        self._wake_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # One reconcile at a time: the sync loop and a reload must not interleave netlink changes.
        self._sync_lock = asyncio.Lock()
        #: Changes that failed last time (logged once), and when to try again (doubling back-off).
        self._apply_failures: set[tuple[str, str]] = set()
        self._retry_delay_s = 0.0
        self._retry_at: float | None = None
        self._dry_run_changes: list[Change] = []
        self._nft_events: NftEvents | None = None
        #: Tracked connections marked for each uplink (None: conntrack not readable).
        self._connections: dict[str, int] | None = None
        self._conntrack_warned = False
        self._nft_wanted = asyncio.Event()
        self._nft_installed = False
        #: The config the live table was rendered from (a reload re-installs it whole).
        self._nft_config: Config | None = None
        #: One nft transaction at a time, so `_nft_steering` says what is live.
        self._nft_lock = asyncio.Lock()
        #: What the nft table should steer (decided) and what it does steer (installed).
        self.steering = Steering()
        self._nft_steering: Steering | None = None
        #: Per policy and family: the uplink its traffic takes, and why.
        self.policy_decisions: dict[str, dict[int, Decision]] = {}
        #: (uplink, family) carrying new traffic (selected, balanced, a policy's), for release_flows.
        self._carrying: set[tuple[str, int]] = set()
        #: Uplinks whose marked connections are to be released: why, and in which families.
        self._release_pending: dict[str, tuple[str, frozenset[int]]] = {}
        self._release_task: asyncio.Task[None] | None = None
        #: Conntrack dumps can take seconds on a big table: a thread of their own, so that
        #: neither route changes (the netlink worker) nor its watchdog wait behind them.
        self._conntrack_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="conntrack")
        self._not_syncing = threading.Event()
        self._not_syncing.set()
        #: The selected default routes as last installed, per family (for the fast path).
        self._applied_defaults: dict[int, RouteSpec] = {}
        self._started_ok = False

    # -- lifecycle ----------------------------------------------------------

    async def run(self, stop: asyncio.Event, reload: asyncio.Event | None = None) -> None:
        """Run until `stop` is set; `reload` set by SIGHUP re-reads the config."""
        loop = asyncio.get_running_loop()
        try:
            await self._start(loop.time())
            self.notifier.send("READY=1\nSTATUS=" + self.summary())
            self._tasks.append(asyncio.ensure_future(self._sync_loop()))
            self._tasks.append(asyncio.ensure_future(self._status_loop()))
            self._tasks.append(asyncio.ensure_future(self._nft_loop()))
            if self.notifier.watchdog_s:
                self._tasks.append(asyncio.ensure_future(self._watchdog_loop(self.notifier.watchdog_s)))
            self._start_probers()
            reload = reload or asyncio.Event()
            while not stop.is_set():
                stop_wait = asyncio.ensure_future(stop.wait())
                reload_wait = asyncio.ensure_future(reload.wait())
                await asyncio.wait({stop_wait, reload_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                reload_wait.cancel()
                for task in self._tasks:
                    if task.done() and not task.cancelled() and task.exception():
                        raise task.exception()  # type: ignore[misc]
                if reload.is_set() and not stop.is_set():
                    reload.clear()
                    await self.reload()
        finally:
            self.notifier.send("STOPPING=1")
            await self._shutdown()

    async def _start(self, now: float) -> None:
        config = self.config
        problems = await self._collisions(config)
        if problems:
            raise StartupRefused("; ".join(problems))
        routes = await self._netlink.call(nl_default_routes, config.tables)
        self.interfaces = await self._netlink.call(nl_interfaces, config.agent.route_protocol)
        previous = self._read_previous_status()
        adopted = self._adoptable(routes)
        for uplink in config.uplinks:
            health = initial_health(uplink, now)
            failed_before = previous.get(uplink.name) in ("failed", "proving")
            if uplink.name in adopted.values() and not failed_before:
                health = dataclasses.replace(
                    health, state=State.UP, reason="adopted the route a previous run left"
                )
            elif failed_before:
                # It failed before the restart, or was still proving itself:
                # it owes the hysteresis again (a restart must not shortcut it).
                health = dataclasses.replace(
                    health, state=State.DOWN, reason="failed in the previous run", has_failed=True
                )
            self.healths[uplink.name] = health
            self.runtime[uplink.name] = UplinkRuntime(uplink)
        names = {iface.index: name for name, iface in self.interfaces.items()}
        for route in routes:
            # What the selection table holds now: the fast path must not re-send it (no flap).
            if route.table == config.agent.default_table and route.oif in names:
                spec = RouteSpec(route.table, names[route.oif], route.gateway, route.family)
                self._applied_defaults[route.family] = spec
        for family, name in adopted.items():
            self.selected[family] = name
            log.info(
                "uplink=%s adopted: the selected %s default route of a previous run points at it",
                name,
                FAMILY_NAME[family],
            )
        self._log_effective_config()
        self._events = NetlinkEvents(self._request_sync)
        await self._sync()
        await self._install_nft("start")
        self._started_ok = True

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for runtime in self.runtime.values():
            if runtime.prober_task is not None:
                runtime.prober_task.cancel()
        if self._release_task is not None:
            self._release_task.cancel()
        pending = self._tasks + [r.prober_task for r in self.runtime.values() if r.prober_task]
        pending += [self._release_task] if self._release_task is not None else []
        await asyncio.gather(*pending, return_exceptions=True)
        if self._events is not None:
            self._events.close()
        if self._nft_events is not None:
            self._nft_events.close()
        if self.cleanup and not self.dry_run and self._started_ok:
            try:
                done = await self._netlink.call(nl_remove_own, self.config, self.managed_tables)
                for line in done:
                    log.info("cleanup: %s", line)
                code, error = await nft_run("delete", "table", *NFT_TABLE.split())
                if code == 0:
                    log.info("cleanup: deleted nft table %s", NFT_TABLE)
                elif self._nft_installed:
                    log.warning("cleanup: cannot delete nft table %s: %s", NFT_TABLE, error)
                log.info("cleanup: removed %d objects of the agent; nothing else was touched", len(done))
            except Exception:
                log.exception("cleanup failed")
        elif self._started_ok:
            log.info("stopping: routes and rules stay in place so the router keeps working")
        if self._started_ok:
            self._write_status(running=False)
        await asyncio.get_running_loop().run_in_executor(None, self._netlink.close)
        self._conntrack_thread.shutdown(wait=False)

    # -- observations in ----------------------------------------------------

    def _deliver_round(self, result: RoundResult) -> None:
        health = self.healths.get(result.uplink)
        runtime = self.runtime.get(result.uplink)
        if health is None or runtime is None:
            return
        now = loop_now()
        if self.verbose:
            detail = " ".join(f"{p.target}={_probe_detail(p)}" for p in result.probes)
            log.debug(
                "uplink=%s round=%d %s %d/%d %s",
                result.uplink,
                result.seq,
                "ok" if result.ok else "failed",
                result.answered,
                len(result.probes),
                detail,
            )
        updated, transitions = observe_round(health, result, runtime.uplink.check, now)
        self.healths[result.uplink] = updated
        self._status_dirty = True
        if transitions:
            self._on_transitions(transitions)
            self._request_sync(links=False)

    def _request_sync(self, links: bool = True) -> None:
        self._sync_links = self._sync_links or links
        self._sync_wanted.set()

    def _on_transitions(self, transitions: Iterable[Transition]) -> None:
        for t in transitions:
            level = logging.WARNING if t.new is State.DOWN else logging.INFO
            log.log(level, "uplink=%s %s: %s", t.uplink, t.new.value, t.reason)
            runtime = self.runtime.get(t.uplink)
            if runtime is None:
                continue
            if t.new is State.DOWN and "on_down" in runtime.uplink.release_flows:
                self._release_pending[t.uplink] = ("it went down", frozenset(runtime.uplink.families))
            elif t.new is State.UP:
                self._release_pending.pop(t.uplink, None)  # back before its flows were released
        self._status_forced = True

    # -- the one path that changes the system -------------------------------

    async def _sync_loop(self) -> None:
        """The task that reconciles on events, hysteresis expiry, retries and every RESYNC_PERIOD_S."""
        loop = asyncio.get_running_loop()
        crash_delay_s = 0.5
        while True:
            deadline = loop.time() + RESYNC_PERIOD_S
            for at in (self._wake_at, self._retry_at):
                if at is not None:
                    deadline = min(deadline, at)
            try:
                await asyncio.wait_for(self._sync_wanted.wait(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                self._sync_links = True  # periodic repair of what events may have missed
            self._sync_wanted.clear()
            try:
                await self._sync()
                crash_delay_s = 0.5
            except asyncio.CancelledError:
                raise
            except Exception:
                # The task boundary: log the bug with its traceback, back off, keep serving.
                log.exception("sync failed; retrying in %.1fs", crash_delay_s)
                await asyncio.sleep(crash_delay_s)
                crash_delay_s = min(crash_delay_s * 2, RESYNC_PERIOD_S)
                self._sync_links = True
                self._sync_wanted.set()

    def _report_apply_failures(self, failed: Sequence[tuple[Change, str]]) -> None:
        """Log a failing change once, not on every retry; retry with a doubling back-off."""
        current = {(change.describe(), error) for change, error in failed}
        for what, error in sorted(current - self._apply_failures):
            log.warning("netlink: %s failed: %s; retrying with back-off", what, error)
        for what, _ in sorted(self._apply_failures - current):
            log.info("netlink: %s no longer fails", what)
        self._apply_failures = current
        if failed:
            self._retry_delay_s = min(max(self._retry_delay_s * 2, 0.5), RESYNC_PERIOD_S)
            self._retry_at = loop_now() + self._retry_delay_s
            self._sync_links = True
        else:
            self._retry_delay_s, self._retry_at = 0.0, None

    async def _sync(self) -> None:
        """Observe links, select, and reconcile routes and rules with the plan."""
        async with self._sync_lock:
            self._not_syncing.clear()  # a conntrack count pauses meanwhile
            try:
                await self._sync_locked()
            finally:
                self._not_syncing.set()

    async def _sync_locked(self) -> None:
        config = self.config
        protocol = config.agent.route_protocol
        if self._sync_links:
            self._sync_links = False
            # Only the families configured: a dump less on the path of every failover.
            self.interfaces = await self._netlink.call(nl_interfaces, protocol, config.families)
        now = loop_now()
        for uplink in config.uplinks:
            interface = self.interfaces.get(uplink.interface)
            before = self.runtime[uplink.name].interface
            if before is not None and interface is not None:
                renumbered = _describe_renumbering(uplink, before, interface)
                if renumbered:
                    # DHCP/RA renewed with new values: the plan below rebuilds the
                    # uplink's table and rules in this same reconcile.
                    log.info("uplink=%s renumbered: %s", uplink.name, renumbered)
                    self._status_forced = True
            self.runtime[uplink.name].interface = interface
            health, transitions = observe_link(
                self.healths[uplink.name], link_observation(uplink, interface), now
            )
            self.healths[uplink.name] = health
            if transitions:
                self._on_transitions(transitions)
        wakes: list[float] = []
        hysteresis_s = config.agent.hysteresis_s
        balance: dict[int, tuple[tuple[str, int], ...]] = {}
        for family in config.families:
            # Each family chooses among the uplinks that can route it right now.
            candidates = [
                u
                for u in config.uplinks
                if family in u.families and routable(u, self.interfaces.get(u.interface), family)
            ]
            self._decide(family, select(self.healths, candidates, self.selected[family], hysteresis_s, now))
            group = balance_group(self.healths, candidates, self.selected[family], hysteresis_s, now)
            balance[family] = group.members
            for policy in config.policies:
                if family in policy.match.families:
                    previous = self.policy_decisions.get(policy.name, {}).get(family)
                    current = previous.selected if previous is not None else None
                    decision = select_for_policy(policy, self.healths, candidates, current, hysteresis_s, now)
                    self._decide_policy(policy, family, decision)
            waits = [self.decisions[family].wake_at, group.wake_at]
            waits += [d.get(family, Decision(None, "")).wake_at for d in self.policy_decisions.values()]
            wakes += [w for w in waits if w is not None]
        self._wake_at = min(wakes) if wakes else None
        self._steer(
            Steering(
                balance,
                {
                    name: {f: d.selected for f, d in decisions.items()}
                    for name, decisions in self.policy_decisions.items()
                },
            )
        )

        plan = plan_network(config, self.interfaces, self.selected)
        indexes = {name: iface.index for name, iface in self.interfaces.items()}
        if not self.dry_run:
            # Fast path: a new selection is one replace, sent before the
            # verifying dumps below (which then find it in place).
            urgent = [
                Change("replace_route", route=route)
                for route in plan.default_routes
                if self._applied_defaults.get(route.family) != route
            ]
            failed: list[tuple[Change, str]] = []
            if urgent:
                for change in urgent:
                    log.info("netlink: %s", change.describe())
                failed += await self._netlink.call(nl_apply, urgent, indexes, protocol)
            await self._apply_steering()
        # Every family here: objects of a family a reload dropped must go too.
        rules = await self._netlink.call(nl_rules)
        routes = await self._netlink.call(nl_default_routes, self.managed_tables)
        changes = diff_network(config, plan, rules, routes, indexes, self.managed_tables)
        if self.dry_run:
            if changes != self._dry_run_changes:  # say it once, not on every sync
                for change in changes:
                    log.info("dry-run: would %s", change.describe())
                self._dry_run_changes = changes
        else:
            for change in changes:
                log.info("netlink: %s", change.describe())
            if changes:
                failed += await self._netlink.call(nl_apply, changes, indexes, protocol)
            # Once per reconcile, failures or not: a retry that finds nothing to do ends the back-off.
            self._report_apply_failures(failed)
            self._applied_defaults = {route.family: route for route in plan.default_routes}
            # Last, and in the background: the flows released re-establish over the routes
            # installed above, and a big table must not hold up the next reconcile.
            if self._release_pending and (self._release_task is None or self._release_task.done()):
                self._release_task = asyncio.ensure_future(self._release_flows())
        if self._status_forced:
            self._status_forced = False
            self._status_dirty = False
            self._write_status()
            self.notifier.send("STATUS=" + self.summary())

    def _decide(self, family: int, decision: Decision) -> None:
        """Take a family's selection decision, logging it once when it says something new."""
        previous, current = self.decisions[family], self.selected[family]
        label = FAMILY_NAME[family]
        if decision.selected != current:
            log.warning(
                "selected=%s family=%s (was %s): %s",
                decision.selected,
                label,
                current or "none",
                decision.reason,
            )
            self._status_forced = True
        elif decision.stranded and not previous.stranded:
            if decision.selected is None:
                log.info("family=%s waiting for the first uplink to come up", label)
            else:
                log.error(
                    "NO UPLINK IS UP family=%s: %s; new traffic may fail until one recovers",
                    label,
                    decision.reason,
                )
            self._status_forced = True
        elif decision.wake_at is not None and decision.wake_at != previous.wake_at:
            log.info("selection family=%s: %s", label, decision.reason)  # a better uplink is proving itself
            self._status_forced = True
        self.selected[family] = decision.selected
        self.decisions[family] = decision

    def _decide_policy(self, policy: PolicyConfig, family: int, decision: Decision) -> None:
        """Take a policy's decision for one family, logging it when its uplink changes."""
        decisions = self.policy_decisions.setdefault(policy.name, {})
        previous = decisions.get(family)
        if previous is None or previous.selected != decision.selected:
            level = logging.WARNING if previous is not None else logging.INFO
            log.log(
                level,
                "policy=%s family=%s uplink=%s (was %s): %s",
                policy.name,
                FAMILY_NAME[family],
                decision.selected or f"none, {policy.fallback}",
                "none" if previous is None else previous.selected or f"none, {policy.fallback}",
                decision.reason,
            )
            self._status_forced = True
        decisions[family] = decision

    def _steer(self, steering: Steering) -> None:
        """Take the new steering; log what changed in each balance group, and note released uplinks."""
        before = self.steering
        for family in self.config.families:
            old, new = (dict(s.balance.get(family, ())) for s in (before, steering))
            old, new = (members if len(members) > 1 else {} for members in (old, new))
            if old == new:
                continue
            changes = [f"{n} joined" for n in new if n not in old]
            changes += [
                f"{n} left ({self.healths[n].state.value if n in self.healths else 'removed'})"
                for n in old
                if n not in new
            ]
            shares = ", ".join(f"{n} (weight {w})" for n, w in new.items())
            log.warning(
                "balance family=%s: %s; %s",
                FAMILY_NAME[family],
                f"new connections shared by {shares}" if new else "ended, the selected uplink carries all",
                ", ".join(changes),
            )
            self._status_forced = True
        self.steering = steering
        carrying = {(n, f) for f, n in self.selected.items() if n is not None}
        carrying |= {(n, f) for f, members in steering.balance.items() for n, _ in members}
        carrying |= {
            (n, f) for chosen in steering.policies.values() for f, n in chosen.items() if n is not None
        }
        for name, family in self._carrying - carrying:
            health = self.healths.get(name)
            runtime = self.runtime.get(name)
            if (
                runtime is not None
                and health is not None
                and health.state is not State.DOWN
                and "on_failback" in runtime.uplink.release_flows
            ):
                _, families = self._release_pending.get(name, ("", frozenset()))
                self._release_pending[name] = ("it no longer carries new traffic", families | {family})
        self._carrying = carrying

    async def _apply_steering(self) -> None:
        """Carry a steering change into the live table, in one transaction."""
        async with self._nft_lock:
            if (
                self.dry_run
                or not self._nft_installed
                or self._nft_config is not self.config  # _nft_loop re-installs it whole
                or self._nft_steering == self.steering
            ):
                return
            before, after = self._nft_steering or Steering(), self.steering
            code, error = await nft_run("-f", "-", script=render_steering_update(self.config, before, after))
            if code == 0:
                self._nft_steering = after
                return
        log.warning("nft: cannot update the steering of %s: %s; re-installing the table", NFT_TABLE, error)
        self._nft_installed = False
        self._nft_wanted.set()

    async def _in_conntrack_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._conntrack_thread, fn, *args)

    async def _release_flows(self) -> None:
        """release_flows: delete the conntrack entries placed on these uplinks (never a flush)."""
        local = frozenset(
            address
            for interface in self.interfaces.values()
            for address in (interface.address, interface.address6)
            if address is not None
        )
        for name, (why, families) in list(self._release_pending.items()):
            runtime = self.runtime.get(name)
            if runtime is None or not runtime.uplink.release_flows:  # removed, or no longer asked for
                del self._release_pending[name]
                continue
            # A family it still carries new traffic in (nothing better is up) keeps its flows: they
            # would come straight back. It is released once it carries that family no more.
            now = frozenset(f for f in families if (name, f) not in self._carrying)
            if not now:
                continue
            if now == families:
                del self._release_pending[name]
            else:
                self._release_pending[name] = (why, families - now)
            mark, mask = runtime.uplink.mark, self.config.agent.mark_mask
            try:
                released = await self._in_conntrack_thread(conntrack_release, mark, mask, local, now)
            except Exception as err:  # no nf_conntrack_netlink, no permission
                log.warning("uplink=%s cannot release its connections: %s", name, err)
                continue
            log.warning(
                "uplink=%s released %d tracked connection(s) marked %#x/%#x (%s; %s); they re-establish "
                "over the new path; kept %d that came in from the internet; no other entry was touched",
                name,
                released.deleted,
                mark,
                mask,
                why,
                "/".join(FAMILY_TITLE[f] for f in sorted(now)),
                released.inbound_kept,
            )
            if released.failed:
                log.warning(
                    "uplink=%s could not release %d connection(s): %s", name, released.failed, released.error
                )

    def _adoptable(self, routes: Sequence[RouteEntry]) -> dict[int, str]:
        """Per family, the uplink the selection table's default (left by a previous run) points at."""
        adopted: dict[int, str] = {}
        for route in routes:
            if (
                route.table != self.config.agent.default_table
                or route.protocol != self.config.agent.route_protocol
            ):
                continue
            for uplink in self.config.uplinks:
                interface = self.interfaces.get(uplink.interface)
                if interface is not None and interface.index == route.oif and route.family in uplink.families:
                    adopted[route.family] = uplink.name
        return adopted

    @property
    def primary_family(self) -> int:
        """The family `selected` in status and STATUS= speaks of: IPv4 when configured."""
        return self.config.families[0] if self.config.families else 4

    # -- reload -------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP. A task boundary too: whatever fails, the running config stays in service."""
        try:
            await self._reload()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reload failed; the running config stays in service")
            self.notifier.send("READY=1")

    async def _reload(self) -> None:
        self.notifier.send(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(self.config.source)
        except ConfigError as err:
            log.error("reload rejected, keeping the running config: %s", err)
            self.notifier.send("READY=1")
            return
        problem = self._reload_problem(self.config, new) or "; ".join(await self._collisions(new))
        if not problem and not self.dry_run:
            # The new table must load before anything switches to it (`nft -c` changes nothing).
            script = render_nft(new, carry_steering(self.steering, new))
            code, error = await nft_run("-c", "-f", "-", script=script)
            if code not in (0, 127):  # 127: no nft at all, as before the reload
                problem = f"nft rejects its table: {error}"
        if problem:
            log.error("reload rejected, keeping the running config: %s", problem)
            self.notifier.send("READY=1")
            return
        async with self._sync_lock:  # no sync may run on half-swapped state
            self._swap_config(new)
        await self._sync()
        self.notifier.send("READY=1\nSTATUS=" + self.summary())

    @staticmethod
    def _reload_problem(old: Config, new: Config) -> str | None:
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

    async def _collisions(self, config: Config) -> list[str]:
        rules = await self._netlink.call(nl_rules, config.families)
        routes = await self._netlink.call(nl_default_routes, config.tables, False, config.families)
        return find_collisions(config, rules, routes)

    def _swap_config(self, new: Config) -> None:
        for running in self.runtime.values():
            if running.prober_task is not None:
                running.prober_task.cancel()
        now = loop_now()
        healths: dict[str, Health] = {}
        runtimes: dict[str, UplinkRuntime] = {}
        for uplink in new.uplinks:
            previous = self.healths.get(uplink.name)
            before = self.runtime.get(uplink.name)
            same_path = before is not None and (
                before.uplink.interface,
                before.uplink.gateway,
                before.uplink.gateway6,
                before.uplink.families,
            ) == (uplink.interface, uplink.gateway, uplink.gateway6, uplink.families)
            # State carries across a reload (as keepalived does) unless the uplink now means another path.
            if previous is not None and same_path:
                healths[uplink.name] = remap_health(previous, uplink.check)
            else:
                healths[uplink.name] = initial_health(uplink, now)
            runtimes[uplink.name] = UplinkRuntime(uplink, before.interface if before and same_path else None)
        self.config = new
        self.healths = healths
        self.runtime = runtimes
        # The table is re-installed whole for the new config (per-host placements start
        # afresh). Until the next sync decides, it keeps the steering that still applies.
        self.steering = carry_steering(self.steering, new)
        self.policy_decisions = {
            name: {f: d for f, d in decisions.items() if f in self.steering.policies.get(name, {})}
            for name, decisions in self.policy_decisions.items()
            if name in self.steering.policies
        }
        self.managed_tables |= new.tables
        self._sync_links = True
        log.info("reloaded %s: %d uplinks", new.source, len(new.uplinks))
        self._log_effective_config()
        self._start_probers()
        self._status_forced = True
        self._nft_wanted.set()  # the table follows the config (marks, interfaces)

    # -- helpers ------------------------------------------------------------

    def _start_probers(self) -> None:
        for name, runtime in self.runtime.items():
            runtime.prober_task = asyncio.ensure_future(self._run_prober(name))

    async def _run_prober(self, name: str) -> None:
        """A task boundary: a crash is logged with its traceback and the prober restarts."""
        index = list(self.runtime).index(name)
        while True:
            runtime = self.runtime[name]
            prober = UplinkProber(
                runtime.uplink,
                # ICMP ids tell our echoes apart from other pingers' and each uplink's.
                ident=(os.getpid() * 31 + index) & 0xFFFF,
                source=self._probe_source(name),
                deliver=self._deliver_round,
            )
            try:
                await prober.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("uplink=%s prober crashed; restarting it in 1s", name)
                await asyncio.sleep(1.0)

    def _probe_source(self, name: str) -> Callable[[], ProbeSource | None]:
        """Where this uplink's probes leave from now, or None while it cannot carry traffic."""

        def source() -> ProbeSource | None:
            runtime = self.runtime.get(name)
            health = self.healths.get(name)
            if runtime is None or health is None or runtime.interface is None or not health.link_usable:
                return None
            interface = runtime.interface
            uplink = runtime.uplink
            # A family the uplink cannot route now (no address, no gateway) is not probed.
            return ProbeSource(
                interface.index,
                interface.address if routable(uplink, interface, 4) else None,
                interface.address6 if routable(uplink, interface, 6) else None,
                uplink_gateway(uplink, interface, 4),
                uplink_gateway(uplink, interface, 6),
            )

        return source

    async def _install_nft(self, why: str) -> None:
        """Write the whole table in one transaction; an error is logged, routing works on."""
        async with self._nft_lock:
            config, steering = self.config, self.steering
            script = render_nft(config, steering)
            if self.dry_run:
                if config is not self._nft_config:
                    log.info("dry-run: would install nft table %s (stickiness and steering)", NFT_TABLE)
                self._nft_config = config
                return
            code, error = await nft_run("-f", "-", script=script)
            if code != 0:
                if self._nft_installed or config is not self._nft_config or why == "start":
                    log.error(
                        "nft: cannot install table %s (%s): %s; connections will not stick to their uplink",
                        NFT_TABLE,
                        why,
                        error,
                    )
                self._nft_installed = False
            else:
                log.info("nft: installed table %s (%s)", NFT_TABLE, why)
                self._nft_installed = True
                self._nft_steering = steering
            self._nft_config = config
        # The steering may have moved while nft ran: carry it over now.
        await self._apply_steering()

    async def _nft_loop(self) -> None:
        """Keep our table installed: another firewall's full reload (`nft flush ruleset`) removes it."""
        try:
            self._nft_events = NftEvents(self._nft_wanted.set)
        except OSError as err:
            log.warning("nft: no change events (%s); checking every %.0fs", err, RESYNC_PERIOD_S)
        while True:
            try:
                await asyncio.wait_for(self._nft_wanted.wait(), RESYNC_PERIOD_S)
            except asyncio.TimeoutError:
                pass
            self._nft_wanted.clear()
            if self.dry_run:
                continue
            if self.config is not self._nft_config:
                await self._install_nft("config changed")
                continue
            code, _ = await nft_run("list", "table", *NFT_TABLE.split())
            if code != 0 or not self._nft_installed:
                why = "it was removed, e.g. by another firewall's reload" if self._nft_installed else "retry"
                if self._nft_installed:
                    log.warning("nft: table %s is gone; re-installing", NFT_TABLE)
                await self._install_nft(why)

    async def _status_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_count = loop.time()
        while True:
            await asyncio.sleep(STATUS_METRICS_PERIOD_S)
            if loop.time() >= next_count:
                began = loop.time()
                await self._count_connections()
                # A huge table makes the count dearer: keep it under 1 % of a core.
                next_count = loop.time() + max(CONNTRACK_PERIOD_S, 100 * (loop.time() - began))
            if self._status_dirty:
                self._status_dirty = False
                self._write_status()

    async def _count_connections(self) -> None:
        marks = {u.name: u.mark for u in self.config.uplinks}
        try:
            counts = await self._in_conntrack_thread(
                conntrack_counts, marks, self.config.agent.mark_mask, self._not_syncing
            )
        except Exception as err:  # no nf_conntrack_netlink: status shows no counts
            if self._connections is not None or not self._conntrack_warned:
                log.info("conntrack counts unavailable: %s", err)
                self._conntrack_warned = True
            self._connections = None
            return
        if counts != self._connections:
            self._connections = counts
            self._status_dirty = True

    async def _watchdog_loop(self, watchdog_s: float) -> None:
        """WATCHDOG=1 only while both the event loop and the netlink worker answer."""
        while True:
            try:
                await asyncio.wait_for(self._netlink.call(lambda ipr: None), watchdog_s / 4)
            except asyncio.TimeoutError:
                log.error(
                    "the netlink worker has not answered for %.1fs; withholding the watchdog", watchdog_s / 4
                )
            else:
                self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(watchdog_s / 2)

    def summary(self) -> str:
        states = ", ".join(f"{n} {h.state.value}" for n, h in self.healths.items())
        families = self.config.families
        selected = " ".join(
            f"selected{'' if f == self.primary_family else '6'}={self.selected[f] or 'none'}"
            for f in families
        )
        stranded = any(self.decisions[f].stranded for f in families)
        return f"{selected}; {states}" + ("; NO UPLINK UP" if stranded else "")

    def status_document(self, running: bool = True) -> dict[str, Any]:
        mono_now = time.monotonic()
        wall_now = time.time()
        uplinks: dict[str, Any] = {}
        for uplink in self.config.uplinks:
            health = self.healths[uplink.name]
            interface = self.runtime[uplink.name].interface
            quality = health.quality
            uplinks[uplink.name] = {
                "state": health.state.value,
                "since": round(wall_now - (mono_now - health.since), 3),
                "since_monotonic": round(health.since, 6),
                "reason": health.reason,
                "selected": uplink.name in self.selected.values(),
                "families": [FAMILY_NAME[f] for f in uplink.families],
                "selected_for": [FAMILY_NAME[f] for f in FAMILIES if self.selected[f] == uplink.name],
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
                "balanced_for": [
                    FAMILY_NAME[f] for f in self.config.families if uplink.name in self._balancing(f)
                ],
                "table": uplink.table,
                "mark": uplink.mark,
                "rtt_ms": None if health.rtt_ms is None else round(health.rtt_ms, 3),
                # over the quality window (the last `window` rounds)
                "loss_pct": None if quality is None else round(quality.loss_pct, 1),
                "median_rtt_ms": None
                if quality is None or quality.rtt_ms is None
                else round(quality.rtt_ms, 3),
                "jitter_ms": None
                if quality is None or quality.jitter_ms is None
                else round(quality.jitter_ms, 3),
                "window_rounds": 0 if quality is None else quality.rounds,
                "good_rounds": health.good_rounds,
                "bad_rounds": health.bad_rounds,
                # came back from a failure: owes the hysteresis before traffic returns
                "recovered": health.recovered,
                "has_failed": health.has_failed,
                # tracked connections that stick to this uplink (its connection mark)
                "connections": None if self._connections is None else self._connections.get(uplink.name),
            }
        return {
            "version": 1,
            "pid": os.getpid(),
            "running": running,
            "dry_run": self.dry_run,
            "updated": round(wall_now, 3),
            "updated_monotonic": round(mono_now, 6),
            # `selected`/`reason`/`stranded` speak of IPv4 (IPv6 when only IPv6 is configured);
            # `families` has each configured family's own.
            "selected": self.selected[self.primary_family],
            "reason": self.decisions[self.primary_family].reason,
            "stranded": self.decisions[self.primary_family].stranded,
            "families": {
                FAMILY_NAME[f]: {
                    "selected": self.selected[f],
                    "reason": self.decisions[f].reason,
                    "stranded": self.decisions[f].stranded,
                    # the uplinks sharing new connections, with their weights (empty: no balancing)
                    "balance": self._balancing(f),
                }
                for f in self.config.families
            },
            "sticky": self.config.agent.sticky,
            # per policy and family: the uplink its traffic takes (null: its fallback)
            "policies": {
                policy.name: {
                    "fallback": policy.fallback,
                    **{
                        FAMILY_NAME[f]: {"uplink": d.selected, "reason": d.reason}
                        for f, d in self.policy_decisions.get(policy.name, {}).items()
                    },
                }
                for policy in self.config.policies
            },
            "uplinks": uplinks,
        }

    def _balancing(self, family: int) -> dict[str, int]:
        """The uplinks sharing this family's new connections, by weight (empty: none shared)."""
        members = self.steering.balance.get(family, ())
        return dict(members) if len(members) > 1 else {}

    def _write_status(self, running: bool = True) -> None:
        path = Path(self.config.agent.state_dir) / "status.json"
        try:
            write_json_atomically(path, self.status_document(running))
        except OSError as err:
            log.warning("cannot write %s: %s", path, err)

    def _read_previous_status(self) -> dict[str, str]:
        """Each uplink's state in the last status.json; "proving" for one still inside its hysteresis."""
        path = Path(self.config.agent.state_dir) / "status.json"
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            states: dict[str, str] = {}
            for name, u in document.get("uplinks", {}).items():
                state = str(u.get("state"))
                proving_until = float(u.get("since", 0)) + self.config.agent.hysteresis_s
                if state in ("down", "degraded") and u.get("has_failed", True):
                    state = "failed"  # not merely "not yet confirmed"
                elif state == "up" and u.get("recovered") and time.time() < proving_until:
                    state = "proving"
                states[name] = state
            return states
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def _log_effective_config(self) -> None:
        agent = self.config.agent
        log.info(
            "config %s: hysteresis=%s default_table=%d rules=%d-%d protocol=%d mark_mask=%#x%s",
            self.config.source,
            format_duration(agent.hysteresis_s),
            agent.default_table,
            agent.rule_priority,
            agent.rule_priority + RULE_BLOCK - 1,
            agent.route_protocol,
            agent.mark_mask,
            " (dry run: no change will be made)" if self.dry_run else "",
        )
        for uplink in self.config.uplinks:
            check = uplink.check
            log.info(
                "uplink=%s interface=%s gateway=%s priority=%d table=%d mark=%#x check=%s%s targets=%s "
                "interval=%s timeout=%s fall=%d rise=%d reliability=%d",
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
            )


def _probe_detail(probe: ProbeResult) -> str:
    if probe.ok and probe.rtt_ms is not None:
        return f"{probe.rtt_ms:.1f}ms"
    return probe.reason


def _describe_renumbering(uplink: UplinkConfig, before: Interface, after: Interface) -> str:
    """'address 203.0.113.6 -> 203.0.113.10, gateway ...' for what changed, or ''."""
    fields = (
        ("ifindex", before.index, after.index),
        ("address", before.address, after.address),
        ("gateway", uplink_gateway(uplink, before, 4), uplink_gateway(uplink, after, 4)),
        ("address6", before.address6, after.address6),
        ("gateway6", uplink_gateway(uplink, before, 6), uplink_gateway(uplink, after, 6)),
    )
    return ", ".join(f"{name} {old} -> {new}" for name, old, new in fields if old != new and old and new)


def loop_now() -> float:
    return asyncio.get_running_loop().time()


# Command line ################################################################


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
    lines += ["", f"nft table {NFT_TABLE} (one transaction; shown with every uplink up):"]
    lines += ["  " + line for line in render_nft(config, steering_when_all_up(config)).splitlines()]
    return "\n".join(lines)


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


def render_status(document: Mapping[str, Any]) -> str:
    now = time.time()
    head = f"selected: {document.get('selected') or 'none'}  ({document.get('reason', '')})"
    if not document.get("running", True):
        head += "  [agent not running; last known state]"
    if document.get("stranded"):
        head += "  [NO UPLINK UP]"
    lines = [
        head,
        f"{'uplink':<12} {'state':<8} {'for':>8} {'rtt':>9} {'loss':>6} {'conns':>6}  interface  reason",
    ]
    for name, u in document.get("uplinks", {}).items():
        age = now - float(u.get("since", now))
        rtt = "-" if u.get("rtt_ms") is None else f"{u['rtt_ms']:.1f}ms"
        loss = "-" if u.get("loss_pct") is None else f"{u['loss_pct']:.0f}%"
        mark = "*" if u.get("selected") else " "
        conns = "-" if u.get("connections") is None else str(u["connections"])
        lines.append(
            f"{mark}{name:<11} {u.get('state', '?'):<8} {_age(age):>8} {rtt:>9} {loss:>6} {conns:>6}  "
            f"{u.get('interface', ''):<9}  {u.get('reason', '')}"
        )
    for family, about in document.get("families", {}).items():
        if about.get("balance"):
            shares = ", ".join(f"{n} x{w}" for n, w in about["balance"].items())
            lines.append(f"balance {family}: {shares} (sticky per {document.get('sticky', 'connection')})")
    for name, policy in document.get("policies", {}).items():
        for family, about in policy.items():
            if isinstance(about, dict):
                where = about.get("uplink") or f"none: {policy.get('fallback')}"
                lines.append(f"policy {name} {family}: {where}  ({about.get('reason', '')})")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiwan-agent", description="Multi-uplink failover for Linux routers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("-c", "--config", required=True, help="TOML config file")
    run.add_argument("--dry-run", action="store_true", help="probe and decide, change nothing")
    run.add_argument("--cleanup", action="store_true", help="on exit remove the agent's own routes and rules")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("-v", "--verbose", action="store_true", help="log every probe round")
    check = sub.add_parser("check", help="validate the config and print the resolved plan")
    check.add_argument("-c", "--config", required=True)
    status = sub.add_parser("status", help="show the running agent's status")
    status.add_argument("-c", "--config", help="config file (for its state_dir)")
    status.add_argument("--state-dir", help="default: the config's, else /run/multiwan-agent")
    status.add_argument("--json", action="store_true", help="print status.json as it is")
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


async def run_agent(agent: Agent) -> None:
    """The daemon: signals set events (hypercorn style), the Agent does the work."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    await agent.run(stop, reload)


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
        config = load_config(args.config)
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
    agent = Agent(config, dry_run=args.dry_run, cleanup=args.cleanup, verbose=args.verbose)
    try:
        asyncio.run(run_agent(agent))
    except StartupRefused as err:
        log.error("refusing to start, nothing was changed: %s", err)
        return EXIT_REFUSED
    except PermissionError as err:
        log.error("refusing to start: %s (needs CAP_NET_ADMIN and CAP_NET_RAW)", err)
        return EXIT_REFUSED
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(describe_plan(config))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state_dir = args.state_dir
    if state_dir is None and args.config:
        try:
            state_dir = load_config(args.config).agent.state_dir
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_CONFIG
    path = Path(state_dir or AgentConfig().state_dir) / "status.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        print(f"error: cannot read {path}: {err.strerror} (is the agent running?)", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {path} is not valid JSON: {err}", file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2, sort_keys=True) if args.json else render_status(document))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "check": cmd_check, "status": cmd_status}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
