"""TCP and UDP echo server for the namespace lab (standard library only).

TCP: on each connection, first write the peer's source address and "\\n", then
echo every line received until EOF. UDP: answer each datagram with
"<peer address>\\n". Both listen on the same --host/--port; --host may be
given several times (e.g. an IPv4 and an IPv6 address), and an IPv6 peer is
reported as such ("2001:db8:1::2"). Prints "ready" (flushed) once every
socket listens, so the lab can wait for it instead of sleeping. Stops cleanly
on SIGTERM/SIGINT.

The source address the server reports is what the lab uses to tell which
uplink (and which NAT) a connection went through.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final, cast

#: Longest line echoed back; a longer one ends the connection.
MAX_LINE_BYTES: Final = 64 * 1024


async def handle_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    try:
        writer.write(f"{peer[0]}\n".encode("ascii"))
        await writer.drain()
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        # Clients of the lab often reset or time out mid-connection: not an error.
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not a DatagramTransport subclass on every
        # Python version, hence a cast rather than an isinstance check.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # addr is (host, port) for IPv4 and (host, port, flowinfo, scope_id) for IPv6.
        self.transport.sendto(f"{addr[0]}\n".encode("ascii"), addr)


async def serve(hosts: Sequence[str], port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers: list[asyncio.AbstractServer] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        for host in hosts:
            servers.append(
                await asyncio.start_server(
                    handle_tcp, host, port, reuse_address=True, limit=MAX_LINE_BYTES, backlog=1024
                )
            )
            udp, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, port))
            transports.append(udp)
        print("ready", flush=True)
        await stop.wait()
    finally:
        for transport in transports:
            transport.close()
        for server in servers:
            server.close()
        # Since 3.12 wait_closed() also waits for open client connections;
        # a client that never sends EOF must not keep us alive.
        for server in servers:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
            except asyncio.TimeoutError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", required=True, action="append", help="address to listen on; repeat for several"
    )
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1..65535, got {args.port}")
    if len(args.host) > 16:
        parser.error(f"at most 16 --host, got {len(args.host)}")
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
