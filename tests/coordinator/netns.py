"""A private network of Linux network namespaces, for partition tests.

Killing or freezing a process is not a partition: the victim's peers see its sockets
close, and the victim itself sees nothing at all. Here every member (a node, a site)
gets its own namespace and address, all joined by one bridge in a hub namespace, and
`cut` drops the traffic between chosen members with blackhole routes on both sides,
so packets vanish silently the way they do when a switch or a link dies. The root
namespace (the test process, sites left in it) gets one veth into the bridge and is
never cut. Only `ip` (iproute2) and root are needed; no firewall tools.

Everything created is recorded and removed by `down`, also after a half-built `up`.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

PREFIX = "fedraft-part"
BRIDGE = "br0"


class NetnsUnavailable(RuntimeError):
    """This machine cannot build the namespaces (not root, no iproute2, no veth)."""


def _ip_binary() -> str:
    path = shutil.which("ip")
    if path is None:
        raise NetnsUnavailable("iproute2's `ip` command is not installed")
    return path


def _free_subnet() -> str:
    """A 10.213.N.0/24 no address or route of the root namespace overlaps, so the test
    never shadows a real network (or a concurrent run of itself)."""
    ip = _ip_binary()
    used = subprocess.run([ip, "-4", "-o", "addr", "show"], capture_output=True, text=True,
                          check=False).stdout
    used += subprocess.run([ip, "-4", "route", "show", "table", "all"], capture_output=True,
                           text=True, check=False).stdout
    start = os.getpid() % 200
    for i in range(250):
        n = 20 + (start + i) % 230
        if f"10.213.{n}." not in used:
            return f"10.213.{n}.0/24"
    raise NetnsUnavailable("no free 10.213.N.0/24 subnet")


@dataclass
class Fabric:
    """Members on one bridged /24, each in its own namespace; see the module docstring."""

    members: list[str]
    tag: str = field(default_factory=lambda: f"{PREFIX}-{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)  # created, in order
    root_link: str | None = None  # the root namespace's end of its veth, once created
    cuts: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.ip = _ip_binary()
        self.subnet = ipaddress.ip_network(_free_subnet())
        hosts = list(self.subnet.hosts())
        self.host_address = str(hosts[0])
        self.addresses = {m: str(hosts[10 + i]) for i, m in enumerate(self.members)}
        self.hub = f"{self.tag}-hub"

    # ------------------------------------------------------------ names

    def ns(self, member: str) -> str:
        return f"{self.tag}-{member}"

    def exec_prefix(self, member: str) -> list[str]:
        """argv prefix that runs a command inside `member`'s namespace; `ip netns exec`
        execs in place, so the pid Popen returns is the command's own."""
        return [self.ip, "netns", "exec", self.ns(member)]

    def _run(self, *args: str) -> None:
        proc = subprocess.run([self.ip, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")

    def _add_ns(self, name: str) -> None:
        self._run("netns", "add", name)
        self.namespaces.append(name)
        self._run("-n", name, "link", "set", "dev", "lo", "up")

    # ------------------------------------------------------------ lifecycle

    def up(self) -> None:
        """Build the hub, its bridge, one namespace per member and the root's veth.
        Raises NetnsUnavailable (after undoing what it made) if any step fails."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        plen = self.subnet.prefixlen
        try:
            self._add_ns(self.hub)
            self._run("-n", self.hub, "link", "add", BRIDGE, "type", "bridge")
            self._run("-n", self.hub, "link", "set", "dev", BRIDGE, "up")
            for m in self.members:
                ns, port = self.ns(m), f"v{m}"
                self._add_ns(ns)
                self._run("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                          "netns", self.hub)
                self._attach(port)
                self._run("-n", ns, "addr", "add", f"{self.addresses[m]}/{plen}", "dev", "eth0")
                self._run("-n", ns, "link", "set", "dev", "eth0", "up")
            link = f"frp{os.getpid()}"
            self._run("link", "add", link, "type", "veth", "peer", "name", "vhost", "netns",
                      self.hub)
            self.root_link = link
            self._attach("vhost")
            self._run("addr", "add", f"{self.host_address}/{plen}", "dev", link)
            self._run("link", "set", "dev", link, "up")
        except NetnsUnavailable:
            self.down()
            raise

    def _attach(self, port: str) -> None:
        self._run("-n", self.hub, "link", "set", "dev", port, "master", BRIDGE)
        self._run("-n", self.hub, "link", "set", "dev", port, "up")

    def down(self) -> list[str]:
        """Remove the root veth and every namespace made here (their links go with them);
        returns what could not be removed, so a caller can fail loudly about leaks."""
        leaks = []
        if self.root_link is not None:
            proc = subprocess.run([self.ip, "link", "del", self.root_link], capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0 and "Cannot find device" not in proc.stderr:
                leaks.append(f"link {self.root_link}: {proc.stderr.strip()}")
            self.root_link = None
        for name in reversed(self.namespaces):
            proc = subprocess.run([self.ip, "netns", "del", name], capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                leaks.append(f"netns {name}: {proc.stderr.strip()}")
        self.namespaces.clear()
        self.cuts.clear()
        return leaks

    # ------------------------------------------------------------ partitions

    def cut(self, member: str, others: Iterable[str]) -> None:
        """Drop all traffic between `member` and each of `others`, in both directions."""
        for other in others:
            for a, b in ((member, other), (other, member)):
                self._run("-n", self.ns(a), "route", "add", "blackhole",
                          f"{self.addresses[b]}/32")
                self.cuts.add((a, b))

    def heal(self) -> None:
        """Undo every cut."""
        for a, b in sorted(self.cuts):
            self._run("-n", self.ns(a), "route", "del", "blackhole", f"{self.addresses[b]}/32")
        self.cuts.clear()
