"""Who may subscribe to what: namespaces with a policy each, and what a token grants.

Namespaces are channel patterns (``BTC.trade``, ``PRIV.*``, ``*.balances``, ``*.*``) in the
order configured; a channel is governed by the first one that matches it, and by ``public``
when none does (an unconfigured Odin serves everything to everyone, as the original did):

- ``public``: anyone, with or without a token;
- ``token``: a connection whose token's ``channels`` claim allows the channel;
- ``deny``: nobody.

A subscription to a pattern is checked for every channel it could receive: for each
namespace it overlaps, the channels of both (their intersection, itself a pattern) must be
allowed by that namespace's policy, unless an earlier namespace governs all of them. Such a
subscription is refused whole, naming the namespace, rather than narrowed: a client that asked
for ``*.*`` and silently got less would count the missing channels as quiet ones. (An
intersection only partly governed by earlier namespaces is checked against this one too: at
worst a refusal the client can avoid by asking for narrower patterns, never a leak.)

No I/O and no time source: ``Grant`` carries the token's expiry, the shell enforces it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import attrs

from odin_fanout.protocol.channels import WILDCARD

Policy = Literal["public", "token", "deny"]
POLICIES: tuple[Policy, ...] = ("public", "token", "deny")


@attrs.frozen
class Namespace:
    pattern: str
    policy: Policy


@attrs.frozen
class Grant:
    """What a connection's token says (or, without a token, nothing)."""

    subject: str = ""
    """The token's ``sub``: who this is (logs, the console); empty without a token."""
    channels: tuple[str, ...] = ()
    """Patterns the ``token`` namespaces allow this connection (the ``channels`` claim)."""
    expires_at: float | None = None
    """The token's ``exp`` (Unix seconds), if it has one."""
    claims: Mapping[str, object] = attrs.field(factory=dict, eq=False, repr=False)
    """All of the token's verified claims, for what reads others (the publish API's
    ``publish``); not part of the grant's identity."""

    @property
    def authenticated(self) -> bool:
        return bool(self.subject) or bool(self.channels) or self.expires_at is not None


ANONYMOUS = Grant()


@attrs.frozen
class Refusal:
    key: str
    """The channel or pattern refused."""
    namespace: str
    """The pattern of the namespace that refuses it."""
    policy: Policy

    def message(self) -> str:
        if self.policy == "deny":
            return f"{self.key!r}: channels of {self.namespace!r} are not served"
        return f"{self.key!r}: channels of {self.namespace!r} need a token that allows them"


def _segments(pattern: str) -> tuple[str, str]:
    symbol, _, event = pattern.partition(".")
    return symbol, event


def intersect(a: str, b: str) -> str | None:
    """The channels both patterns receive, as a pattern; None if they share none."""
    parts = []
    for x, y in zip(_segments(a), _segments(b), strict=True):
        if x == WILDCARD:
            parts.append(y)
        elif y in (WILDCARD, x):
            parts.append(x)
        else:
            return None
    return ".".join(parts)


def covers(outer: str, inner: str) -> bool:
    """True if every channel ``inner`` receives, ``outer`` receives too."""
    return all(o in (WILDCARD, i) for o, i in zip(_segments(outer), _segments(inner), strict=True))


@attrs.frozen
class AccessRules:
    namespaces: tuple[Namespace, ...] = ()

    @property
    def open(self) -> bool:
        """Everything public: nothing to check (the default)."""
        return all(namespace.policy == "public" for namespace in self.namespaces)

    def check(self, key: str, grant: Grant) -> Refusal | None:
        """None if ``grant`` may subscribe to ``key`` (a channel or a pattern)."""
        namespaces = self.namespaces
        for index, namespace in enumerate(namespaces):
            if namespace.policy == "public":
                continue
            shared = intersect(key, namespace.pattern)
            if shared is None:
                continue
            if any(covers(earlier.pattern, shared) for earlier in namespaces[:index]):
                continue  # governed by an earlier namespace
            if namespace.policy == "deny" or not any(
                covers(allowed, shared) for allowed in grant.channels
            ):
                return Refusal(key, namespace.pattern, namespace.policy)
        return None

    def check_all(self, keys: Iterable[str], grant: Grant) -> list[Refusal]:
        if self.open:
            return []
        return [refusal for key in keys if (refusal := self.check(key, grant)) is not None]


EVERYTHING_PUBLIC = AccessRules()
"""No namespaces: every channel public (an unconfigured Odin)."""


def rules_from(items: Sequence[str]) -> AccessRules:
    """Rules from ``auth.namespaces`` items, ``PATTERN=POLICY`` (the configuration checked
    them; a policy that is none of ours is a ValueError)."""
    namespaces = []
    for item in items:
        pattern, _, name = item.partition("=")
        policy = next((p for p in POLICIES if p == name.strip()), None)
        if policy is None:
            raise ValueError(f"{item!r}: the policy must be one of {', '.join(POLICIES)}")
        namespaces.append(Namespace(pattern.strip(), policy))
    return AccessRules(tuple(namespaces))
