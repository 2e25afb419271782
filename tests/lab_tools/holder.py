#!/usr/bin/env python3
"""Hold one TCP connection to the lab's echo server and exchange a line every period.

Prints `# source <ip>` (the address the server saw), then one line per
exchange: `<monotonic> ok` or `<monotonic> fail <reason>`. Bounded by
--duration-s; stops on SIGTERM. Standard library only (runs in the `lan` namespace).
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--period-ms", type=float, default=100.0)
    parser.add_argument("--timeout-ms", type=float, default=1000.0)
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument("--source", default=None, help="bind to this address of the host first")
    args = parser.parse_args()
    duration = min(max(args.duration_s, 0.1), 300.0)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    bind = (args.source, 0) if args.source else None
    sock = socket.create_connection(
        (args.host, args.port), timeout=args.timeout_ms / 1000, source_address=bind
    )
    del family
    reader = sock.makefile("r", encoding="ascii", newline="\n")
    print(f"# source {reader.readline().strip()}", flush=True)
    deadline = time.monotonic() + duration
    n = 0
    while not stop and time.monotonic() < deadline:
        n += 1
        started = time.monotonic()
        try:
            sock.sendall(f"line {n}\n".encode())
            echoed = reader.readline().strip()
            ok = echoed == f"line {n}"
            print(f"{started:.6f} {'ok' if ok else 'fail mismatch ' + echoed[:40]}", flush=True)
        except OSError as err:
            print(f"{started:.6f} fail {type(err).__name__}", flush=True)
            return 1
        time.sleep(max(0.0, args.period_ms / 1000 - (time.monotonic() - started)))
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
