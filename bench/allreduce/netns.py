"""An emulated two-host topology on one machine: two network namespaces joined by a veth pair whose two ends each
shape their egress (netem rate + delay; where the kernel has no netem, tbf at the same rate and no added delay), so
the pair behaves like one full-duplex inter-node link.

    with TwoHosts(rate="1gbit", delay="0.1ms") as net:
        net.exec_prefix(0)      # ["ip", "netns", "exec", "qcompile-hfr-<pid>-a"]
        net.addr[0], net.dev[0] # 10.213.7.1, the veth end inside host 0
        net.tx_bytes(0)         # that end's transmit counter

The namespaces have no other interface and no route out, so traffic stays between them (and their loopbacks).
Names carry the creating pid: :func:`sweep` removes those of dead creators; ``__exit__`` removes ours on every path
(deleting a namespace deletes the veth end inside it). Every ip/tc call is bounded in time. Needs root.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

PREFIX = "qcompile-hfr-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-[ab]$")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=20)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def sweep() -> list[str]:
    """Delete namespaces that an earlier, killed run of this benchmark left behind."""
    removed = []
    out = _run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


class TwoHosts:
    def __init__(self, rate: str = "1gbit", delay: str = "0.1ms", mtu: int = 9000, subnet: int | None = None):
        pid = os.getpid()
        self.rate, self.delay, self.mtu = rate, delay, mtu
        self.ns = (f"{PREFIX}{pid}-a", f"{PREFIX}{pid}-b")
        tag = f"{pid % 1_000_000:06d}"
        self.dev = (f"qch{tag}a", f"qch{tag}b")  # at most 15 characters
        octet = subnet if subnet is not None else 200 + pid % 50
        self.addr = (f"10.213.{octet}.1", f"10.213.{octet}.2")

    def __enter__(self) -> "TwoHosts":
        sweep()
        try:
            for ns in self.ns:
                _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
            for i in (0, 1):
                ns, dev = self.ns[i], self.dev[i]
                _run("ip", "link", "set", dev, "netns", ns)
                ex = ("ip", "netns", "exec", ns)
                _run(*ex, "ip", "link", "set", "lo", "up")
                _run(*ex, "ip", "addr", "add", f"{self.addr[i]}/24", "dev", dev)
                _run(*ex, "ip", "link", "set", dev, "mtu", str(self.mtu), "up")
                self.shaping = self._shape(ex, dev)
            _run("ip", "netns", "exec", self.ns[0], "ping", "-c", "1", "-W", "2", self.addr[1], check=False)
        except BaseException:
            self.close()
            raise
        return self

    def _shape(self, ex: tuple[str, ...], dev: str) -> str:
        netem = ("tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", self.delay, "rate", self.rate,
                 "limit", "10000")
        if _run(*ex, *netem, check=False).returncode == 0:
            return f"netem rate {self.rate} delay {self.delay}"
        # no netem in this kernel: a token bucket at the same rate (burst above the largest GSO packet), no delay
        _run(*ex, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate, "burst", "256kb",
             "latency", "20ms")
        return f"tbf rate {self.rate} (the kernel has no netem: no added delay)"

    def exec_prefix(self, host: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def tx_bytes(self, host: int) -> int:
        out = _run(*self.exec_prefix(host), "cat", f"/sys/class/net/{self.dev[host]}/statistics/tx_bytes").stdout
        return int(out)

    def qdisc(self, host: int) -> str:
        return _run(*self.exec_prefix(host), "tc", "qdisc", "show", "dev", self.dev[host]).stdout.strip()

    def close(self) -> None:
        for ns in self.ns:
            _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", self.dev[0], check=False)  # only if it never moved into a namespace

    def __exit__(self, *exc) -> None:
        self.close()
