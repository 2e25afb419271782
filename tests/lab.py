"""A network-namespace lab for multiwan-agent tests: a router with two ISPs.

Topology (every name below is a role; real namespace names get a unique
per-run prefix ``mwt<pid>-<n>-``)::

    lan eth0 198.51.100.10/24
        |
    router lan0 198.51.100.1/24
    router wan0 203.0.113.2/30 ---- isp1 cpe 203.0.113.1/30
                                    isp1 up  198.18.0.1/30 ---- inet isp1 198.18.0.2/30
    router wan1 203.0.113.6/30 ---- isp2 cpe 203.0.113.5/30
                                    isp2 up  198.18.0.5/30 ---- inet isp2 198.18.0.6/30

    inet lo: 198.18.1.1, 198.18.1.2 (probe targets), 198.18.1.10 (echo server :8080)

198.18.1.10 and 2001:db8:ffff::10 also run lab_tools/services.py: HTTP :80,
HTTPS :443 (self-signed for check.example) and DNS :53 over UDP, steered
with set_http_status() and set_dns_mode() (see "Services in inet" below).

IPv6 runs alongside (dual stack; every address is added with ``nodad`` and
DAD is switched off, so nothing waits for duplicate address detection)::

    lan eth0 2001:db8:100::10/64
        |
    router lan0 2001:db8:100::1/64
    router wan0 2001:db8:1::2/64 ---- isp1 cpe 2001:db8:1::1/64 + fe80::1/64
                                      isp1 up  2001:db8:f1::1/64 ---- inet isp1 2001:db8:f1::2/64
    router wan1 2001:db8:2::2/64 ---- isp2 cpe 2001:db8:2::1/64 + fe80::1/64
                                      isp2 up  2001:db8:f2::1/64 ---- inet isp2 2001:db8:f2::2/64

    inet lo: 2001:db8:ffff::1, 2001:db8:ffff::2 (probe targets),
             2001:db8:ffff::10 (the same echo server, :8080)

The router's IPv6 gateways are the link-local fe80::1 of each ISP, as an RA
client would learn them (no RAs are sent: with ``dhcp_defaults`` the lab adds
the routes an RA client leaves, ``proto ra`` metrics 1024 and 1025). The
router masquerades IPv4 and IPv6 (NAT66) out of both uplinks.

The root network namespace is never touched: every veth pair is created from
inside a lab namespace straight into its peer namespace, and every command
runs with ``ip -n`` or ``ip netns exec``. ``close()`` kills whatever still
runs in the lab namespaces and deletes them, also after a failed test.

Faults come from nftables in the ISP namespaces because this kernel has no
netem and no dummy links (see /work/shared/LAB-NOTES.md). Standard library
only, so it runs in both test venvs.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, NamedTuple

# Constants ###################################################################

#: Roles, in creation order; real namespace names are prefix + role.
ROLES: Final = ("router", "isp1", "isp2", "inet", "lan")
#: Probe targets on inet's loopback.
PROBE_TARGETS: Final = ("198.18.1.1", "198.18.1.2")
#: The echo server's address and port (TCP and UDP) on inet.
SERVER_IP: Final = "198.18.1.10"
SERVER_PORT: Final = 8080
#: The LAN side.
LAN_GATEWAY: Final = "198.51.100.1"
LAN_HOST: Final = "198.51.100.10"
#: IPv6 counterparts of the above (the server listens on both addresses).
PROBE_TARGETS6: Final = ("2001:db8:ffff::1", "2001:db8:ffff::2")
SERVER_IP6: Final = "2001:db8:ffff::10"
LAN_GATEWAY6: Final = "2001:db8:100::1"
LAN_HOST6: Final = "2001:db8:100::10"
#: A second LAN (add_second_lan), known to the router only through main's connected route.
LAN2_GATEWAY: Final = "198.18.200.1"
LAN2_HOST: Final = "198.18.200.10"
LAN2_NET: Final = "198.18.200.0/24"
#: Address families as the API takes them (family=4 / family=6).
FAMILIES: Final = (4, 6)

LAB_TOOLS: Final = Path(__file__).resolve().parent / "lab_tools"
ECHO_SERVER: Final = LAB_TOOLS / "echo_server.py"
CONNECTOR: Final = LAB_TOOLS / "connector.py"

#: HTTP, HTTPS and DNS (UDP) of services.py, on SERVER_IP and SERVER_IP6 in
#: inet, steered through files in Lab's control directory (see set_http_status
#: and set_dns_mode).
SERVICES: Final = LAB_TOOLS / "services.py"
HTTP_PORT: Final = 80
HTTPS_PORT: Final = 443
DNS_PORT: Final = 53
#: What services.py answers DNS queries with (set_dns_mode).
DNS_MODES: Final = ("ok", "servfail", "nxdomain", "silent")
#: The name the HTTPS certificate is for (CN and SAN).
HTTPS_CERT_NAME: Final = "check.example"
#: Where every 3xx answer of services.py points.
PORTAL_URL: Final = "http://portal.example/"

#: A throw-away route RouteMonitor adds to learn that `ip monitor` has
#: subscribed (it prints nothing when ready). Table id chosen to be far from
#: anything an agent would own; its events are filtered out of the record.
MONITOR_MARKER_DST: Final = "198.18.255.254"
#: Its twin for a monitor of IPv6 events only.
MONITOR_MARKER_DST6: Final = "2001:db8:ffff:ffff::fe"
MONITOR_MARKER_TABLE: Final = "3999999"

#: Upper bounds for polling loops; everything waits on a condition, never a
#: fixed sleep.
POLL_INTERVAL_S: Final = 0.01
READY_TIMEOUT_S: Final = 10.0
TERM_GRACE_S: Final = 2.0

#: Every role's veth ends, as the lab creates them.
VETHS: Final[dict[str, tuple[str, ...]]] = {
    "router": ("wan0", "wan1", "lan0"),
    "isp1": ("cpe", "up"),
    "isp2": ("cpe", "up"),
    "inet": ("isp1", "isp2"),
    "lan": ("eth0",),
}

_lab_counter = itertools.count()


@dataclass(frozen=True, slots=True)
class IspSpec:
    """One ISP as the lab wires it: customer /30 towards the router, transit /30 to inet."""

    role: str
    router_dev: str  #: the router's interface towards this ISP
    router_ip: str  #: the router's (customer) address
    gateway: str  #: the ISP's address on the customer link
    customer_net: str  #: what BCP38 lets in from the customer
    isp_transit_ip: str  #: the ISP's address on its link to inet (dev `up`)
    inet_transit_ip: str  #: inet's address on that link (dev named like the role)
    dhcp_metric: int  #: metric of the default route a DHCP client would leave
    router_ip6: str  #: the router's global IPv6 address on the customer link (/64)
    cpe_ip6: str  #: the ISP's global IPv6 address on the customer link
    customer_net6: str  #: the customer /64 (on-link, and what IPv6 BCP38 lets in)
    isp_transit_ip6: str  #: the ISP's IPv6 address on its link to inet
    inet_transit_ip6: str  #: inet's IPv6 address on that link
    ra_metric: int  #: metric of the IPv6 default route an RA client would leave
    gateway6: str = "fe80::1"  #: the ISP's link-local address: the router's IPv6 gateway

    def router_address(self, family: int = 4) -> str:
        """The router's address on this uplink in the given family."""
        return self.router_ip if _check_family(family) == 4 else self.router_ip6

    def gateway_address(self, family: int = 4) -> str:
        """The router's gateway via this ISP: the IPv4 address, or the link-local fe80::1."""
        return self.gateway if _check_family(family) == 4 else self.gateway6


ISPS: Final[dict[str, IspSpec]] = {
    "isp1": IspSpec(
        role="isp1",
        router_dev="wan0",
        router_ip="203.0.113.2",
        gateway="203.0.113.1",
        customer_net="203.0.113.0/30",
        isp_transit_ip="198.18.0.1",
        inet_transit_ip="198.18.0.2",
        dhcp_metric=100,
        router_ip6="2001:db8:1::2",
        cpe_ip6="2001:db8:1::1",
        customer_net6="2001:db8:1::/64",
        isp_transit_ip6="2001:db8:f1::1",
        inet_transit_ip6="2001:db8:f1::2",
        ra_metric=1024,
    ),
    "isp2": IspSpec(
        role="isp2",
        router_dev="wan1",
        router_ip="203.0.113.6",
        gateway="203.0.113.5",
        customer_net="203.0.113.4/30",
        isp_transit_ip="198.18.0.5",
        inet_transit_ip="198.18.0.6",
        dhcp_metric=200,
        router_ip6="2001:db8:2::2",
        cpe_ip6="2001:db8:2::1",
        customer_net6="2001:db8:2::/64",
        isp_transit_ip6="2001:db8:f2::1",
        inet_transit_ip6="2001:db8:f2::2",
        ra_metric=1025,
    ),
}

# Errors ######################################################################


class LabError(RuntimeError):
    """The lab could not be built, driven or torn down."""


class LabCommandError(subprocess.CalledProcessError):
    """A lab command failed; unlike CalledProcessError, str() shows its stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        return f"{super().__str__()}\nstderr: {err}" if err else super().__str__()


# Helpers #####################################################################


def _check_family(family: int) -> int:
    if family not in FAMILIES:
        raise LabError(f"family must be 4 or 6, got {family!r}")
    return family


def server_ip(family: int = 4) -> str:
    """The echo server's address in the given family."""
    return SERVER_IP if _check_family(family) == 4 else SERVER_IP6


def probe_targets(family: int = 4) -> tuple[str, str]:
    """The two probe targets in the given family."""
    return PROBE_TARGETS if _check_family(family) == 4 else PROBE_TARGETS6


def lab_namespaces(prefix: str = "mwt") -> list[str]:
    """Names of existing network namespaces starting with prefix."""
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    # Lines look like "name" or "name (id: 3)".
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return [name for name in names if name.startswith(prefix)]


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 10.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, list(argv), proc.stdout, proc.stderr)
    return proc


def _read_line(stream: IO[str], deadline: float) -> str | None:
    """One line from a pipe, or None at EOF or when the monotonic deadline passes.

    Only for a process's first output line: select() cannot see data that
    the text wrapper has already buffered.
    """
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if sel.select(timeout=remaining):
                line = stream.readline()
                return line or None
    return None


def _stop_process(proc: subprocess.Popen[Any], grace_s: float = TERM_GRACE_S) -> None:
    """SIGTERM, wait up to grace_s, then SIGKILL; always reaps. Pipes stay open."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


def _close_pipes(proc: subprocess.Popen[Any]) -> None:
    # Only after any reader thread has seen EOF and been joined: closing a
    # pipe under a thread blocked in readline() makes that thread fail.
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# Route events ################################################################


#: Route types `ip` may print before the destination.
_ROUTE_TYPES: Final = (
    "unicast", "local", "broadcast", "multicast", "anycast", "blackhole", "unreachable", "prohibit",
    "throw", "nat",
)  # fmt: skip


class RouteEvent(NamedTuple):
    """One line of `ip monitor route`, stamped with time.monotonic() on arrival."""

    t: float
    line: str

    @property
    def deleted(self) -> bool:
        return self.line.startswith("Deleted ")

    @property
    def route(self) -> str:
        """The route text without the "Deleted " prefix."""
        return self.line.removeprefix("Deleted ")

    @property
    def is_default(self) -> bool:
        return self.route.split(maxsplit=1)[:1] == ["default"]

    @property
    def table(self) -> str:
        """Table name or id as `ip` prints it; `ip` omits "table main"."""
        words = self.route.split()
        if "table" in words:
            i = words.index("table")
            if i + 1 < len(words):
                return words[i + 1]
        return "main"

    @property
    def family(self) -> int:
        """6 for an IPv6 route, else 4.

        `ip monitor route` does not print the family. An IPv6 route shows a
        colon in its destination or gateway, and the kernel always reports
        an IPv6 route's preference, which `ip` prints as "pref ..." (never
        for IPv4): that tells e.g. "default dev wan0 ... pref medium" apart.
        """
        words = self.route.split()
        if "pref" in words:
            return 6
        for i, word in enumerate(words):
            if ":" in word and (i == 0 or words[i - 1] in ("via", *_ROUTE_TYPES)):
                return 6
        return 4


class RouteMonitor:
    """Records `ip monitor route` in one namespace until stop().

    Lines are stamped when the reader thread receives them (ip flushes after
    every event), which is within a millisecond or so of the kernel change.
    With `rules`, `ip monitor route rule`: rule events ("5010:\tfrom all oif
    wan0 lookup 201 proto 240", "Deleted 5099: ...") come in the same stream,
    in the kernel's order.
    """

    def __init__(self, lab: Lab, role: str, *, rules: bool = False, family: int | None = None) -> None:
        self._lab = lab
        self._role = role
        self._events: list[RouteEvent] = []
        self._cond = threading.Condition()
        only = [f"-{_check_family(family)}"] if family is not None else []
        self._marker = MONITOR_MARKER_DST6 if family == 6 else MONITOR_MARKER_DST
        self._proc: subprocess.Popen[str] = lab._popen_raw(
            ["ip", *only, "-n", lab.name(role), "monitor", "route", *(["rule"] if rules else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, name=f"route-monitor-{role}", daemon=True)
        self._thread.start()
        self._wait_subscribed()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self._events.append(RouteEvent(time.monotonic(), line.rstrip("\n").rstrip()))
                self._cond.notify_all()

    def _wait_subscribed(self) -> None:
        # `ip monitor` prints nothing once it has subscribed, and an event made
        # before that is simply never seen. So toggle a marker route (add, del,
        # add, ...) until one of its events shows up: from then on nothing can
        # be missed.
        length = 128 if ":" in self._marker else 32
        marker = ["blackhole", f"{self._marker}/{length}", "table", MONITOR_MARKER_TABLE]
        deadline = time.monotonic() + READY_TIMEOUT_S
        present = False
        try:
            with self._cond:
                while not any(self._marker in e.line for e in self._events):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._proc.poll() is not None:
                        raise LabError(f"ip monitor route in {self._role} did not start")
                    self._lab.ip(self._role, "route", "del" if present else "add", *marker)
                    present = not present
                    self._cond.wait(timeout=min(remaining, 0.05))
        finally:
            if present:
                self._lab.ip(self._role, "route", "del", *marker, check=False)

    def events(self) -> list[RouteEvent]:
        """Events so far, without the readiness marker's."""
        with self._cond:
            return [e for e in self._events if self._marker not in e.line]

    def stop(self) -> list[RouteEvent]:
        """Stop recording; returns every (monotonic_t, line) seen."""
        _stop_process(self._proc)
        self._thread.join(timeout=TERM_GRACE_S)
        _close_pipes(self._proc)
        return self.events()

    def deleted_defaults(self, table: str | None = None, family: int | None = None) -> list[RouteEvent]:
        """Events "Deleted default ..." in `table` (any table if None) of `family` (4, 6; any if None)."""
        return [
            e
            for e in self.events()
            if e.deleted
            and e.is_default
            and (table is None or e.table == table)
            and (family is None or e.family == family)
        ]


# Connector ###################################################################


class Attempt(NamedTuple):
    """One connection attempt by connector.py: start time, success, source ip or reason."""

    t: float
    ok: bool
    detail: str


class Connector:
    """A running connector.py in `lan`; collects its attempts in a reader thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self._attempts: list[Attempt] = []
        self._unparsed: list[str] = []
        self._lock = threading.Lock()
        self.started_at: float | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, name="connector", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.strip()
            words = line.split(maxsplit=2)
            with self._lock:
                if line.startswith("# start ") and len(words) == 3:
                    self.started_at = float(words[2])
                    self._started.set()
                elif len(words) == 3 and words[1] in ("ok", "fail"):
                    self._attempts.append(Attempt(float(words[0]), words[1] == "ok", words[2]))
                elif line:
                    self._unparsed.append(line)
        self._started.set()  # EOF: nobody should wait for a start any more

    def wait_started(self, timeout: float = READY_TIMEOUT_S) -> None:
        if not self._started.wait(timeout) or self.started_at is None:
            raise LabError(f"connector did not start: {self.unparsed()}")

    def samples(self) -> list[Attempt]:
        """Attempts so far, in order."""
        with self._lock:
            return list(self._attempts)

    def unparsed(self) -> list[str]:
        """Output lines that were not attempts (errors from the script)."""
        with self._lock:
            return list(self._unparsed)

    def running(self) -> bool:
        return self._proc.poll() is None

    def wait(self, timeout: float) -> list[Attempt]:
        """Wait for the connector to finish by itself (duration or max attempts)."""
        self._proc.wait(timeout=timeout)
        self._thread.join(timeout=TERM_GRACE_S)
        _close_pipes(self._proc)
        return self.samples()

    def stop(self) -> list[Attempt]:
        """SIGTERM (the attempt in flight completes), reap, return all attempts."""
        _stop_process(self._proc)
        self._thread.join(timeout=TERM_GRACE_S)
        _close_pipes(self._proc)
        return self.samples()

    def longest_outage_s(self) -> float:
        """Longest run of failed attempts, in seconds; 0.0 if none failed.

        A run lasts from its first failed attempt's start to the start of the
        next successful attempt (or of the last attempt, if none succeeded
        after it).
        """
        samples = self.samples()
        longest = 0.0
        first_fail: float | None = None
        for attempt in samples:
            if not attempt.ok and first_fail is None:
                first_fail = attempt.t
            elif attempt.ok and first_fail is not None:
                longest = max(longest, attempt.t - first_fail)
                first_fail = None
        if first_fail is not None:
            longest = max(longest, samples[-1].t - first_fail)
        return longest


# The lab #####################################################################


class Lab:
    """Five namespaces wired as router + two ISPs + internet + LAN host.

    Use as a context manager, or build() and close() yourself; close() is
    idempotent and always tears everything down.
    """

    isps: Final = ISPS

    def __init__(self, *, dhcp_defaults: bool = True) -> None:
        self.dhcp_defaults = dhcp_defaults
        self.prefix = f"mwt{os.getpid()}-{next(_lab_counter)}-"
        self.ns: dict[str, str] = {role: self.prefix + role for role in ROLES}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._stoppables: list[RouteMonitor | Connector] = []
        self._built = False
        self._closed = False
        #: services.py's control directory (a temp dir, removed at close) and process.
        self._services_dir: Path | None = None
        self._services_proc: subprocess.Popen[str] | None = None
        #: isp2's customer link as renumber_isp2() last left it: (router ip, gateway, prefix).
        self._isp2_link = (ISPS["isp2"].router_ip, ISPS["isp2"].gateway, 30)

    # Context manager --------------------------------------------------------

    def __enter__(self) -> Lab:
        if not self._built:
            self.build()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Naming and commands ----------------------------------------------------

    def name(self, role: str) -> str:
        """The real namespace name of a role."""
        try:
            return self.ns[role]
        except KeyError:
            raise LabError(f"unknown role {role!r}; roles are {', '.join(ROLES)}") from None

    def run(
        self,
        role: str,
        *argv: str,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`ip netns exec NS argv...` with text output captured."""
        return _run(
            ["ip", "netns", "exec", self.name(role), *argv],
            check=check,
            timeout=timeout,
            input=input,
        )

    def popen(self, role: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv in the namespace; it is stopped (TERM, then KILL) at close()."""
        return self._popen_raw(["ip", "netns", "exec", self.name(role), *argv], **kw)

    def _popen_raw(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        if self._closed:
            raise LabError("lab is closed")
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kw)
        self._procs.append(proc)
        return proc

    def ip(self, role: str, *args: str, check: bool = True) -> str:
        """`ip -n NS args...`; returns stdout."""
        return _run(["ip", "-n", self.name(role), *args], check=check).stdout

    def ip_json(self, role: str, *args: str) -> list[dict[str, Any]]:
        """`ip -j -n NS args...`, parsed."""
        proc = _run(["ip", "-j", "-n", self.name(role), *args], check=False)
        if proc.returncode != 0:
            # Quirk: listing a table that was never created fails with
            # "FIB table does not exist" after printing a lone "[".
            if "FIB table does not exist" in proc.stderr:
                return []
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        text = proc.stdout.strip()
        result: list[dict[str, Any]] = json.loads(text) if text else []
        return result

    def nft(self, role: str, script: str) -> None:
        """Apply an nft script (`nft -f -`) in the namespace, as one transaction."""
        self.run(role, "nft", "-f", "-", input=script)

    def default_routes(
        self, role: str = "router", table: str = "main", family: int = 4
    ) -> list[dict[str, Any]]:
        """`ip -j -4|-6 route show default table X` (empty if the table does not exist)."""
        return self.ip_json(role, f"-{_check_family(family)}", "route", "show", "default", "table", table)

    def uplink_default(self, table: str, family: int = 4) -> list[dict[str, Any]]:
        """The router's real default routes in an uplink table (its `unreachable` fallback left out)."""
        return [r for r in self.default_routes("router", table, family) if r.get("type") != "unreachable"]

    def rules(self, role: str = "router", family: int = 4) -> list[dict[str, Any]]:
        """`ip -j rule show` (IPv4, as before) or `ip -j -6 rule show`."""
        if _check_family(family) == 4:
            return self.ip_json(role, "rule", "show")
        return self.ip_json(role, "-6", "rule", "show")

    def counter(self, isp_role: str, name: str) -> int:
        """Packets an ISP's named counter saw.

        t1, t2, srv (IPv4 forwarded from cpe to the targets / the server),
        spoofed (IPv4 BCP38 drops), to_lan (anything addressed to a LAN that
        the router sent to the ISP: a leaked reply); t1_6, t2_6, srv_6,
        spoofed_6 and to_lan_6 likewise for IPv6.
        """
        self._isp(isp_role)
        out = self.run(isp_role, "nft", "-j", "list", "counter", "inet", "isp", name).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise LabError(f"no counter {name!r} in {isp_role}")

    # Building ---------------------------------------------------------------

    def build(self) -> Lab:
        """Create namespaces, links, addresses, routes, nft and the echo server."""
        if self._built or self._closed:
            raise LabError("build() may be called once, before close()")
        self._built = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        for role in ROLES:
            _run(["ip", "netns", "add", self.name(role)])
            self._created.append(self.name(role))
        # The services bind (FREEBIND) before inet has its addresses, so their
        # start (openssl makes an RSA key) overlaps the rest of the build.
        self._spawn_services()

        # veth pairs are created from inside a lab namespace with the peer put
        # straight into the other one, so nothing ever appears in the root ns.
        links = {
            "router": [
                f"link add wan0 type veth peer name cpe netns {self.name('isp1')}",
                f"link add wan1 type veth peer name cpe netns {self.name('isp2')}",
                f"link add lan0 type veth peer name eth0 netns {self.name('lan')}",
            ],
            # `ip link add up ...` would read "up" as the flag and create an
            # auto-named link; `name`/`dev` make `up` an interface name.
            "isp1": [f"link add name up type veth peer name isp1 netns {self.name('inet')}"],
            "isp2": [f"link add name up type veth peer name isp2 netns {self.name('inet')}"],
        }
        for role, lines in links.items():
            self._ip_batch(role, lines)

        self._sysctls()

        isp1, isp2 = ISPS["isp1"], ISPS["isp2"]
        # Every IPv6 address is `nodad`: usable at once, never "tentative".
        addresses = {
            "router": [
                f"addr add {isp1.router_ip}/30 dev {isp1.router_dev}",
                f"addr add {isp2.router_ip}/30 dev {isp2.router_dev}",
                f"addr add {LAN_GATEWAY}/24 dev lan0",
                f"addr add {isp1.router_ip6}/64 dev {isp1.router_dev} nodad",
                f"addr add {isp2.router_ip6}/64 dev {isp2.router_dev} nodad",
                f"addr add {LAN_GATEWAY6}/64 dev lan0 nodad",
                "link set wan0 up",
                "link set wan1 up",
                "link set lan0 up",
            ],
            "lan": [
                f"addr add {LAN_HOST}/24 dev eth0",
                f"addr add {LAN_HOST6}/64 dev eth0 nodad",
                "link set eth0 up",
            ],
            "inet": [
                *(f"addr add {ip}/32 dev lo" for ip in (*PROBE_TARGETS, SERVER_IP)),
                *(f"addr add {ip}/128 dev lo nodad" for ip in (*PROBE_TARGETS6, SERVER_IP6)),
                f"addr add {isp1.inet_transit_ip}/30 dev isp1",
                f"addr add {isp2.inet_transit_ip}/30 dev isp2",
                f"addr add {isp1.inet_transit_ip6}/64 dev isp1 nodad",
                f"addr add {isp2.inet_transit_ip6}/64 dev isp2 nodad",
                "link set isp1 up",
                "link set isp2 up",
            ],
        }
        for isp in (isp1, isp2):
            addresses[isp.role] = [
                f"addr add {isp.gateway}/30 dev cpe",
                f"addr add {isp.isp_transit_ip}/30 dev up",
                f"addr add {isp.cpe_ip6}/64 dev cpe nodad",
                f"addr add {isp.gateway6}/64 dev cpe nodad",
                f"addr add {isp.isp_transit_ip6}/64 dev up nodad",
                "link set dev cpe up",
                "link set dev up up",
            ]
        for role in ROLES:
            self._ip_batch(role, ["link set lo up", *addresses.get(role, [])])

        # Routes only once every link is up on both ends (a gateway route on a
        # link whose peer is still down would need `onlink`).
        # IPv6 defaults are spelled `::/0`: an `ip -batch` line takes no -6,
        # and a bare "default" there means IPv4.
        routes: dict[str, list[str]] = {
            "lan": [f"route add default via {LAN_GATEWAY}", f"route add ::/0 via {LAN_GATEWAY6}"],
            # inet deliberately has no default route: it only knows the ISPs.
            "inet": [
                *(f"route add {isp.customer_net} via {isp.isp_transit_ip}" for isp in (isp1, isp2)),
                *(f"route add {isp.customer_net6} via {isp.isp_transit_ip6}" for isp in (isp1, isp2)),
            ],
            "isp1": [
                f"route add default via {isp1.inet_transit_ip}",
                f"route add ::/0 via {isp1.inet_transit_ip6}",
            ],
            "isp2": [
                f"route add default via {isp2.inet_transit_ip}",
                f"route add ::/0 via {isp2.inet_transit_ip6}",
            ],
            "router": [
                *(
                    f"route add default via {isp.gateway} dev {isp.router_dev} "
                    f"proto dhcp metric {isp.dhcp_metric}"
                    for isp in (isp1, isp2)
                    if self.dhcp_defaults
                ),
                # What an RA client leaves: the link-local gateway, proto ra.
                *(
                    f"route add ::/0 via {isp.gateway6} dev {isp.router_dev} proto ra metric {isp.ra_metric}"
                    for isp in (isp1, isp2)
                    if self.dhcp_defaults
                ),
            ],
        }
        for role in ROLES:
            # `link show dev X` first: see _sync_link_lines.
            self._ip_batch(role, [*_sync_link_lines(VETHS[role]), *routes[role]])

        # Stand-in for the router's firewall: NAT out of both uplinks.
        self.nft(
            "router",
            "table ip labnat {\n"
            "  chain post {\n"
            "    type nat hook postrouting priority 100; policy accept;\n"
            '    oifname "wan0" masquerade\n'
            '    oifname "wan1" masquerade\n'
            "  }\n"
            "}\n"
            # NAT66 likewise, in a table of its own so the IPv4 one stays as it was.
            "table ip6 labnat6 {\n"
            "  chain post {\n"
            "    type nat hook postrouting priority 100; policy accept;\n"
            '    oifname "wan0" masquerade\n'
            '    oifname "wan1" masquerade\n'
            "  }\n"
            "}\n",
        )
        for isp in (isp1, isp2):
            self.nft(isp.role, _isp_ruleset(isp))

        self._start_echo_server()
        self._wait_services_ready()

    def _ip_batch(self, role: str, lines: Sequence[str]) -> None:
        # One `ip` process per namespace and phase keeps the build fast.
        try:
            _run(["ip", "-n", self.name(role), "-batch", "-"], input="\n".join(lines) + "\n")
        except LabCommandError as exc:
            commands = "\n".join(lines)
            raise LabError(f"ip batch in {role} failed: {exc}\ncommands:\n{commands}") from exc

    def _sysctls(self) -> None:
        # New namespaces inherit IPv4 conf from the root ns (devconf_inherit_init_net=0),
        # so set everything that matters explicitly. rp_filter is off everywhere:
        # the router does policy routing (replies may come in on the "wrong"
        # uplink as far as the main table is concerned), and anti-spoofing at
        # the ISPs is modelled by the nft BCP38 rule, which the tests can count.
        #
        # IPv6: DAD off (all, default and every veth, which already exist but
        # are still down, so their automatic link-local addresses come up
        # usable: a tentative link-local cannot source neighbour solicitations,
        # and the router would not resolve fe80::1 for a second or two).
        # Forwarding on in the router and the ISPs; the router's uplinks
        # accept no RAs (the lab adds the routes an RA client would).
        common = [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]
        per_role = {
            "router": [
                "net.ipv4.ip_forward=1",
                *(f"net.ipv4.conf.{dev}.rp_filter=0" for dev in ("wan0", "wan1", "lan0")),
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.wan0.accept_ra=0",
                "net.ipv6.conf.wan1.accept_ra=0",
            ],
            **{
                isp: [
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.cpe.rp_filter=0",
                    "net.ipv6.conf.all.forwarding=1",
                ]
                for isp in ISPS
            },
        }
        for role in ROLES:
            dad = [f"net.ipv6.conf.{dev}.accept_dad=0" for dev in VETHS[role]]
            self.run(role, "sysctl", "-q", "-w", *common, *dad, *per_role.get(role, []))

    def _start_echo_server(
        self, role: str = "inet", hosts: Sequence[str] = (SERVER_IP, SERVER_IP6), port: int = SERVER_PORT
    ) -> None:
        """echo_server.py in a namespace; returns once it listens."""
        argv = [sys.executable, str(ECHO_SERVER), "--port", str(port)]
        for host in hosts:
            argv += ["--host", host]
        proc = self.popen(role, argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = _read_line(proc.stdout, time.monotonic() + READY_TIMEOUT_S)
        if line is None or line.strip() != "ready":
            raise LabError(f"echo server in {role} did not become ready (got {line!r}, rc={proc.poll()})")

    # Faults (all reversible, all in the ISP namespaces) ----------------------

    def _isp(self, role: str) -> IspSpec:
        try:
            return ISPS[role]
        except KeyError:
            raise LabError(f"not an ISP role: {role!r} (use isp1 or isp2)") from None

    def _replace_table(self, role: str, family_table: str, body: str | None) -> None:
        # "add; delete; define" in one transaction: idempotent both ways and
        # atomic (nft 1.0.6 has no `destroy table`).
        script = f"add table {family_table}\ndelete table {family_table}\n"
        if body is not None:
            script += f"table {family_table} {{\n{body}}}\n"
        self.nft(role, script)

    def silent_drop(self, isp_role: str, on: bool, family: int | None = None) -> None:
        """The ISP drops everything it forwards, IPv4 and IPv6 (or only `family`).

        Its gateway still answers ARP, neighbour solicitations and pings (to
        203.0.113.x, fe80::1 and 2001:db8:N::1): neighbour discovery and
        pings to the gateway never cross the forward hook. Each family's
        fault is a table of its own, so the two are switched independently.
        """
        self._isp(isp_role)
        match = "" if family is None else f"meta nfproto ipv{_check_family(family)} "
        body = (
            "  chain forward {\n"
            "    type filter hook forward priority -10; policy accept;\n"
            f"    {match}counter drop\n"
            "  }\n"
        )
        self._replace_table(isp_role, f"inet fault{family or ''}", body if on else None)

    def gateway_dead(self, isp_role: str, on: bool, *, arp: bool = False) -> None:
        """The gateway neither answers (input) nor forwards, with the link up.

        IPv4 and IPv6 alike: pings to 203.0.113.x, fe80::1 and 2001:db8:N::1
        go unanswered and nothing is forwarded. Address resolution is kept by
        default, in both families: ARP is a separate nftables family that the
        inet table does not see, and IPv6 neighbour solicitations and
        advertisements are accepted before the input drop. So the router's
        neighbour entries stay REACHABLE and only probes can tell the gateway
        is dead. arp=True also drops ARP and IPv6 neighbour discovery (the
        router's neighbour entries then go FAILED, like a gateway that is
        really switched off).
        """
        self._isp(isp_role)
        keep_nd = "" if arp else "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n"
        body = "".join(
            f"  chain {hook} {{\n"
            f"    type filter hook {hook} priority -10; policy accept;\n"
            f"{keep_nd if hook == 'input' else ''}"
            "    counter drop\n"
            "  }\n"
            for hook in ("input", "forward")
        )
        self._replace_table(isp_role, "inet deadgw", body if on else None)
        arp_body = "  chain input {\n    type filter hook input priority 0; policy drop;\n  }\n"
        self._replace_table(isp_role, "arp deadgw", arp_body if on and arp else None)

    def carrier(self, isp_role: str, up: bool) -> None:
        """Set the ISP's `cpe` end down/up: the router's side shows NO-CARRIER.

        The kernel keeps using routes through a NO-CARRIER link
        (ignore_routes_with_linkdown=0): only the agent moves traffic away.
        In IPv6 too: the router's routes via fe80::1 stay, flagged linkdown,
        and no route event is sent.

        Setting an interface down flushes its IPv6 addresses (link-local ones
        even with keep_addr_on_down), so up=True puts the ISP's 2001:db8:N::1
        and fe80::1 back, as a real ISP's equipment would still have them,
        and processes the ISP side's pending link event at once (see
        _sync_link_lines). The router side's event is left to the kernel: as
        with a real NIC, the router may see the carrier come back up to a
        second later.
        """
        isp = self._isp(isp_role)
        if not up:
            self.ip(isp_role, "link", "set", "cpe", "down")
            return
        self._ip_batch(
            isp_role,
            [
                "link set dev cpe up",
                *_sync_link_lines(["cpe"]),
                f"addr replace {isp.cpe_ip6}/64 dev cpe nodad",
                f"addr replace {isp.gateway6}/64 dev cpe nodad",
            ],
        )

    def loss(self, isp_role: str, percent: int) -> None:
        """Drop `percent`% of packets (IPv4 and IPv6) the ISP forwards from the customer; 0 removes it.

        Only the upstream direction (iifname "cpe") is dropped, so a probe
        round trip is lost with exactly this probability rather than
        1-(1-p)^2.
        """
        self._isp(isp_role)
        if not 0 <= percent <= 100:
            raise LabError(f"loss percent must be 0..100, got {percent}")
        # nft range-checks the constant against `mod 100` (0-99): 100% is a plain drop.
        match = "" if percent == 100 else f"numgen random mod 100 < {int(percent)} "
        body = (
            "  chain forward {\n"
            "    type filter hook forward priority -10; policy accept;\n"
            f'    iifname "cpe" {match}counter drop\n'
            "  }\n"
        )
        self._replace_table(isp_role, "inet loss", body if percent else None)

    # Observers and traffic ---------------------------------------------------

    def monitor_routes(
        self, role: str = "router", *, rules: bool = False, family: int | None = None
    ) -> RouteMonitor:
        """Start recording route (and with `rules`, rule) events, of `family` only if given
        (`ip -4`/`-6 monitor`); returns once subscribed."""
        monitor = RouteMonitor(self, role, rules=rules, family=family)
        self._stoppables.append(monitor)
        return monitor

    def add_servers(self, hosts: Sequence[str]) -> None:
        """More echo servers in `inet` (each a destination of its own, e.g. 198.18.1.21)."""
        self._ip_batch("inet", [f"addr add {host}/32 dev lo" for host in hosts])
        self._start_echo_server("inet", tuple(hosts))

    def start_connector(
        self,
        duration_s: float,
        period_ms: int = 10,
        timeout_ms: int = 100,
        family: int = 4,
        hosts: Sequence[str] = (),
    ) -> Connector:
        """Start connector.py in `lan` against the echo server; returns once it runs.

        family=6 connects to SERVER_IP6 (the server then reports the router's
        NAT66 address, 2001:db8:1::2 or 2001:db8:2::2).
        """
        proc = self.popen(
            "lan",
            [
                sys.executable, str(CONNECTOR),
                "--host", ",".join(hosts) or server_ip(family), "--port", str(SERVER_PORT),
                "--period-ms", str(period_ms), "--timeout-ms", str(timeout_ms),
                "--duration-s", str(duration_s),
            ],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )  # fmt: skip
        connector = Connector(proc)
        self._stoppables.append(connector)
        connector.wait_started()
        return connector

    def connect_once(
        self, timeout: float = 2.0, family: int = 4, role: str = "lan", source: str | None = None
    ) -> str | None:
        """One TCP connection from `role` (default `lan`); the source ip the server saw, or None.

        family=6 connects to SERVER_IP6; `source` binds the client to one of its addresses.
        """
        (seen,) = self.connect_many(1, timeout=timeout, family=family, role=role, source=source)
        return seen

    def connect_many(
        self,
        count: int,
        timeout: float = 1.0,
        family: int = 4,
        role: str = "lan",
        source: str | None = None,
        host: str | None = None,
        port: int = SERVER_PORT,
    ) -> list[str | None]:
        """`count` new TCP connections one after the other (each a new conntrack flow);
        per connection the source ip the server saw, or None for a failed one."""
        timeout_ms = max(1, round(timeout * 1000))
        duration_s = min(count * (timeout + 0.05) + 5, 120)
        proc = self.run(
            role,
            sys.executable, str(CONNECTOR),
            "--host", host or server_ip(family), "--port", str(port),
            "--max-attempts", str(count), "--timeout-ms", str(timeout_ms), "--period-ms", "1",
            "--duration-s", str(duration_s),
            *(("--source", source) if source else ()),
            timeout=duration_s + 10,
        )  # fmt: skip
        seen: list[str | None] = []
        for line in proc.stdout.splitlines():
            words = line.split()
            if len(words) == 3 and words[0][0].isdigit():
                seen.append(words[2] if words[1] == "ok" else None)
        return seen + [None] * (count - len(seen))

    def start_udp_keepalive(self, period_ms: int, duration_s: float) -> subprocess.Popen[str]:
        """udp_keepalive.py in `lan`: one UDP flow to the echo server, a datagram every period."""
        return self.popen(
            "lan",
            [
                sys.executable, str(LAB_TOOLS / "udp_keepalive.py"),
                "--host", SERVER_IP, "--port", str(SERVER_PORT),
                "--period-ms", str(period_ms), "--timeout-ms", str(max(10, period_ms * 8 // 10)),
                "--duration-s", str(duration_s),
            ],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )  # fmt: skip

    def start_lan_server(self, port: int) -> None:
        """The echo server on the LAN host (LAN_HOST:port), e.g. behind a port forward."""
        self._start_echo_server("lan", (LAN_HOST,), port)

    def delegate_prefixes6(self) -> dict[str, tuple[str, str]]:
        """Each ISP delegates the router a /56 (DHCPv6-PD, as it would be left in place): the
        LAN gets a /64 of each, the LAN host an address in each, and per ISP role this
        returns (prefix, the host's address in it).

        isp1 delegates 2001:db8:10::/56, isp2 2001:db8:20::/56: each routes its prefix to
        the router's address on its customer link, inet routes it to that ISP, and its IPv6
        BCP38 accepts the customer /64 and the prefix (so a packet from one ISP's prefix
        leaving through the other is counted as spoofed_6 and dropped). The lab's own NAT66
        (table ip6 labnat6) goes: the router does not translate these sources by itself.
        """
        delegated = {"isp1": "2001:db8:10::/56", "isp2": "2001:db8:20::/56"}
        hosts: dict[str, tuple[str, str]] = {}
        for role, prefix in delegated.items():
            isp = ISPS[role]
            network = ipaddress.IPv6Network(prefix)
            gateway, host = network[1], network[0x10]
            self._ip_batch("router", [f"addr add {gateway}/64 dev lan0 nodad"])
            self._ip_batch("lan", [f"addr add {host}/64 dev eth0 nodad"])
            self._ip_batch(role, [f"route add {prefix} via {isp.router_ip6} dev cpe"])
            self._ip_batch("inet", [f"route add {prefix} via {isp.isp_transit_ip6}"])
            self._set_bcp38_nets6(role, [isp.customer_net6, prefix])
            hosts[role] = (prefix, str(host))
        self.run("router", "nft", "delete", "table", "ip6", "labnat6")
        return hosts

    def _set_bcp38_nets6(self, isp_role: str, nets: Sequence[str]) -> None:
        """_set_bcp38_nets for IPv6: the rule counting spoofed_6 matches set customer6."""
        listing = self.run(isp_role, "nft", "-j", "-a", "list", "chain", "inet", "isp", "forward").stdout
        handles = [
            item["rule"]["handle"]
            for item in json.loads(listing)["nftables"]
            if "rule" in item and {"counter": "spoofed_6"} in item["rule"]["expr"]
        ]
        if len(handles) != 1:
            raise LabError(f"expected one IPv6 BCP38 rule in {isp_role}, found {len(handles)}")
        self.nft(
            isp_role,
            "add set inet isp customer6 { type ipv6_addr; flags interval; }\n"
            "flush set inet isp customer6\n"
            f"add element inet isp customer6 {{ {', '.join(nets)} }}\n"
            f"replace rule inet isp forward handle {handles[0]} "
            'iifname "cpe" ip6 saddr != @customer6 counter name spoofed_6 drop\n',
        )

    def add_second_lan(self) -> str:
        """A second LAN behind the router, reached through main's connected route only.

        Namespace role `lan2`: router lan1 198.18.200.1/24 ---- lan2 eth0
        198.18.200.10/24, running the echo server on :8080. Returns the host's address.
        """
        if "lan2" in self.ns:
            return LAN2_HOST
        self.ns["lan2"] = self.prefix + "lan2"
        _run(["ip", "netns", "add", self.name("lan2")])
        self._created.append(self.name("lan2"))
        self._ip_batch("router", [f"link add lan1 type veth peer name eth0 netns {self.name('lan2')}"])
        self.run("router", "sysctl", "-q", "-w", "net.ipv4.conf.lan1.rp_filter=0")
        self._ip_batch("router", [f"addr add {LAN2_GATEWAY}/24 dev lan1", "link set lan1 up"])
        self._ip_batch("lan2", ["link set lo up", f"addr add {LAN2_HOST}/24 dev eth0", "link set eth0 up"])
        self._ip_batch("lan2", [*_sync_link_lines(["eth0"]), f"route add default via {LAN2_GATEWAY}"])
        self._start_echo_server("lan2", (LAN2_HOST,))
        return LAN2_HOST

    def add_extra_uplinks(self, count: int) -> list[tuple[str, str, str]]:
        """`count` more uplinks through isp1, for scale tests: router wanN (N = 2, 3, ...)
        198.19.N.2/30 ---- isp1 cpeN 198.19.N.1/30; inet routes 198.19.0.0/16 back via isp1.

        Returns (interface, router address, gateway) per uplink. isp1's BCP38 rule matches
        only its `cpe` link, so these are not filtered.
        """
        if not 1 <= count <= 254:
            raise LabError(f"extra uplinks: 1 to 254, got {count}")
        made: list[tuple[str, str, str]] = []
        router_lines: list[str] = []
        isp_lines: list[str] = []
        for n in range(2, 2 + count):
            dev = f"wan{n}"
            router_lines.append(f"link add {dev} type veth peer name cpe{n} netns {self.name('isp1')}")
            made.append((dev, f"198.19.{n}.2", f"198.19.{n}.1"))
        self._ip_batch("router", router_lines)
        self.run(
            "router", "sysctl", "-q", "-w",
            *(f"net.ipv4.conf.{dev}.rp_filter=0" for dev, _, _ in made),
            *(f"net.ipv6.conf.{dev}.accept_dad=0" for dev, _, _ in made),
        )  # fmt: skip
        self._ip_batch(
            "router",
            [line for dev, ip, _ in made for line in (f"addr add {ip}/30 dev {dev}", f"link set {dev} up")],
        )
        for n, (_, _, gateway) in enumerate(made, start=2):
            isp_lines += [f"addr add {gateway}/30 dev cpe{n}", f"link set dev cpe{n} up"]
        self._ip_batch("isp1", isp_lines)
        self._ip_batch("inet", [f"route replace 198.19.0.0/16 via {ISPS['isp1'].isp_transit_ip}"])
        self._ip_batch(
            "router",
            [*_sync_link_lines([dev for dev, _, _ in made])]
            + [
                f"route add default via {gw} dev {dev} proto dhcp metric {300 + i}"
                for i, (dev, _, gw) in enumerate(made)
            ],
        )
        return made

    # Teardown ---------------------------------------------------------------

    def close(self) -> None:
        """Stop everything started in the lab, kill what is left, delete the namespaces."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for stoppable in reversed(self._stoppables):
            try:
                stoppable.stop()
            except Exception as exc:  # keep tearing down; reported below
                errors.append(f"stopping {type(stoppable).__name__}: {exc}")
        # Our own processes first, gracefully, in parallel.
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + TERM_GRACE_S
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_S)
        for proc in self._procs:
            try:
                if proc.poll() is None:
                    proc.kill()
                _stop_process(proc)
                _close_pipes(proc)
            except Exception as exc:
                errors.append(f"stopping pid {proc.pid}: {exc}")
        # Then anything else still in a lab namespace (e.g. an agent started by
        # a test, or children of our processes).
        for ns in self._created:
            errors.extend(self._kill_namespace_pids(ns))
        for ns in self._created:
            deleted = _run(["ip", "netns", "del", ns], check=False)
            if deleted.returncode != 0:
                errors.append(f"ip netns del {ns}: {deleted.stderr.strip()}")
        self._created.clear()
        if self._services_dir is not None:
            try:
                shutil.rmtree(self._services_dir)
            except OSError as exc:
                errors.append(f"removing {self._services_dir}: {exc}")
            self._services_dir = None
        if errors:
            raise LabError("lab teardown was not clean:\n" + "\n".join(errors))

    def _kill_namespace_pids(self, ns: str) -> list[str]:
        me = os.getpid()
        deadline = time.monotonic() + TERM_GRACE_S
        sig = signal.SIGTERM
        while time.monotonic() < deadline:
            listed = _run(["ip", "netns", "pids", ns], check=False)
            pids = {int(word) for word in listed.stdout.split() if word.isdigit()}
            if me in pids:
                # Our own main thread entered the namespace (setns in-process):
                # never kill the test runner.
                return [f"the test process itself is in namespace {ns}"]
            if not pids:
                return []
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(POLL_INTERVAL_S * 5)
            sig = signal.SIGKILL  # TERM once, then KILL
        return [f"processes still in {ns} after {TERM_GRACE_S}s"]

    # Services in inet (services.py) ----------------------------------------

    def _spawn_services(self) -> None:
        # Started as soon as inet exists, waited for at the end of the build.
        self._services_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}services-"))
        argv = [
            sys.executable, str(SERVICES),
            "--host", SERVER_IP, "--host", SERVER_IP6,
            "--http-port", str(HTTP_PORT), "--https-port", str(HTTPS_PORT), "--dns-port", str(DNS_PORT),
            "--control", str(self._services_dir),
        ]  # fmt: skip
        self._services_proc = self.popen("inet", argv, stdout=subprocess.PIPE, text=True)

    def _wait_services_ready(self) -> None:
        proc = self._services_proc
        assert proc is not None and proc.stdout is not None
        line = _read_line(proc.stdout, time.monotonic() + READY_TIMEOUT_S)
        if line is None or line.strip() != "ready":
            raise LabError(f"services did not become ready (got {line!r}, rc={proc.poll()})")

    def _control_dir(self) -> Path:
        if self._services_dir is None or self._closed:
            raise LabError("the services run only in a built, open lab")
        return self._services_dir

    def _write_control(self, name: str, text: str) -> None:
        # Temp file + os.replace: services.py reads the old or the new value, never half of one.
        directory = self._control_dir()
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, directory / name)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def set_http_status(self, code: int) -> None:
        """HTTP and HTTPS answer every GET with this status from now on (204 until set).

        A 3xx carries ``Location: http://portal.example/`` (PORTAL_URL).
        """
        if isinstance(code, bool) or not isinstance(code, int) or not 200 <= code <= 599:
            raise LabError(f"HTTP status must be an int 200..599, got {code!r}")
        self._write_control("http_status", str(code))

    def set_dns_mode(self, mode: str) -> None:
        """How the DNS service answers from now on: one of DNS_MODES ("ok" until set).

        ok: A 198.18.1.10 / AAAA 2001:db8:ffff::10 for any name, TTL 1;
        servfail: rcode 2; nxdomain: rcode 3; silent: no reply at all.
        """
        if mode not in DNS_MODES:
            raise LabError(f"DNS mode must be one of {', '.join(DNS_MODES)}, got {mode!r}")
        self._write_control("dns_mode", mode)

    def http_last_host(self) -> str | None:
        """The Host header of the last HTTP(S) request; None before any, "" if it had none.

        The server records it before it answers, so it is current as soon as
        a client has its response.
        """
        try:
            return (self._control_dir() / "http_last_host").read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def https_ca_file(self) -> Path | None:
        """The HTTPS service's self-signed certificate (for check.example), to use as a CA file.

        None if HTTPS is not running because `openssl` is not installed.
        """
        path = self._control_dir() / "https_cert.pem"
        return path if path.is_file() else None

    # Uplink changes ---------------------------------------------------------

    def enable_proxy_arp(self, isp_role: str, on: bool) -> None:
        """The ISP answers ARP on its `cpe` side for every address it routes elsewhere.

        So the router can use an uplink with no gateway (`default dev wanX`):
        a point-to-point style uplink, resolving every destination on the link.
        Also sets the ISP's proxy_delay to 0: by default a proxied ARP reply
        is delayed by a random 0..0.8 s, which would eat a 1 s ping timeout.
        Turning it off leaves the router's neighbour entries made so far; they
        expire as usual (or flush them).
        """
        self._isp(isp_role)
        settings = [f"net.ipv4.conf.cpe.proxy_arp={1 if on else 0}"]
        if on:
            settings.append("net.ipv4.neigh.cpe.proxy_delay=0")
        self.run(isp_role, "sysctl", "-q", "-w", *settings)

    def renumber_isp2(
        self, new_router_ip: str = "203.0.113.10", new_gateway: str = "203.0.113.9", prefix: int = 30
    ) -> float:
        """isp2 hands the router a new address and gateway, as dhclient/networkd apply it.

        In isp2: the new gateway address on `cpe`, BCP38 accepting the new
        customer net as well (its counters keep counting); in inet: a route
        to the new net via isp2. Then on the router, in this order: the new
        address on wan1; main's `proto dhcp` default via the old gateway on
        wan1 (any metric; metric 200 as built) gets a twin via the new
        gateway (`ip route append`, same metric), then the old one is
        deleted; then the old address is deleted (the kernel drops the routes
        it was the source of). So main has a default on wan1 throughout, and
        an agent sees: new address, new route, deleted route, deleted address.
        Returns time.monotonic() once the router's part is done.

        Afterwards the old lease is retired on the ISP side, invisible to the
        router: isp2's BCP38 accepts only the new net (so a stale source
        address is counted as spoofed), and the old gateway address and
        inet's route to the old net are removed (a stale gateway goes
        unanswered). Calling it again renumbers from the current state, e.g.
        renumber_isp2("203.0.113.6", "203.0.113.5") goes back. The lab's
        ISPS constants keep describing the original wiring.
        """
        isp = ISPS["isp2"]
        old_ip, old_gw, old_prefix = self._isp2_link
        old_net = ipaddress.ip_interface(f"{old_ip}/{old_prefix}").network
        try:
            new_if = ipaddress.ip_interface(f"{new_router_ip}/{prefix}")
            gateway = ipaddress.ip_address(new_gateway)
        except ValueError as exc:
            raise LabError(f"renumber_isp2: {exc}") from None
        net = new_if.network
        problems = []
        if not (net.version == 4 and net.subnet_of(ipaddress.IPv4Network("203.0.113.0/24"))):
            problems.append(f"{net} is not inside 203.0.113.0/24")
        elif net.overlaps(ipaddress.IPv4Network(ISPS["isp1"].customer_net)) or net.overlaps(old_net):
            problems.append(f"{net} overlaps isp1's {ISPS['isp1'].customer_net} or the current {old_net}")
        if gateway not in net or gateway == new_if.ip:
            problems.append(f"gateway {gateway} must be another address in {net}")
        if prefix < 31 and {new_if.ip, gateway} & {net.network_address, net.broadcast_address}:
            problems.append(f"{net}'s network and broadcast addresses cannot be hosts")
        if problems:
            raise LabError("renumber_isp2: " + "; ".join(problems))

        self._ip_batch(isp.role, [f"addr replace {gateway}/{prefix} dev cpe"])
        self._set_bcp38_nets(isp.role, [str(old_net), str(net)])
        self._ip_batch("inet", [f"route replace {net} via {isp.isp_transit_ip}"])

        dhcp_defaults = [
            route
            for route in self.default_routes("router")
            if route.get("dev") == isp.router_dev
            and route.get("protocol") == "dhcp"
            and route.get("gateway") == old_gw
        ]
        lines = [f"addr add {new_if} dev {isp.router_dev}"]
        for route in dhcp_defaults:
            metric = int(route.get("metric", 0))
            lines += [
                f"route append default via {gateway} dev {isp.router_dev} proto dhcp metric {metric}",
                f"route del default via {old_gw} dev {isp.router_dev} proto dhcp metric {metric}",
            ]
        lines.append(f"addr del {old_ip}/{old_prefix} dev {isp.router_dev}")
        self._ip_batch("router", lines)
        done = time.monotonic()
        self._isp2_link = (str(new_if.ip), str(gateway), prefix)

        self._set_bcp38_nets(isp.role, [str(net)])
        self._ip_batch(isp.role, [f"addr del {old_gw}/{old_prefix} dev cpe"])
        self._ip_batch("inet", [f"route del {old_net} via {isp.isp_transit_ip}"])
        return done

    def _set_bcp38_nets(self, isp_role: str, nets: Sequence[str]) -> None:
        """Let the ISP's IPv4 BCP38 rule accept exactly these customer nets.

        The nets go into a named interval set, customer4 (nft 1.0.6 aborts
        on `replace rule` with an anonymous interval set), and the rule is
        replaced by handle, in place, to match against it: the named
        counters (and their values) stay as they are. One transaction.
        """
        listing = self.run(isp_role, "nft", "-j", "-a", "list", "chain", "inet", "isp", "forward").stdout
        handles = [
            item["rule"]["handle"]
            for item in json.loads(listing)["nftables"]
            if "rule" in item and {"counter": "spoofed"} in item["rule"]["expr"]
        ]
        if len(handles) != 1:
            raise LabError(f"expected one IPv4 BCP38 rule in {isp_role}, found {len(handles)}")
        self.nft(
            isp_role,
            "add set inet isp customer4 { type ipv4_addr; flags interval; }\n"
            "flush set inet isp customer4\n"
            f"add element inet isp customer4 {{ {', '.join(nets)} }}\n"
            f"replace rule inet isp forward handle {handles[0]} "
            'iifname "cpe" ip saddr != @customer4 counter name spoofed drop\n',
        )


def _sync_link_lines(devices: Sequence[str]) -> list[str]:
    """`ip -batch` lines that make the kernel act on pending carrier changes now.

    A carrier change reaches the rest of the stack through linkwatch, which
    handles a veth at once only if its ifindex differs from its peer's
    (wan0 and isp1's cpe are both ifindex 2, for one); otherwise it waits
    until up to a second after linkwatch's previous run, which is global, so
    other labs and CI runs add to it. IPv4 hardly notices, but IPv6 does
    nothing on a link until that event: no link-local address, no ff00::/8
    route, so no neighbour solicitation can be sent and the first packets
    are lost. On recent kernels (checked on 6.18) RTM_GETLINK for one device
    (`ip link show dev X`, not a dump) runs that device's pending event
    synchronously. Mind that a test polling `ip link show dev wan0` does the
    same for the router's side, so it sees carrier changes sooner than an
    agent that only listens to link events would.
    """
    return [f"link show dev {dev}" for dev in devices]


def _isp_ruleset(isp: IspSpec) -> str:
    """BCP38 at the ISP edge plus per-target counters of what it forwards.

    Named counters need an explicit `{ packets 0 bytes 0 }` body in nft
    1.0.6; the chain cannot be called `fwd` (a keyword). The spoof drop comes
    first, so t1/t2/srv count only packets actually forwarded. IPv6 has the
    same rules with "_6" names; `ip saddr`/`ip6 saddr` match only their own
    family, so neither BCP38 rule touches the other family's packets, and
    link-local sources (neighbour discovery) never reach the forward hook.
    """
    names = ("t1", "t2", "srv", "spoofed", "t1_6", "t2_6", "srv_6", "spoofed_6", "to_lan", "to_lan_6")
    counters = "".join(f"  counter {name} {{ packets 0 bytes 0 }}\n" for name in names)
    targets = {"t1": PROBE_TARGETS[0], "t2": PROBE_TARGETS[1], "srv": SERVER_IP}
    rules = "".join(f'    iifname "cpe" ip daddr {ip} counter name {name}\n' for name, ip in targets.items())
    targets6 = {"t1_6": PROBE_TARGETS6[0], "t2_6": PROBE_TARGETS6[1], "srv_6": SERVER_IP6}
    rules6 = "".join(
        f'    iifname "cpe" ip6 daddr {ip} counter name {name}\n' for name, ip in targets6.items()
    )
    return (
        "table inet isp {\n"
        f"{counters}"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        # A router that sends its LAN's replies out of a WAN shows up here.
        f'    iifname "cpe" ip daddr {{ 198.51.100.0/24, {LAN2_NET} }} counter name to_lan\n'
        f'    iifname "cpe" ip6 daddr 2001:db8:100::/64 counter name to_lan_6\n'
        f'    iifname "cpe" ip saddr != {isp.customer_net} counter name spoofed drop\n'
        f"{rules}"
        f'    iifname "cpe" ip6 saddr != {isp.customer_net6} counter name spoofed_6 drop\n'
        f"{rules6}"
        "  }\n"
        "}\n"
    )
