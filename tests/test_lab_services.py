"""Lab tests of the inet services (HTTP, HTTPS, DNS) and of the uplink changes
(ISP renumbering, proxy ARP for a gateway-less uplink).

Clients run in the router namespace as small Python snippets (CLIENT below)
with the test's own interpreter: standard library only, like the lab.
"""

from __future__ import annotations

import re
import shutil
import sys
import time

import pytest
from lab import (
    DNS_PORT,
    HTTP_PORT,
    HTTPS_CERT_NAME,
    HTTPS_PORT,
    ISPS,
    LAN_GATEWAY,
    PORTAL_URL,
    PROBE_TARGETS,
    SERVER_IP,
    SERVER_IP6,
    Lab,
    LabError,
)

pytestmark = pytest.mark.lab

#: Run as `python -c CLIENT <command> args...`; prints one line.
#:   http IP PORT HOST [CAFILE SNI]  -> "<status> <location or ->"  (HTTPS if CAFILE is given)
#:   dns IP PORT QTYPE NAME TIMEOUT  -> "<rcode> <qr> <ra> <rd> <answers, comma-separated or ->" or "timeout"
CLIENT = r"""
import ipaddress, random, socket, ssl, struct, sys

def http(ip, port, host, cafile=None, sni=None):
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.create_connection((ip, int(port)), timeout=3) as raw:
        sock = raw
        if cafile:
            ctx = ssl.create_default_context(cafile=cafile)
            sock = ctx.wrap_socket(raw, server_hostname=sni)
        sock.sendall(f"GET /generate_204 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.decode("latin-1").split("\r\n\r\n", 1)[0].split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    assert headers.get("Content-Length") == "0", headers
    print(head[0].split()[1], headers.get("Location", "-"))

def dns(ip, port, qtype, name, timeout):
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    qtype_n = {"A": 1, "AAAA": 28, "MX": 15}[qtype]
    qid = random.randrange(65536)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    question += struct.pack("!HH", qtype_n, 1)
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(float(timeout))
        s.sendto(query, (ip, int(port)))
        try:
            data = s.recv(4096)
        except socket.timeout:
            print("timeout")
            return
    rid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    assert rid == qid and qd == 1 and data[12:12 + len(question)] == question, data
    pos, answers = 12 + len(question), []
    for _ in range(an):
        assert data[pos:pos + 2] == b"\xc0\x0c", data
        atype, aclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos + 2)
        assert (atype, aclass, ttl) == (qtype_n, 1, 1), (atype, aclass, ttl)
        answers.append(str(ipaddress.ip_address(data[pos + 12:pos + 12 + rdlen])))
        pos += 12 + rdlen
    assert pos == len(data), data
    print(flags & 0xF, flags >> 15, (flags >> 7) & 1, (flags >> 8) & 1, ",".join(answers) or "-")

globals()[sys.argv[1]](*sys.argv[2:])
"""


def client(lab: Lab, *args: str) -> str:
    return lab.run("router", sys.executable, "-c", CLIENT, *args, timeout=15).stdout.strip()


def http_get(lab: Lab, ip: str = SERVER_IP, host: str = HTTPS_CERT_NAME) -> str:
    return client(lab, "http", ip, str(HTTP_PORT), host)


def dns(lab: Lab, qtype: str = "A", ip: str = SERVER_IP, timeout: float = 2.0) -> str:
    return client(lab, "dns", ip, str(DNS_PORT), qtype, "connectivity-check.example", str(timeout))


def ping(lab: Lab, *args: str, wait_s: float = 1.0) -> bool:
    if shutil.which("ping") is None:
        pytest.fail("ping (iputils-ping) is not installed")
    return lab.run("router", "ping", "-n", "-c1", f"-W{wait_s:g}", *args, check=False).returncode == 0


def test_http_status_location_and_host(lab: Lab) -> None:
    assert lab.http_last_host() is None
    assert http_get(lab) == "204 -"
    assert lab.http_last_host() == "check.example"
    lab.set_http_status(302)
    assert http_get(lab, host="other.example") == f"302 {PORTAL_URL}"
    assert lab.http_last_host() == "other.example"
    lab.set_http_status(200)
    assert http_get(lab, ip=SERVER_IP6) == "200 -"
    assert lab.http_last_host() == "check.example"
    with pytest.raises(LabError):
        lab.set_http_status(99)


def test_https_verifies_with_generated_ca(lab: Lab) -> None:
    ca_file = lab.https_ca_file()
    if ca_file is None:
        pytest.skip("openssl is not installed, so the lab runs no HTTPS service")
    https = ("http", SERVER_IP, str(HTTPS_PORT), "check.example", str(ca_file))
    assert client(lab, *https, HTTPS_CERT_NAME) == "204 -"
    lab.set_http_status(302)
    assert client(lab, *https, HTTPS_CERT_NAME) == f"302 {PORTAL_URL}"
    # The certificate is for check.example only.
    wrong_name = lab.run("router", sys.executable, "-c", CLIENT, *https, "other.example", check=False)
    assert wrong_name.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in wrong_name.stderr


def test_dns_modes(lab: Lab) -> None:
    # rcode, QR, RA, RD (copied from the query), answers.
    assert dns(lab) == f"0 1 1 1 {SERVER_IP}"
    assert dns(lab, "AAAA") == f"0 1 1 1 {SERVER_IP6}"
    assert dns(lab, "MX") == "0 1 1 1 -"
    assert dns(lab, "A", ip=SERVER_IP6) == f"0 1 1 1 {SERVER_IP}"
    lab.set_dns_mode("servfail")
    assert dns(lab) == "2 1 1 1 -"
    assert dns(lab, "AAAA", ip=SERVER_IP6) == "2 1 1 1 -"
    lab.set_dns_mode("nxdomain")
    assert dns(lab) == "3 1 1 1 -"
    lab.set_dns_mode("silent")
    started = time.monotonic()
    assert dns(lab, timeout=0.5) == "timeout"
    assert dns(lab, ip=SERVER_IP6, timeout=0.5) == "timeout"
    assert time.monotonic() - started < 10
    lab.set_dns_mode("ok")
    assert dns(lab, "AAAA", ip=SERVER_IP6) == f"0 1 1 1 {SERVER_IP6}"
    with pytest.raises(LabError):
        lab.set_dns_mode("refused")


def _mentions(text: str, ip: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(ip)}(?![\d])", text) is not None


def test_renumber_isp2(lab: Lab) -> None:
    old_ip, old_gw = ISPS["isp2"].router_ip, ISPS["isp2"].gateway
    monitor = lab.monitor_routes("router")
    before = time.monotonic()
    done = lab.renumber_isp2()
    assert before < done <= time.monotonic()

    addrs = [a["local"] for a in lab.ip_json("router", "-4", "addr", "show", "dev", "wan1")[0]["addr_info"]]
    assert addrs == ["203.0.113.10"]
    wan1_defaults = [r for r in lab.default_routes() if r["dev"] == "wan1"]
    assert [(r["gateway"], r["protocol"], r["metric"]) for r in wan1_defaults] == [
        ("203.0.113.9", "dhcp", 200)
    ]
    # Add the new default, then delete the old one: never without a default on wan1.
    defaults = [(e.deleted, e.route.split()[2]) for e in monitor.stop() if e.is_default and e.family == 4]
    assert defaults == [(False, "203.0.113.9"), (True, old_gw)]

    isp1_t1 = lab.counter("isp1", "t1")
    assert ping(lab, "-I", "203.0.113.10", PROBE_TARGETS[0])
    # That ping follows main's metric-100 default out of wan0 (and the lab's
    # masquerade rewrites its source to wan0's address), so it proves little
    # about isp2. Bound to wan1 it takes the new default through isp2, whose
    # BCP38 accepts the new address.
    assert lab.counter("isp1", "t1") == isp1_t1 + 1
    t1_before = lab.counter("isp2", "t1")
    assert ping(lab, "-I", "wan1", PROBE_TARGETS[0])
    assert lab.counter("isp2", "t1") == t1_before + 1
    assert lab.counter("isp2", "spoofed") == 0

    state = "".join(
        lab.ip("router", "-4", *what) for what in (("addr",), ("route", "show", "table", "all"), ("rule",))
    )
    assert not _mentions(state, old_ip) and not _mentions(state, old_gw)
    assert lab.ip_json("inet", "route", "show", "203.0.113.8/30")
    # The old lease is gone at the ISP: its gateway no longer answers.
    assert not _mentions(lab.ip("isp2", "-4", "addr", "show", "dev", "cpe"), old_gw)


def test_renumber_isp2_back_and_forth_keeps_lan_working(lab: Lab) -> None:
    assert lab.connect_once() == ISPS["isp1"].router_ip
    lab.ip("router", "route", "del", "default", "metric", "100")  # only isp2 left
    assert lab.connect_once() == ISPS["isp2"].router_ip
    lab.renumber_isp2()
    assert lab.connect_once() == "203.0.113.10"
    lab.renumber_isp2(ISPS["isp2"].router_ip, ISPS["isp2"].gateway)
    assert lab.connect_once() == ISPS["isp2"].router_ip
    assert lab.counter("isp2", "spoofed") == 0
    # The BCP38 rule, rewritten twice, still drops and counts a foreign source
    # (untracked packets skip NAT and leave wan1 with the LAN address).
    lab.nft(
        "router",
        "table ip spooftest {\n"
        "  chain out {\n"
        "    type filter hook output priority raw; policy accept;\n"
        f"    ip daddr {PROBE_TARGETS[1]} notrack\n"
        "  }\n"
        "}\n",
    )
    assert not ping(lab, "-I", LAN_GATEWAY, PROBE_TARGETS[1], wait_s=0.3)
    assert lab.counter("isp2", "spoofed") == 1
    with pytest.raises(LabError):
        lab.renumber_isp2("203.0.113.1", "203.0.113.2")  # isp1's net


def test_proxy_arp_makes_gateway_less_uplink_work(lab: Lab) -> None:
    lab.ip("router", "route", "replace", "default", "dev", "wan0", "metric", "100")
    assert [r.get("gateway") for r in lab.default_routes() if r["dev"] == "wan0"] == [None]
    # Without proxy ARP, nobody on wan0's link answers for 198.18.1.1.
    lab.enable_proxy_arp("isp1", False)
    assert not ping(lab, "-I", "wan0", PROBE_TARGETS[0], wait_s=0.3)
    lab.enable_proxy_arp("isp1", True)
    lab.ip("router", "neigh", "flush", "dev", "wan0")
    assert ping(lab, "-I", "wan0", PROBE_TARGETS[0])
    assert lab.connect_once() == ISPS["isp1"].router_ip
