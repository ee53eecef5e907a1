"""Who the client is, and whether one more connection of theirs is admitted (sans-IO).

- **The client's address.** The socket's peer, unless it is a trusted proxy: then the hops
  the proxies recorded are walked from the right (the nearest) and the first address that is
  not itself a trusted proxy is the client. The right-most untrusted entry, not the left-most:
  every proxy appends what it saw, so everything left of the entry our own proxies wrote may
  have been written by the client. A peer that is not trusted is its own address, whatever
  headers it sends (no spoofing). An entry that is not an address ends the walk at the last
  address before it.
- **Counts.** Connections open per address and per token subject, with optional limits.
- **New connections per address.** A token bucket per address (rate and burst).

The table of addresses is bounded: an entry goes when it has no open connection and its bucket
is full again (a full bucket is what a new address gets, so forgetting it changes nothing).
At ``max_addresses`` the least recently idle entry is forgotten early (counted: that address
gets a full bucket again); when every entry has an open connection, a new address is refused.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterable

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Reasons a connection is refused (the labels of odin_connections_rejected_total).
PER_IP = "per_ip"
IP_RATE = "ip_rate"
PER_SUBJECT = "per_subject"
ADDRESS_TABLE = "address_table"


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (``10.0.0.0/8``) or single addresses; ValueError naming the bad one."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or a network (CIDR)") from None
    return tuple(networks)


def parse_address(text: str) -> Address | None:
    """An address as a proxy writes it: ``1.2.3.4``, ``1.2.3.4:5678``, ``2001:db8::1``,
    ``[2001:db8::1]:443``, quoted or not; IPv4-mapped IPv6 as IPv4. None if it is not one."""
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of a ``Forwarded`` header (RFC 7239), in order."""
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, sep, item = pair.strip().partition("=")
            if sep and name.strip().lower() == "for":
                hops.append(item.strip())
    return hops


class TrustedProxies:
    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str | Address | None) -> bool:
        if not self.networks or address is None:
            return False
        parsed = parse_address(address) if isinstance(address, str) else address
        return parsed is not None and any(parsed in network for network in self.networks)

    def client(self, peer: str, hops: list[str]) -> str:
        """The client's address: ``peer`` (the connection's, or the PROXY header's source),
        or, if it is trusted, the right-most of ``hops`` (the forwarding header's entries,
        oldest first) that is not trusted."""
        current = parse_address(peer)
        if current is None or not self.trusts(current):
            return str(current) if current is not None else peer
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                break
            current = address
            if not self.trusts(address):
                break
        return str(current)


@attrs.define
class _Entry:
    open: int = 0
    tokens: float = 0.0
    stamp: float = 0.0


@attrs.frozen
class Limits:
    max_per_ip: int = 0
    max_per_subject: int = 0
    new_per_second: float = 0.0
    new_burst: int = 0
    max_addresses: int = 100_000


class Admission:
    """Open connections per address and per subject, and new connections per address."""

    def __init__(self, limits: Limits, on_evict: Callable[[], None] | None = None) -> None:
        self.limits = limits
        self._on_evict = on_evict
        self._addresses: dict[str, _Entry] = {}
        self._idle: OrderedDict[str, float] = OrderedDict()
        """Entries without an open connection whose bucket is refilling, by when they went idle
        (oldest first): the first to be forgotten."""
        self._subjects: dict[str, int] = {}
        self.evicted = 0

    @property
    def rate_limited(self) -> bool:
        return self.limits.new_per_second > 0 and self.limits.new_burst > 0

    @property
    def addresses(self) -> int:
        """Addresses tracked now."""
        return len(self._addresses)

    def open_from(self, address: str) -> int:
        entry = self._addresses.get(address)
        return entry.open if entry is not None else 0

    def open_for(self, subject: str) -> int:
        return self._subjects.get(subject, 0)

    def _refill_time(self) -> float:
        return self.limits.new_burst / self.limits.new_per_second if self.rate_limited else 0.0

    def _forget_refilled(self, now: float) -> None:
        refill = self._refill_time()
        while self._idle:
            address, since = next(iter(self._idle.items()))
            if now - since < refill:
                break
            del self._idle[address]
            del self._addresses[address]

    def admit_address(self, address: str, now: float) -> str | None:
        """Take a place for a new connection from ``address``; the refusal's reason, or None
        (then ``release_address`` gives it back)."""
        limits = self.limits
        self._forget_refilled(now)
        entry = self._addresses.get(address)
        if entry is None:
            if len(self._addresses) >= limits.max_addresses:
                if not self._idle:
                    return ADDRESS_TABLE
                oldest, _ = self._idle.popitem(last=False)
                del self._addresses[oldest]
                self.evicted += 1
                if self._on_evict is not None:
                    self._on_evict()
            entry = _Entry(tokens=float(limits.new_burst), stamp=now)
            self._addresses[address] = entry
        if self.rate_limited:
            entry.tokens = min(
                float(limits.new_burst),
                entry.tokens + (now - entry.stamp) * limits.new_per_second,
            )
            entry.stamp = now
            if entry.tokens < 1.0:
                self._settle(address, entry, now)
                return IP_RATE
            entry.tokens -= 1.0
        if limits.max_per_ip and entry.open >= limits.max_per_ip:
            self._settle(address, entry, now)
            return PER_IP
        entry.open += 1
        self._idle.pop(address, None)
        return None

    def release_address(self, address: str, now: float) -> None:
        entry = self._addresses.get(address)
        if entry is None or entry.open == 0:
            return
        entry.open -= 1
        self._settle(address, entry, now)
        self._forget_refilled(now)

    def _settle(self, address: str, entry: _Entry, now: float) -> None:
        """An entry without open connections: forgotten if its bucket is full, else idle."""
        if entry.open:
            return
        if not self.rate_limited:
            del self._addresses[address]
            return
        # Idle from now on (moved to the end: the order stays by time); it is forgotten once a
        # full refill time has passed, by which time its bucket is certainly full.
        self._idle.pop(address, None)
        self._idle[address] = now - (entry.tokens / self.limits.new_per_second)

    def admit_subject(self, subject: str) -> bool:
        """Take a place for a connection of token subject ``subject`` (none: always)."""
        if not subject:
            return True
        count = self._subjects.get(subject, 0)
        if self.limits.max_per_subject and count >= self.limits.max_per_subject:
            return False
        self._subjects[subject] = count + 1
        return True

    def release_subject(self, subject: str) -> None:
        count = self._subjects.get(subject, 0)
        if count <= 1:
            self._subjects.pop(subject, None)
        else:
            self._subjects[subject] = count - 1

    def ticket(self, address: str = "") -> Ticket:
        return Ticket(self, address)


class Ticket:
    """One connection's places (its address's, then its subject's), given back once."""

    def __init__(self, admission: Admission, address: str = "") -> None:
        self._admission = admission
        self.address = address
        self.subject: str | None = None
        self._address_held = False

    def admit_address(self, now: float) -> str | None:
        refusal = self._admission.admit_address(self.address, now)
        self._address_held = refusal is None
        return refusal

    def admit_subject(self, subject: str) -> bool:
        if not self._admission.admit_subject(subject):
            return False
        self.subject = subject
        return True

    def release(self, now: float) -> None:
        """Give back whatever this ticket holds (again: nothing)."""
        if self._address_held:
            self._address_held = False
            self._admission.release_address(self.address, now)
        if self.subject is not None:
            subject, self.subject = self.subject, None
            self._admission.release_subject(subject)
