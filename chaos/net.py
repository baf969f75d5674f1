"""Where the chaos cluster's processes live on the network, and how we cut them apart.

Two layouts:

* :class:`Namespaces` -- one Linux network namespace per *host* (each PostgreSQL node, each etcd
  member), all plugged into a bridge inside a *hub* namespace.  The runner itself (writer, probes,
  checks) runs in the hub at ``.1``, so it always reaches every host: a partitioned old primary
  stays reachable by clients, which is exactly the case where a split brain would show.
* :class:`Loopback` -- everything on 127.0.0.1 with distinct ports, for machines where namespaces
  cannot be created.  Scenarios that need a partition are skipped there (and say so).

Partitions use policy-routing rules (``ip rule ... blackhole``) rather than iptables: iproute2 is
on every Debian machine, and a rule that matches on the *source* address drops packets silently
on input, so a cut-off peer sees timeouts (not "connection refused"), like a real network
failure.  The default ``lookup local`` rule (priority 0) is moved behind our rules, otherwise
packets for local addresses would never reach them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

PREFIX = "hkc"  # every namespace we create starts with this
SUBNET = "10.213.0"  # inside our own namespaces only; the host's own routing never sees it
HUB_IP = f"{SUBNET}.1"
BLOCK_PREF = 10  # priority of partition rules (before "lookup local" at 100)


class NetError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and res.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


@dataclass
class Host:
    name: str  # node1, etcd1, ...
    ip: str
    netns: str | None  # None: loopback layout

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs, so the PID is
        the program's own)."""
        return argv if self.netns is None else ["ip", "netns", "exec", self.netns, *argv]


@dataclass
class Loopback:
    """Every host on 127.0.0.1; no partitions."""

    hosts: dict[str, Host] = field(default_factory=dict)
    can_partition: bool = False
    kind: str = "loopback"

    def add(self, name: str) -> Host:
        h = Host(name, "127.0.0.1", None)
        self.hosts[name] = h
        return h

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def block(self, a: str, b: str) -> None:
        raise NetError("partitions need network namespaces (loopback layout)")

    def heal(self) -> None:
        pass

    def hub_argv(self, argv: list[str]) -> list[str]:
        return argv


@dataclass
class Namespaces:
    """A hub namespace with a bridge, and one namespace + veth per host."""

    token: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)
    blocked: set[tuple[str, str]] = field(default_factory=set)
    can_partition: bool = True
    kind: str = "netns"

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.token}-hub"

    def add(self, name: str) -> Host:
        n = len(self.hosts) + 11
        h = Host(name, f"{SUBNET}.{n}", f"{PREFIX}{self.token}-{name}")
        self.hosts[name] = h
        return h

    def setup(self) -> None:
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, h in enumerate(self.hosts.values()):
                assert h.netns is not None
                _ip("netns", "add", h.netns)
                port = f"p{i}"
                _ip(
                    "link",
                    "add",
                    "eth0",
                    "netns",
                    h.netns,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    port,
                    "netns",
                    self.hub,
                )
                _ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
                _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
                _ip("-n", h.netns, "link", "set", "eth0", "up")
                self._move_local_rule(h.netns)
            self._move_local_rule(self.hub)
        except BaseException:
            self.teardown()
            raise

    @staticmethod
    def _move_local_rule(ns: str) -> None:
        _ip("-n", ns, "rule", "add", "pref", "100", "lookup", "local")
        _ip("-n", ns, "rule", "del", "pref", "0")

    def teardown(self) -> None:
        for ns in [*(h.netns for h in self.hosts.values() if h.netns), self.hub]:
            _ip("netns", "del", ns, check=False)

    def _ns_of(self, name: str) -> tuple[str, str]:
        if name == "hub":
            return self.hub, HUB_IP
        h = self.hosts[name]
        assert h.netns is not None
        return h.netns, h.ip

    def block(self, a: str, b: str) -> None:
        """Drop every packet between hosts ``a`` and ``b`` (both directions, silently)."""
        ns_a, ip_a = self._ns_of(a)
        ns_b, ip_b = self._ns_of(b)
        _ip("-n", ns_a, "rule", "add", "pref", str(BLOCK_PREF), "from", ip_b, "blackhole")
        _ip("-n", ns_b, "rule", "add", "pref", str(BLOCK_PREF), "from", ip_a, "blackhole")
        self.blocked.add((a, b))

    def heal(self) -> None:
        for a, b in sorted(self.blocked):
            ns_a, ip_a = self._ns_of(a)
            ns_b, ip_b = self._ns_of(b)
            _ip("-n", ns_a, "rule", "del", "pref", str(BLOCK_PREF), "from", ip_b, "blackhole", check=False)
            _ip("-n", ns_b, "rule", "del", "pref", str(BLOCK_PREF), "from", ip_a, "blackhole", check=False)
        self.blocked.clear()

    def hub_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hub, *argv]


def namespaces_available() -> str | None:
    """None if we can create network namespaces here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip program (iproute2) is missing"
    probe = f"{PREFIX}probe{secrets.token_hex(2)}"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"ip netns add failed: {res.stderr.strip()}"
    try:
        res = _ip("-n", probe, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", check=False)
        if res.returncode != 0:
            return f"cannot create veth pairs: {res.stderr.strip()}"
        return None
    finally:
        _ip("netns", "del", probe, check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete every namespace of ours (left by a runner that was killed); their names."""
    res = _ip("netns", "list", check=False)
    gone = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            with contextlib.suppress(NetError):
                _ip("netns", "del", name)
                gone.append(name)
    return gone
