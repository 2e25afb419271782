"""HTTP, HTTPS and DNS services for the namespace lab (standard library only).

Run inside the lab's `inet` namespace, one process for all three, on every
--host (e.g. 198.18.1.10 and 2001:db8:ffff::10). What they answer is steered
through small files in the --control directory, which the tests rewrite
atomically (write a temporary file, then os.replace) between requests:

``http_status``
    HTTP and HTTPS: every GET (and HEAD) is answered with this status code
    (e.g. ``204``, ``302``; 204 when the file is missing), ``Content-Length:
    0``, ``Connection: close`` and, for a 3xx, ``Location:
    http://portal.example/``; then the connection is closed. Other methods
    get 405, a malformed request head 400.
``http_last_host``
    Written by the server (atomically, before it answers): the Host header of
    the last request it read, or an empty file if that request had none.
``dns_mode``
    DNS over UDP: ``ok`` (default: NOERROR with one A record 198.18.1.10 for
    an A question, one AAAA record 2001:db8:ffff::10 for an AAAA question,
    TTL 1, for any name; no answer for other types), ``servfail`` (rcode 2),
    ``nxdomain`` (rcode 3) or ``silent`` (no reply at all). A reply copies
    the query's id, opcode, RD bit and question and sets QR and RA.
``https_cert.pem``, ``https_key.pem``
    Written at start by the ``openssl`` CLI: a self-signed certificate for
    CN and SAN ``check.example``; a client can use the certificate as its CA
    file. Without ``openssl`` on PATH, HTTPS is skipped with a message on
    stderr and no certificate is written.

The sockets are bound with IP_FREEBIND/IPV6_FREEBIND, so the process may
start before the namespace has the --host addresses (the lab starts it first
thing, and openssl's RSA key is made while the rest of the lab is built).
Prints "ready" (flushed) once every listener is bound and the certificate
is made, so the lab can wait for it instead of sleeping. Stops cleanly on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, cast

#: Control and output files in the --control directory.
HTTP_STATUS_FILE: Final = "http_status"
HTTP_LAST_HOST_FILE: Final = "http_last_host"
DNS_MODE_FILE: Final = "dns_mode"
CERT_FILE: Final = "https_cert.pem"
KEY_FILE: Final = "https_key.pem"

DEFAULT_HTTP_STATUS: Final = 204
#: Where every 3xx points.
PORTAL_URL: Final = "http://portal.example/"
DNS_MODES: Final = ("ok", "servfail", "nxdomain", "silent")
DEFAULT_DNS_MODE: Final = "ok"
#: What an `ok` DNS answer holds.
ANSWER_A: Final = "198.18.1.10"
ANSWER_AAAA: Final = "2001:db8:ffff::10"
ANSWER_TTL: Final = 1
CERT_NAME: Final = "check.example"

#: Bounds on what a client may send or make us wait for.
MAX_HEAD_BYTES: Final = 16 * 1024
MAX_HEADER_LINES: Final = 100
REQUEST_TIMEOUT_S: Final = 5.0
CLOSE_TIMEOUT_S: Final = 1.0
OPENSSL_TIMEOUT_S: Final = 8.0
MAX_HOSTS: Final = 16

# DNS wire format (RFC 1035).
DNS_HEADER: Final = struct.Struct("!HHHHHH")
QTYPE_A: Final = 1
QTYPE_AAAA: Final = 28
QCLASS_IN: Final = 1
FLAG_QR: Final = 0x8000
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4
MAX_LABELS: Final = 128
MAX_NAME_BYTES: Final = 255


class BadRequest(Exception):
    """The client's request head is malformed or too large."""


# Control files ###############################################################


def write_atomically(path: Path, text: str) -> None:
    """Write text to path so that a reader sees the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_control(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def http_status(control: Path) -> int:
    """The configured status code; the default if the file is missing, 500 if it is garbage."""
    text = _read_control(control / HTTP_STATUS_FILE)
    if text is None or text == "":
        return DEFAULT_HTTP_STATUS
    try:
        code = int(text)
    except ValueError:
        code = 0
    if not 200 <= code <= 599:
        print(f"services: bad {HTTP_STATUS_FILE} {text!r}, answering 500", file=sys.stderr, flush=True)
        return 500
    return code


def dns_mode(control: Path) -> str:
    """The configured DNS mode; the default if the file is missing, servfail if it is garbage."""
    mode = _read_control(control / DNS_MODE_FILE)
    if mode is None or mode == "":
        return DEFAULT_DNS_MODE
    if mode not in DNS_MODES:
        print(f"services: bad {DNS_MODE_FILE} {mode!r}, answering servfail", file=sys.stderr, flush=True)
        return "servfail"
    return mode


# HTTP ########################################################################


def _reason(code: int) -> str:
    try:
        return http.HTTPStatus(code).phrase
    except ValueError:
        return "Status"


def response_head(code: int) -> bytes:
    """The full response (head only: the body is always empty)."""
    lines = [f"HTTP/1.1 {code} {_reason(code)}", "Content-Length: 0", "Connection: close"]
    if 300 <= code <= 399:
        lines.append(f"Location: {PORTAL_URL}")
    if code == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """Read a request head up to the blank line; (method, headers with lower-case names).

    Accepts bare LF line ends too. Raises BadRequest or asyncio.IncompleteReadError.
    """
    total = 0
    lines: list[str] = []
    while True:
        raw = await reader.readuntil(b"\n")  # LimitOverrunError past the stream limit
        total += len(raw)
        if total > MAX_HEAD_BYTES or len(lines) > MAX_HEADER_LINES:
            raise BadRequest("request head too large")
        line = raw.rstrip(b"\r\n").decode("latin-1")
        if line == "":
            if not lines:
                continue  # RFC 9112: ignore empty lines before the request line
            break
        lines.append(line)
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(f"bad request line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line!r}")
        headers.setdefault(name.lower(), value.strip())
    return parts[0], headers


def make_http_handler(control: Path) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, headers = await asyncio.wait_for(read_head(reader), REQUEST_TIMEOUT_S)
            except (BadRequest, asyncio.LimitOverrunError, ValueError):
                code = 400
            else:
                # Recorded before answering: once a client has its response,
                # the lab reads this request's Host.
                write_atomically(control / HTTP_LAST_HOST_FILE, headers.get("host", ""))
                code = http_status(control) if method in ("GET", "HEAD") else 405
            writer.write(response_head(code))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ssl.SSLError):
            # Clients of the lab often reset, time out or hang up early: not an error.
            pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
            except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
                pass

    return handle


# HTTPS #######################################################################


def start_keygen(control: Path) -> subprocess.Popen[str] | None:
    """Start openssl on the self-signed certificate; None (and a message) without openssl.

    It runs while the sockets are bound (see finish_tls): the RSA key takes
    0.1 to 0.3 s, the better part of the start.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        print("services: openssl not found on PATH, HTTPS disabled", file=sys.stderr, flush=True)
        return None
    argv = [
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={CERT_NAME}", "-addext", f"subjectAltName=DNS:{CERT_NAME}",
        "-keyout", str(control / KEY_FILE), "-out", str(control / CERT_FILE),
    ]  # fmt: skip
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_tls(keygen: subprocess.Popen[str], control: Path) -> ssl.SSLContext:
    """Wait (bounded) for openssl; the server context with its certificate."""
    try:
        _, err = keygen.communicate(timeout=OPENSSL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        keygen.kill()
        keygen.communicate()
        raise RuntimeError(f"openssl took longer than {OPENSSL_TIMEOUT_S}s") from None
    if keygen.returncode != 0:
        raise RuntimeError(f"openssl failed (rc={keygen.returncode}): {err.strip()}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(control / CERT_FILE, control / KEY_FILE)
    return ctx


# DNS #########################################################################


def _question_end(query: bytes) -> int | None:
    """Offset just past the single question's QTYPE and QCLASS, or None if malformed."""
    pos = DNS_HEADER.size
    for _ in range(MAX_LABELS):
        if pos >= len(query):
            return None
        length = query[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0:  # a compression pointer has no place in a lone question
            return None
        pos += 1 + length
        if pos - DNS_HEADER.size > MAX_NAME_BYTES:
            return None
    else:
        return None
    pos += 4
    return pos if pos <= len(query) else None


def dns_reply(query: bytes, mode: str) -> bytes | None:
    """The reply to one UDP query in the given mode; None for no reply.

    Extra sections of the query (e.g. an EDNS OPT record) are ignored, and
    the reply has none: what a server without EDNS support does.
    """
    if len(query) < DNS_HEADER.size or mode == "silent":
        return None
    qid, flags, qdcount, _an, _ns, _ar = DNS_HEADER.unpack_from(query)
    if flags & FLAG_QR:
        return None  # a response, not a query
    opcode = (flags >> 11) & 0xF
    reply_flags = FLAG_QR | (opcode << 11) | (flags & FLAG_RD) | FLAG_RA
    end = _question_end(query) if qdcount == 1 else None
    if end is None:
        return DNS_HEADER.pack(qid, reply_flags | RCODE_FORMERR, 0, 0, 0, 0)
    question = query[DNS_HEADER.size : end]
    qtype, qclass = struct.unpack_from("!HH", query, end - 4)
    answers: list[bytes] = []
    if opcode != 0:
        rcode = RCODE_NOTIMP
    elif mode == "servfail":
        rcode = RCODE_SERVFAIL
    elif mode == "nxdomain":
        rcode = RCODE_NXDOMAIN
    else:
        rcode = 0
        rdata = {QTYPE_A: ANSWER_A, QTYPE_AAAA: ANSWER_AAAA}.get(qtype)
        if rdata is not None and qclass == QCLASS_IN:
            packed = ipaddress.ip_address(rdata).packed
            # Name: a pointer to the question's name at offset 12.
            answers.append(
                b"\xc0\x0c" + struct.pack("!HHIH", qtype, QCLASS_IN, ANSWER_TTL, len(packed)) + packed
            )
    header = DNS_HEADER.pack(qid, reply_flags | rcode, 1, len(answers), 0, 0)
    return header + question + b"".join(answers)


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self, control: Path) -> None:
        self.control = control

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is not a DatagramTransport subclass on every
        # Python version, hence a cast rather than an isinstance check.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = dns_reply(data, dns_mode(self.control))
        if reply is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # e.g. an ICMP port unreachable for an earlier reply: the client gave up


# Main ########################################################################


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Clients that hang up mid-handshake are routine in the lab, not news.
    if isinstance(context.get("exception"), OSError):
        return
    loop.default_exception_handler(context)


#: From linux/in.h and linux/in6.h (Python does not export them): bind to an
#: address the namespace does not have yet.
IP_FREEBIND: Final = 15
IPV6_FREEBIND: Final = 78


def bound_socket(host: str, port: int, kind: socket.SocketKind) -> socket.socket:
    """A socket bound to host:port, even before host is assigned (FREEBIND).

    So the lab can start this process as soon as inet exists, and the
    certificate is made while the rest of the lab is built.
    """
    v6 = ipaddress.ip_address(host).version == 6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Sockets(NamedTuple):
    http: list[socket.socket]
    https: list[socket.socket]
    dns: list[socket.socket]


def bind_all(hosts: Sequence[str], http_port: int, https_port: int | None, dns_port: int) -> Sockets:
    """Every listening socket; HTTPS ones only if https_port is not None."""
    sockets = Sockets([], [], [])
    try:
        for host in hosts:
            sockets.http.append(bound_socket(host, http_port, socket.SOCK_STREAM))
            if https_port is not None:
                sockets.https.append(bound_socket(host, https_port, socket.SOCK_STREAM))
            sockets.dns.append(bound_socket(host, dns_port, socket.SOCK_DGRAM))
    except BaseException:
        for sock in (*sockets.http, *sockets.https, *sockets.dns):
            sock.close()
        raise
    return sockets


async def serve(sockets: Sockets, tls: ssl.SSLContext | None, control: Path) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_exception_handler)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    handler = make_http_handler(control)
    servers: list[asyncio.AbstractServer] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        for sock in sockets.http:
            servers.append(await asyncio.start_server(handler, sock=sock, limit=MAX_HEAD_BYTES))
        for sock in sockets.https:
            servers.append(
                await asyncio.start_server(
                    handler, sock=sock, limit=MAX_HEAD_BYTES, ssl=tls, ssl_handshake_timeout=REQUEST_TIMEOUT_S
                )
            )
        for sock in sockets.dns:
            udp, _ = await loop.create_datagram_endpoint(lambda: DnsServer(control), sock=sock)
            transports.append(udp)
        print("ready", flush=True)
        await stop.wait()
    finally:
        for transport in transports:
            transport.close()
        for server in servers:
            server.close()
        # Since 3.12 wait_closed() also waits for open client connections.
        for server in servers:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=CLOSE_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--host", required=True, action="append", help="address to listen on; repeat for several"
    )
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--https-port", type=int, default=443)
    parser.add_argument("--dns-port", type=int, default=53)
    parser.add_argument("--control", required=True, type=Path, help="directory of the control files")
    args = parser.parse_args(argv)
    for name in ("http_port", "https_port", "dns_port"):
        port = getattr(args, name)
        if not 0 < port < 65536:
            parser.error(f"--{name.replace('_', '-')} must be 1..65535, got {port}")
    if len(args.host) > MAX_HOSTS:
        parser.error(f"at most {MAX_HOSTS} --host, got {len(args.host)}")
    for host in args.host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            parser.error(f"--host must be an IP address, got {host!r}")
    if not args.control.is_dir():
        parser.error(f"--control {args.control} is not a directory")
    keygen = start_keygen(args.control)
    try:
        https_port = args.https_port if keygen is not None else None
        sockets = bind_all(args.host, args.http_port, https_port, args.dns_port)
        tls = finish_tls(keygen, args.control) if keygen is not None else None
    finally:
        if keygen is not None and keygen.poll() is None:
            keygen.kill()
            keygen.wait()
    asyncio.run(serve(sockets, tls, args.control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
