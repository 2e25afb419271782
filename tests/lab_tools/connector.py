"""Open a NEW TCP connection on a fixed schedule and report what happened.

Run inside the lab's `lan` namespace. Every --period-ms it opens a fresh
socket (so every attempt is a new conntrack flow on the router), connects to
the echo server with --timeout-ms covering connect + first line, reads the
first line (the source address the server saw), and closes.

Output, one flushed line per attempt, timestamps from time.monotonic() at the
start of the attempt (CLOCK_MONOTONIC is shared by all namespaces, so they
compare directly with the test's and the agent's clocks):

    # start <t0>
    <t> ok <ip>
    <t> fail <reason>

Attempts start at t0 + k*period; slots missed while an attempt was running
are skipped, not made up. Stops after --duration-s, after --max-attempts, or
on SIGTERM/SIGINT (after the attempt in flight, which is bounded by the
timeout). --host is an IPv4 or IPv6 address; the socket family follows it.
Standard library only.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import math
import signal
import socket
import sys
import time
from types import FrameType
from typing import Final

#: Hard cap on --duration-s, so a forgotten connector cannot outlive a test run.
MAX_DURATION_S: Final = 120.0
#: The server's first line is an IP address (IPv6: at most 45 characters); anything longer is garbage.
MAX_FIRST_LINE_BYTES: Final = 64
#: Longest single sleep, so a stop signal is noticed promptly.
MAX_SLEEP_S: Final = 0.05

_stop_requested = False


def _request_stop(signum: int, frame: FrameType | None) -> None:
    global _stop_requested
    _stop_requested = True


def address_family(host: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for an address literal; ValueError for anything else."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def attempt(host: str, port: int, timeout_s: float, source: str | None = None) -> tuple[bool, str]:
    """One connection (from `source`, if given); (True, source ip) or (False, short reason)."""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.socket(address_family(host), socket.SOCK_STREAM) as sock:
            if source:
                sock.bind((source, 0))
            sock.settimeout(timeout_s)
            sock.connect((host, port))
            buf = b""
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False, "timeout"
                sock.settimeout(remaining)
                chunk = sock.recv(MAX_FIRST_LINE_BYTES)
                if not chunk:
                    return False, "eof"
                buf += chunk
                if len(buf) > MAX_FIRST_LINE_BYTES:
                    return False, "garbage"
            first = buf.split(b"\n", 1)[0].decode("ascii", "replace").strip()
            return True, first or "empty"
    except TimeoutError:  # socket.timeout is TimeoutError since 3.10
        return False, "timeout"
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0)
        return False, name or type(exc).__name__


def run(
    host: str,
    port: int,
    period_s: float,
    timeout_s: float,
    duration_s: float,
    max_attempts: int,
    source: str | None = None,
) -> int:
    t0 = time.monotonic()
    end = t0 + duration_s
    print(f"# start {t0:.6f}", flush=True)
    slot = 0
    attempts = 0
    while not _stop_requested and attempts < max_attempts:
        start_at = t0 + slot * period_s
        if start_at >= end:
            break
        # Wait for the slot in short steps so SIGTERM is honoured quickly.
        while not _stop_requested and (wait_s := start_at - time.monotonic()) > 0:
            time.sleep(min(wait_s, MAX_SLEEP_S))
        if _stop_requested:
            break
        started = time.monotonic()
        hosts = host.split(",")  # several servers: one after the other, a new destination each time
        ok, detail = attempt(hosts[attempts % len(hosts)], port, timeout_s, source)
        print(f"{started:.6f} {'ok' if ok else 'fail'} {detail}", flush=True)
        attempts += 1
        # Next slot strictly after now: missed slots are skipped.
        slot = max(slot + 1, math.floor((time.monotonic() - t0) / period_s) + 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", required=True, help="the server's IPv4 or IPv6 address (several: comma-separated)"
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--period-ms", type=float, default=10.0)
    parser.add_argument("--timeout-ms", type=float, default=100.0)
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument("--max-attempts", type=int, default=100_000)
    parser.add_argument("--source", help="bind to this local address (a LAN host of several)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1..65535, got {args.port}")
    try:
        for host in args.host.split(","):
            address_family(host)
    except ValueError:
        parser.error(f"--host must be an IPv4 or IPv6 address, got {args.host!r}")
    if not 1 <= args.period_ms <= 60_000:
        parser.error(f"--period-ms must be 1..60000, got {args.period_ms}")
    if not 1 <= args.timeout_ms <= 60_000:
        parser.error(f"--timeout-ms must be 1..60000, got {args.timeout_ms}")
    if not 0 < args.duration_s <= MAX_DURATION_S:
        parser.error(f"--duration-s must be in (0, {MAX_DURATION_S:g}], got {args.duration_s}")
    if not 1 <= args.max_attempts <= 1_000_000:
        parser.error(f"--max-attempts must be 1..1000000, got {args.max_attempts}")
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    try:
        return run(
            args.host,
            args.port,
            args.period_ms / 1000.0,
            args.timeout_ms / 1000.0,
            args.duration_s,
            args.max_attempts,
            args.source,
        )
    except BrokenPipeError:
        # The reader went away (test ended): nothing left to report to.
        return 0


if __name__ == "__main__":
    sys.exit(main())
