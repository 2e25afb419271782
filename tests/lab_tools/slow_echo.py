#!/usr/bin/env python3
"""Answer ICMP echo requests to the given addresses after a delay, in place of the kernel.

The lab has no netem: to give a path latency, the namespace holding the targets turns
off the kernel's own echo replies (net.ipv4.icmp_echo_ignore_all=1) and runs this. The
delay in ms is read from --delay-file (re-read every 100 ms), so a test can make the
RTT jump under a running agent. Prints "ready" once it listens; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import heapq
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

_stop = False


def _on_term(_signum: int, _frame: object) -> None:
    global _stop
    _stop = True


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", action="append", required=True)
    parser.add_argument("--delay-file", required=True)
    parser.add_argument("--duration-s", type=float, default=300.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    listener = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    senders = {}
    for address in args.address:
        sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sender.bind((address, 0))  # the reply's source is the target the request was for
        senders[address] = sender
    delay_file = Path(args.delay_file)
    delay_s, read_at = 0.0, 0.0
    queue: list[tuple[float, int, str, str, bytes]] = []
    count = 0
    print("ready", flush=True)
    end = time.monotonic() + min(args.duration_s, 3600.0)
    while not _stop and time.monotonic() < end:  # bounded by --duration-s
        now = time.monotonic()
        if now - read_at > 0.1:
            try:
                delay_s = float(delay_file.read_text().strip() or 0) / 1000.0
            except (OSError, ValueError):
                pass
            read_at = now
        while queue and queue[0][0] <= now:
            _, _, source, target, reply = heapq.heappop(queue)
            try:
                senders[target].sendto(reply, (source, 0))
            except OSError:
                pass
        wait = min(0.05, max(queue[0][0] - now, 0.0)) if queue else 0.05
        readable, _, _ = select.select([listener], [], [], wait)
        if not readable:
            continue
        packet, (source, _) = listener.recvfrom(2048)
        header_len = (packet[0] & 0x0F) * 4
        target = socket.inet_ntoa(packet[16:20])
        icmp = packet[header_len:]
        if len(icmp) < 8 or icmp[0] != 8 or target not in senders:
            continue
        body = b"\0\0\0\0" + icmp[4:]
        reply = struct.pack("!BBH", 0, 0, checksum(b"\0\0" + body[2:])) + icmp[4:]
        count += 1
        heapq.heappush(queue, (time.monotonic() + delay_s, count, source, target, reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
