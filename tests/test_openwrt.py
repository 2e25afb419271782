"""The OpenWrt feed packages, checked without an SDK (none can be downloaded here): the
init script under busybox ash and shellcheck, what it registers with procd (stubbed), and
the Makefile's DEPENDS against the modules the agent imports."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "openwrt" / "multiwan-agent"
INIT = PACKAGE / "files" / "multiwan-agent.init"
LAUNCHER = PACKAGE / "files" / "multiwan-agent"

#: Where OpenWrt's stdlib split puts a module (lang/python/python3/files/python3-package-*.mk);
#: everything else is in python3-light. statistics imports decimal (python3-decimal).
OPENWRT_STDLIB: dict[str, str] = {
    "asyncio": "python3-asyncio",
    "logging": "python3-logging",
    "urllib": "python3-urllib",
    "email": "python3-urllib",
    "ssl": "python3-openssl",
    "statistics": "python3-decimal",
    "decimal": "python3-decimal",
    "ctypes": "python3-ctypes",
    "sqlite3": "python3-sqlite3",
    "multiprocessing": "python3-multiprocessing",
}
#: The agent's own third-party imports, and the feed packages that carry them.
THIRD_PARTY: dict[str, str | None] = {
    "pyroute2": "python3-pyroute2",
    "icmplib": "python3-icmplib",
    # Optional, and absent from every OpenWrt branch: the agent works without them.
    "sdnotify": None,
    "tomli_w": None,
    "tomli": None,  # Python 3.10 only; OpenWrt has 3.11+ (tomllib)
    # Imported only to trim glibc's heap; musl (OpenWrt) has no malloc_trim and needs none.
    "ctypes": None,
}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (.ci/run installs it)"
    return path


def test_the_init_script_and_launcher_pass_busybox_ash_and_shellcheck() -> None:
    for script in (INIT, LAUNCHER):
        ash = subprocess.run(
            [tool("busybox"), "ash", "-n", str(script)], capture_output=True, text=True, timeout=30
        )
        assert ash.returncode == 0, ash.stderr
        lint = subprocess.run(
            [tool("shellcheck"), "-s", "sh", str(script)], capture_output=True, text=True, timeout=60
        )
        assert lint.returncode == 0, lint.stdout


def test_the_init_script_registers_respawn_the_config_file_and_the_reload_signal() -> None:
    stubs = """
procd_open_instance() { echo "open $*"; }
procd_close_instance() { echo "close"; }
procd_set_param() { echo "param $*"; }
procd_send_signal() { echo "signal $*"; }
"""
    script = f"{stubs}\n. {INIT}\nstart_service\necho START=$START STOP=$STOP USE_PROCD=$USE_PROCD\n"
    out = subprocess.run([tool("busybox"), "ash", "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].strip() == "open" and "close" in lines
    params = {line.split()[1]: line.split()[2:] for line in lines if line.startswith("param ")}
    assert params["command"] == ["/usr/bin/multiwan-agent", "run", "-c", "/etc/multiwan-agent/multiwan.toml"]
    assert params["respawn"] == ["3600", "5", "5"]
    assert params["file"] == ["/etc/multiwan-agent/multiwan.toml"]
    assert params["reload_signal"] == ["HUP"]
    assert params["stdout"] == ["1"] and params["stderr"] == ["1"]
    assert int(params["term_timeout"][0]) >= 2
    assert lines[-1] == "START=95 STOP=10 USE_PROCD=1"


def agent_imports() -> set[str]:
    """Every top-level module multiwan_agent.py imports, at module level or inside functions."""
    tree = ast.parse((ROOT / "multiwan_agent.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - {"__future__"}


# OpenWrt's Python is 3.11 or newer: tomllib is in its stdlib even when this suite runs on 3.10.
OPENWRT_PYTHON_STDLIB = sys.stdlib_module_names | {"tomllib"}


def test_depends_are_exactly_the_python_packages_the_module_imports() -> None:
    makefile = (PACKAGE / "Makefile").read_text()
    depends = re.search(r"^\s+DEPENDS:=((?:.*\\\n)*.*)", makefile, re.MULTILINE)
    assert depends is not None
    declared = set(re.findall(r"\+([\w.-]+)", depends.group(1)))
    wanted = {"python3-light"}
    for module in agent_imports():
        if module in THIRD_PARTY:
            package = THIRD_PARTY[module]
            if package is not None:
                wanted.add(package)
        else:
            assert module in OPENWRT_PYTHON_STDLIB, f"{module}: neither stdlib nor known third-party"
            wanted.add(OPENWRT_STDLIB.get(module, "python3-light"))
    # asyncio needs logging on OpenWrt (python3-asyncio depends on python3-light only)
    wanted.add("python3-logging")
    assert {d for d in declared if d.startswith("python3-")} == wanted
    assert {"nftables", "kmod-nft-core", "kmod-nft-nat", "kmod-nf-conntrack-netlink"} <= declared
    include = "include $(TOPDIR)/feeds/packages/lang/python/python3-package.mk"
    assert include in makefile
    # python3-package.mk picks its recipes by PYTHON3_PKG_BUILD when it is read: set it before
    assert makefile.index("PYTHON3_PKG_BUILD:=0") < makefile.index(include)
    assert "$(eval $(call Py3Package,multiwan-agent))" in makefile
    assert "/etc/multiwan-agent/multiwan.toml" in makefile.split("conffiles")[1]


def test_the_icmplib_package_is_built_from_pypi() -> None:
    makefile = (ROOT / "openwrt" / "python3-icmplib" / "Makefile").read_text()
    assert "PYPI_NAME:=icmplib" in makefile and re.search(r"PKG_HASH:=[0-9a-f]{64}\n", makefile)
    order = [makefile.index(m) for m in ("pypi.mk", "$(INCLUDE_DIR)/package.mk", "python3-package.mk")]
    assert order == sorted(order)  # pypi.mk before package.mk, as pypi.mk requires
