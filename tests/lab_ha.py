"""A netns lab of two routers sharing one LAN: the HA pair, with keepalived's VRRP moving the
LAN's gateway 198.51.100.1 to the router that still has internet.

    lan eth0 198.51.100.10/24, default via the VIP 198.51.100.1
        |
    sw br0 (a bridge) -------------------------------------------
        |                                                      |
    ra lan0 198.51.100.2/24                        rb lan0 198.51.100.3/24
    ra wan0 203.0.113.2/30 -- ispa cpe .1          rb wan0 203.0.113.6/30 -- ispb cpe .5
                               ispa up 198.18.0.1 ----- inet ----- 198.18.0.5 up ispb

    inet lo: 198.18.1.1, 198.18.1.2 (probe targets), 198.18.1.10 (echo server :8080)

Each router masquerades out of its own uplink, so the server tells which router a LAN
connection went through. keepalived (Debian's 2.2.7, unpacked by .ci/run: KEEPALIVED_ROOT)
runs in each router namespace with its own config and pid files. IPv4 only.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Final

from lab import ISPS, Lab, LabError, _run, _sync_link_lines

HA_ROLES: Final = ("ra", "rb", "ispa", "ispb", "inet", "sw", "lan")
VIP: Final = "198.51.100.1"
#: Per router: its LAN address, its uplink address and gateway, and its ISP's transit pair.
ROUTERS: Final = {
    "ra": ("198.51.100.2", "203.0.113.2", "203.0.113.1", "ispa", "198.18.0.1", "198.18.0.2"),
    "rb": ("198.51.100.3", "203.0.113.6", "203.0.113.5", "ispb", "198.18.0.5", "198.18.0.6"),
}
#: Where .ci/run unpacks keepalived and its libraries (Debian's packages, not installed:
#: an installed keepalived would start its service on the host).
KEEPALIVED_ROOT: Final = Path(
    os.environ.get("KEEPALIVED_ROOT", Path(__file__).resolve().parent.parent / ".ci" / "keepalived")
)


def keepalived_command() -> tuple[list[str], dict[str, str]]:
    """argv prefix and environment to run the unpacked keepalived; raises LabError if missing."""
    binary = KEEPALIVED_ROOT / "usr" / "sbin" / "keepalived"
    if not binary.exists():
        raise LabError(f"keepalived is not unpacked in {KEEPALIVED_ROOT} (.ci/run does it)")
    libs = [
        KEEPALIVED_ROOT / "lib" / "x86_64-linux-gnu",
        KEEPALIVED_ROOT / "usr" / "lib" / "x86_64-linux-gnu",
    ]
    libs += [p for p in KEEPALIVED_ROOT.glob("usr/lib/*-linux-gnu*")]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(p) for p in libs))
    return [str(binary)], env


class HaLab(Lab):
    """Two routers, two ISPs, one LAN segment; see the module docstring."""

    def __init__(self) -> None:
        super().__init__(dhcp_defaults=True)
        self.ns = {role: self.prefix + role for role in HA_ROLES}

    def _isp(self, role: str) -> Any:
        if role not in ("ispa", "ispb"):
            raise LabError(f"not an ISP role: {role!r} (ispa or ispb)")
        return ISPS["isp1"]  # only its role name is used by the fault helpers

    def _build(self) -> None:
        for role in HA_ROLES:
            _run(["ip", "netns", "add", self.name(role)])
            self._created.append(self.name(role))
        sw = self.name("sw")
        self._ip_batch("sw", ["link add br0 type bridge", "link set br0 up", "link set lo up"])
        for role in ("ra", "rb"):
            isp = ROUTERS[role][3]
            self._ip_batch(
                role,
                [
                    f"link add lan0 type veth peer name {role} netns {sw}",
                    f"link add wan0 type veth peer name cpe netns {self.name(isp)}",
                ],
            )
            self._ip_batch(isp, [f"link add name up type veth peer name {isp} netns {self.name('inet')}"])
        self._ip_batch("lan", [f"link add eth0 type veth peer name lan netns {sw}"])
        self._ip_batch(
            "sw",
            [f"link set {p} master br0" for p in ("ra", "rb", "lan")]
            + [f"link set {p} up" for p in ("ra", "rb", "lan")],
        )
        for role in HA_ROLES:
            self.run(
                role,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            )
        inet_lines = ["link set lo up"] + [
            f"addr add {ip}/32 dev lo" for ip in ("198.18.1.1", "198.18.1.2", "198.18.1.10")
        ]
        for role, (lan_ip, wan_ip, gateway, isp, isp_up, inet_up) in ROUTERS.items():
            self.run(role, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv4.conf.wan0.rp_filter=0")
            self.run(isp, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            self._ip_batch(
                role,
                [
                    "link set lo up",
                    f"addr add {lan_ip}/24 dev lan0",
                    f"addr add {wan_ip}/30 dev wan0",
                    "link set lan0 up",
                    "link set wan0 up",
                ],
            )
            self._ip_batch(
                isp,
                [
                    "link set lo up",
                    f"addr add {gateway}/30 dev cpe",
                    f"addr add {isp_up}/30 dev up",
                    "link set dev cpe up",
                    "link set dev up up",
                ],
            )
            inet_lines += [f"addr add {inet_up}/30 dev {isp}", f"link set {isp} up"]
        self._ip_batch("inet", inet_lines)
        self._ip_batch("lan", ["link set lo up", "addr add 198.51.100.10/24 dev eth0", "link set eth0 up"])
        for role, (_, _, gateway, isp, isp_up, inet_up) in ROUTERS.items():
            net = "203.0.113.0/30" if role == "ra" else "203.0.113.4/30"
            self._ip_batch(
                role,
                [
                    *_sync_link_lines(["wan0", "lan0"]),
                    f"route add default via {gateway} dev wan0 proto dhcp metric 100",
                ],
            )
            self._ip_batch(isp, [*_sync_link_lines(["cpe", "up"]), f"route add default via {inet_up}"])
            self._ip_batch("inet", [*_sync_link_lines([isp]), f"route add {net} via {isp_up}"])
            self.nft(
                role,
                "table ip labnat {\n chain post {\n  type nat hook postrouting priority 100; policy accept;\n"
                '  oifname "wan0" masquerade\n }\n}\n',
            )
        self._ip_batch("lan", [*_sync_link_lines(["eth0"]), f"route add default via {VIP}"])
        self._start_echo_server("inet", ("198.18.1.10",))

    def vip_holder(self) -> str | None:
        """The router whose lan0 holds the VIP now (None: neither; "both" for the instant of a
        takeover, before the old master has seen the new one's advert)."""
        holders = [
            r for r in ("ra", "rb") if f"inet {VIP}/" in self.ip(r, "-4", "addr", "show", "dev", "lan0")
        ]
        if len(holders) > 1:
            return "both"
        return holders[0] if holders else None

    def start_keepalived(
        self, role: str, workdir: Path, priority: int, track_file: Path, preempt: bool = True
    ) -> subprocess.Popen[Any]:
        """keepalived in `role`: VRRP on lan0 for the VIP; a router whose agent's track file says it
        has no internet yields the VIP (see keepalived_config)."""
        config = workdir / f"keepalived-{role}.conf"
        config.write_text(keepalived_config(role, priority, track_file, preempt))
        argv, env = keepalived_command()
        log = open(workdir / f"keepalived-{role}.log", "w")
        return self.popen(
            role,
            [*argv, "-n", "-l", "-D", "-f", str(config), "-p", str(workdir / f"ka-{role}.pid"),
             "-r", str(workdir / f"ka-vrrp-{role}.pid"), "--vrrp"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_vip(self, role: str, timeout_s: float = 20.0) -> float:
        """Until `role` holds the VIP; the monotonic time it was seen there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.vip_holder() == role:
                return time.monotonic()
            time.sleep(0.02)
        raise LabError(f"the VIP never moved to {role} (held by {self.vip_holder()})")


def keepalived_config(role: str, priority: int, track_file: Path, preempt: bool) -> str:
    """The README's two-router config, for the lab (no notify scripts, no conntrackd)."""
    return f"""\
global_defs {{
    router_id {role}
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 2
}}

track_file multiwan {{
    file "{track_file}"
    # preempt: a router without internet advertises a priority 100 lower, and the other
    # takes over. nopreempt: a backup never takes over from a master of lower priority,
    # so weight 0 puts a router without internet into FAULT (it gives the VIP up).
    weight {-100 if preempt else 0}
    init_file 1
}}

vrrp_instance LAN {{
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority {priority}
    advert_int 1
    {"" if preempt else "nopreempt"}
    virtual_ipaddress {{
        {VIP}/24 dev lan0
    }}
    track_file {{
        multiwan
    }}
}}
"""
