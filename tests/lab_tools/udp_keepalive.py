#!/usr/bin/env python3
"""One UDP flow with a keepalive, as WireGuard or SIP keep theirs: same socket, same ports.

Every --period-ms it sends a datagram to the echo server and waits up to
--timeout-ms for the answer (the source address the server saw). One flushed
line per keepalive, timestamps from time.monotonic() when it was sent:

    <t> ok <ip>
    <t> fail timeout

Bounded by --duration-s; stops on SIGTERM. Standard library only (runs in `lan`).
"""

from __future__ import annotations

import argparse
import signal
import socket
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--period-ms", type=float, default=1000.0)
    parser.add_argument("--timeout-ms", type=float, default=800.0)
    parser.add_argument("--duration-s", type=float, required=True)
    args = parser.parse_args()
    duration = min(max(args.duration_s, 0.1), 120.0)
    period = max(args.period_ms, 10.0) / 1000
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((args.host, args.port))  # one flow: the same source port throughout
        t0 = time.monotonic()
        n = 0
        while not stop and time.monotonic() < t0 + duration:
            sent = time.monotonic()
            answer = "fail timeout"
            try:
                sock.send(b"keepalive\n")
                deadline = sent + args.timeout_ms / 1000
                while (left := deadline - time.monotonic()) > 0:
                    sock.settimeout(left)
                    data = sock.recv(256)
                    if data:
                        answer = f"ok {data.decode('ascii', 'replace').strip()}"
                        break
            except TimeoutError:
                pass
            except OSError as err:  # e.g. ICMP unreachable reported on the connected socket
                answer = f"fail {type(err).__name__}"
            print(f"{sent:.6f} {answer}", flush=True)
            n += 1
            while not stop and (wait := t0 + n * period - time.monotonic()) > 0:
                time.sleep(min(wait, 0.05))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
