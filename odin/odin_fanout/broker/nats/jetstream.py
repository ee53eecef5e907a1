"""JetStream on the asyncio side: the stream Odin keeps its history in, and reads from it.

These are plain nats-py coroutines, run from Trio by the bridge through one ``aio_as_trio``
call each. History reads use JetStream's direct get API (``allow_direct`` on the stream):
``next_by_subj`` with a batch reads a channel after a position, ``multi_last`` with
``up_to_seq`` finds the message of a channel just before a position, ``last_by_subj`` its
newest one. None of them creates a consumer. The bridge reads through ``direct.py`` (the same
requests on a Trio connection, about ten times faster); the nats-py reads here remain for a
publisher's broker and for ``stress/odin_fanout/stress/bench_recovery.py``'s comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import APIError, NotFoundError

from odin_fanout.config import NatsSection
from odin_fanout.logs import Log

SUBJECTS = "odin.token.>"
SUBJECT_PREFIX = "odin.token."


class ReadFailed(Exception):
    """JetStream answered a read with an error status."""


@attrs.frozen
class Stored:
    """A message as the stream keeps it."""

    seq: int
    ts: float
    subject: str
    data: bytes


def stream_config(settings: NatsSection) -> StreamConfig:
    return StreamConfig(
        name=settings.stream,
        subjects=[SUBJECTS],
        storage=StorageType.FILE if settings.storage == "file" else StorageType.MEMORY,
        discard=DiscardPolicy.OLD,
        max_age=settings.max_age,
        max_msgs=settings.max_msgs,
        max_bytes=settings.max_bytes,
        max_msgs_per_subject=settings.max_msgs_per_subject,
        duplicate_window=settings.duplicate_window,
        allow_direct=True,
        num_replicas=settings.replicas,
    )


# The policy for a stream that exists: Odin never lowers what an operator (or another Odin)
# set. It raises the limits it manages when its configuration asks for more (more replicas,
# a longer age, more messages or bytes, a longer duplicate window), adds what it cannot work
# without (its subjects captured, direct gets allowed), and keeps every other difference as
# the stream has it: reported, not changed. Nothing here removes a message or a copy.

# Limits where more is more: the stream's value is kept when it is the larger one.
# Unlimited (max_age 0, counts -1) is the largest.
_RAISED = ("num_replicas", "max_age", "max_msgs", "max_bytes", "max_msgs_per_subject",
           "duplicate_window")  # fmt: skip
# Settings Odin cannot change in place (or would not): reported when they differ.
_KEPT = ("storage", "discard")
_UNLIMITED = float("inf")


@attrs.frozen
class StreamPlan:
    """What ``ensure_stream`` does to a stream that exists."""

    update: dict[str, Any]
    """Fields to set on the stream: raised limits, and what Odin needs added."""
    differs: dict[str, dict[str, Any]]
    """Fields whose value the stream keeps although Odin's configuration says otherwise:
    ``{"stream": theirs, "odin": ours}``."""


def plan_stream(wanted: StreamConfig, existing: StreamConfig) -> StreamPlan:
    """Compare Odin's configuration of the stream with the stream's: what to raise, what to
    keep and report. Pure: ``ensure_stream`` applies it."""
    update: dict[str, Any] = {}
    differs: dict[str, dict[str, Any]] = {}
    theirs_subjects = list(existing.subjects or [])
    if not any(subject_covers(pattern, SUBJECTS) for pattern in theirs_subjects):
        update["subjects"] = [*theirs_subjects, SUBJECTS]
    elif theirs_subjects != [SUBJECTS]:
        differs["subjects"] = {"stream": theirs_subjects, "odin": [SUBJECTS]}
    if not existing.allow_direct:
        update["allow_direct"] = True  # history reads are direct gets
    for name in _RAISED:
        ours, theirs = getattr(wanted, name), getattr(existing, name)
        if _amount(name, ours) > _amount(name, theirs):
            update[name] = ours
        elif _amount(name, ours) < _amount(name, theirs):
            differs[name] = {"stream": _shown(name, theirs), "odin": _shown(name, ours)}
    for name in _KEPT:
        ours, theirs = getattr(wanted, name), getattr(existing, name)
        if ours != theirs:
            differs[name] = {"stream": _shown(name, theirs), "odin": _shown(name, ours)}
    return StreamPlan(update, differs)


def _amount(name: str, value: float | None) -> float:
    """A limit as a comparable number: unlimited is infinite."""
    if name == "num_replicas":
        return float(value or 1)
    if name == "duplicate_window":
        return float(value or 0)
    if value is None or value <= 0:  # max_age 0; max_msgs, max_bytes, per subject -1
        return _UNLIMITED
    return float(value)


def _shown(name: str, value: object) -> object:
    """A value for the log (JSON): enums by their value, unlimited said so."""
    if isinstance(value, DiscardPolicy | StorageType):
        return value.value
    if name in _RAISED and _amount(name, value) == _UNLIMITED:  # type: ignore[arg-type]
        return "unlimited"
    return value


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether the NATS subject filter ``pattern`` matches everything ``subject`` (itself a
    filter) matches: ``odin.>`` and ``>`` cover ``odin.token.>``, ``odin.token.*`` does not."""
    ours, theirs = subject.split("."), pattern.split(".")
    for index, token in enumerate(theirs):
        if token == ">":
            return index < len(ours)
        if index >= len(ours) or ours[index] == ">" or token not in ("*", ours[index]):
            return False
    return len(theirs) == len(ours)


async def ensure_stream(
    js: JetStreamContext, settings: NatsSection, *, update: bool, log: Log
) -> StreamInfo:
    """The stream's info, creating it when Odin manages it. With ``update`` an existing
    stream is brought up to the configuration by ``plan_stream``'s policy: limits raised,
    never lowered (``stream_updated``), other differences logged (``stream_config_differs``)
    and kept. An update the servers refuse (more replicas than servers) leaves the stream as
    it is (``stream_update_failed``)."""
    wanted = stream_config(settings)
    try:
        info = await js.stream_info(settings.stream)
    except NotFoundError:
        if not settings.manage_stream:
            raise
        return await js.add_stream(wanted)
    if not update:
        return info
    plan = plan_stream(wanted, info.config)
    if plan.differs:
        log.warning("stream_config_differs", stream=settings.stream, fields=plan.differs)
    if plan.update:
        changes = {
            name: {"from": _shown(name, getattr(info.config, name)), "to": _shown(name, value)}
            for name, value in plan.update.items()
        }
        try:
            info = await js.update_stream(dataclasses.replace(info.config, **plan.update))
        except APIError as exc:
            log.warning("stream_update_failed", stream=settings.stream, fields=changes,
                        error=str(exc))  # fmt: skip
        else:
            log.info("stream_updated", stream=settings.stream, fields=changes)
    return info


def epoch_of(info: StreamInfo) -> str:
    """The history's name: a recreated stream (a new creation time) is a new history."""
    return epoch_from(info.config.name or "", info.created)


def epoch_of_raw(info: dict[str, Any]) -> str:
    """``epoch_of`` for a STREAM.INFO reply as JSON (read without nats-py)."""
    created = info.get("created")
    return epoch_from(info["config"]["name"], created_at(created) if created else None)


def epoch_from(name: str, created: datetime | None) -> str:
    stamp = (created or datetime.fromtimestamp(0, UTC)).astimezone(UTC)
    return hashlib.sha256(f"{name}|{stamp.isoformat()}".encode()).hexdigest()[:12]


def created_at(stamp: str) -> datetime:
    """An RFC 3339 time, to the microsecond (as nats-py reads it, so both agree)."""
    whole, _, rest = stamp.replace("Z", "+00:00").partition(".")
    if rest:
        digits = "".join(itertools.takewhile(str.isdigit, rest))
        whole = f"{whole}.{digits[:6].ljust(6, '0')}{rest[len(digits) :]}"
    return datetime.fromisoformat(whole).astimezone(UTC)


def lossless(info: StreamInfo) -> bool:
    """True if the stream never removed a message: a channel's first retained message is then
    its first message ever."""
    state = info.state
    return lossless_state(state.first_seq, state.num_deleted or 0)


def lossless_state(first_seq: int, num_deleted: int) -> bool:
    return first_seq <= 1 and not num_deleted


def parse_time(stamp: str) -> float:
    """RFC 3339 with up to nanoseconds (``2026-11-27T13:44:22.815048559Z``) as Unix seconds."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def _stored(message: Msg) -> Stored:
    headers = message.headers or {}
    return Stored(
        seq=int(headers["Nats-Sequence"]),
        ts=parse_time(headers["Nats-Time-Stamp"]),
        subject=headers["Nats-Subject"],
        data=message.data,
    )


async def _batch(
    nc: Client, stream: str, request: dict[str, object], reply_timeout: float
) -> list[Msg]:
    """Send a direct-get batch request; collect replies until its end (status 204 or 404)."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(request), reply=inbox)
        replies = []
        while True:
            reply = await subscription.next_msg(timeout=reply_timeout)
            status = (reply.headers or {}).get("Status")
            if status is None:
                replies.append(reply)
            elif status in ("204", "404"):
                return replies
            else:
                description = (reply.headers or {}).get("Description", "")
                raise ReadFailed(f"direct get: {status} {description}")
    finally:
        await subscription.unsubscribe()


async def read_after(
    nc: Client, stream: str, subject: str, after: int, limit: int, reply_timeout: float
) -> list[Stored]:
    """The oldest messages of ``subject`` after position ``after``, at most ``limit``."""
    request = {"seq": after + 1, "next_by_subj": subject, "batch": limit}
    return [_stored(reply) for reply in await _batch(nc, stream, request, reply_timeout)]


async def last_before(
    nc: Client, stream: str, subject: str, seq: int, reply_timeout: float
) -> Stored | None:
    """The retained message of ``subject`` just before position ``seq``, if any."""
    if seq <= 1:
        return None  # up_to_seq 0 would mean "no limit" to the server
    request = {"multi_last": [subject], "up_to_seq": seq - 1}
    replies = await _batch(nc, stream, request, reply_timeout)
    return _stored(replies[-1]) if replies else None


async def last_of(nc: Client, stream: str, subject: str, reply_timeout: float) -> Stored | None:
    """The newest retained message of ``subject``, if any."""
    reply = await nc.request(
        f"$JS.API.DIRECT.GET.{stream}",
        orjson.dumps({"last_by_subj": subject}),
        timeout=reply_timeout,
    )
    status = (reply.headers or {}).get("Status")
    if status == "404":
        return None
    if status is not None:
        raise ReadFailed(f"direct get: {status}")
    return _stored(reply)


async def last_of_each(
    nc: Client, stream: str, subjects: str, limit: int, reply_timeout: float
) -> list[Stored]:
    """The newest retained message of each subject matching the wildcard ``subjects``, at
    most ``limit`` of them."""
    request = {"multi_last": [subjects], "batch": limit}
    return [_stored(reply) for reply in await _batch(nc, stream, request, reply_timeout)]


class HistoryReads(Protocol):
    """The history reads the bridge makes: on nats-py (``NatsPyReads``, asyncio) or on a Trio
    connection of their own (``direct.DirectReads``)."""

    async def read_after(self, subject: str, after: int, limit: int) -> list[Stored]: ...

    async def last_before(self, subject: str, seq: int) -> Stored | None: ...

    async def last_of(self, subject: str) -> Stored | None: ...

    async def last_of_each(self, subjects: str, limit: int) -> list[Stored]: ...


class NatsPyReads:
    """``HistoryReads`` through nats-py: asyncio coroutines (run them inside ``aio``)."""

    def __init__(self, nc: Client, stream: str, reply_timeout: float) -> None:
        self._nc = nc
        self._stream = stream
        self._timeout = reply_timeout

    async def read_after(self, subject: str, after: int, limit: int) -> list[Stored]:
        return await read_after(self._nc, self._stream, subject, after, limit, self._timeout)

    async def last_before(self, subject: str, seq: int) -> Stored | None:
        return await last_before(self._nc, self._stream, subject, seq, self._timeout)

    async def last_of(self, subject: str) -> Stored | None:
        return await last_of(self._nc, self._stream, subject, self._timeout)

    async def last_of_each(self, subjects: str, limit: int) -> list[Stored]:
        return await last_of_each(self._nc, self._stream, subjects, limit, self._timeout)
