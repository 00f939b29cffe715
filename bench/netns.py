"""A shaped LAN of network namespaces for the sync bench: a bridge, one veth per member.

Why namespaces and ``tc`` rather than loopback: on loopback every byte moves at memory
speed, so nothing shows whether the sync keeps every link busy. Here each member (the Hub,
each simulated Mac) has its own namespace and one veth to a bridge in the root namespace
(where the controller runs), and ``netem`` (or ``tbf`` where the kernel lacks netem: then
without the delay) shapes both directions of each veth: what a member sends and what it
receives are each limited to its link rate.

Addresses are ``10.77.0.0/16`` (the range reserved for this bench): the bridge is
``10.77.0.1``. Needs root (``ip``, ``tc``). `Lan.down` removes everything `Lan.up` made,
and `up` first removes what a crashed run left under the same prefix.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BRIDGE_ADDRESS", "NETEM", "Lan", "Member"]

BRIDGE_ADDRESS = "10.77.0.1"
PREFIX_LEN = 16


@dataclass(frozen=True)
class Member:
    """One namespace on the LAN: its name, addresses (the first is its main one) and link."""

    netns: str
    addresses: tuple[str, ...]
    rate_mbit: int
    delay_ms: float


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True)


def netem_available() -> bool:
    """Whether this kernel has ``sch_netem`` (the one qdisc that adds delay)."""
    probe = subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True,
                       check=False)
    return probe.returncode == 0


def _shape(rate_mbit: int, delay_ms: float) -> tuple[str, ...]:
    """The qdisc of one direction of a link: ``netem`` (rate and half the round trip) where
    the kernel has it, else ``tbf`` (rate only; the bench says the delay is missing). The
    burst is two ticks' worth at the rate (at HZ 250), so the rate holds with GSO packets."""
    if NETEM:
        return ("netem", "delay", f"{delay_ms / 2}ms", "rate", f"{rate_mbit}mbit",
                "limit", "100000")
    burst = max(256 << 10, rate_mbit * 1_000_000 // 8 // 125)
    return ("tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "20ms")


NETEM = netem_available()


@dataclass
class Lan:
    """The bridge ``<prefix>br`` and one namespace ``<prefix>-<name>`` per member."""

    prefix: str = "orchb"
    members: list[Member] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def up(self, specs: Sequence[tuple[str, Sequence[str], int, float]]) -> list[Member]:
        """Create the bridge and a shaped member per ``(name, addresses, Mbit/s, delay ms)``."""
        self.down()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/{PREFIX_LEN}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (name, addresses, rate, delay) in enumerate(specs):
            member = Member(f"{self.prefix}-{name}", tuple(addresses), rate, delay)
            outside, inside = f"{self.prefix}{i}h", f"{self.prefix}{i}n"
            _ip("netns", "add", member.netns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", member.netns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            ns = ("-n", member.netns)
            _ip(*ns, "link", "set", "lo", "up")
            for address in addresses:
                _ip(*ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", inside)
            _ip(*ns, "link", "set", inside, "up")
            shape = _shape(rate, delay)
            _tc("qdisc", "add", "dev", outside, "root", *shape)  # into the member
            _tc("-n", member.netns, "qdisc", "add", "dev", inside, "root", *shape)  # out of it
            self.members.append(member)
        return list(self.members)

    def down(self) -> None:
        """Remove the bridge and every namespace under the prefix (a veth goes with its ns)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=False).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{self.prefix}-"):
                _ip("netns", "del", name, check=False)
        _ip("link", "del", self.bridge, check=False)
        self.members.clear()
