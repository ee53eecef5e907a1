"""Subscribe (with recovery) and unsubscribe, as the Trio shell carries them out.

Recovery without loss or duplicates at the seam: before the history is read, each channel
to recover is held by the connection's ``RecoverySeam`` (odin/odin_fanout/core/seam.py), so live
messages published during the read are kept, not sent. After the read, without awaiting again, the
server puts in order: the ack, the replayed messages (or the latest one when recovery is
impossible), then what the seam held that is newer than the replay (with a gap notice for
every hole), then the channel goes live.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from odin_fanout.core.recovery import (
    NotRecovered,
    Reason,
    Recovered,
    Unknown,
    assess_history,
    assess_local,
)
from odin_fanout.core.seam import Missed
from odin_fanout.protocol.channels import is_pattern
from odin_fanout.protocol.messages import RecoveryReport
from odin_fanout.protocol.publication import Position, Publication
from odin_fanout.protocol.session import SubscribeAction, UnsubscribeAction
from odin_fanout.server.fanout import Event, gap_frame
from odin_fanout.server.history_reads import (
    HistoryUnavailable,
)

if TYPE_CHECKING:
    from odin_fanout.server.connection import Connection
    from odin_fanout.server.context import ServerContext


@attrs.frozen
class Outcome:
    recovered: bool
    events: list[Event]
    """Replayed events, or the latest one when not recovered (possibly none)."""
    reason: Reason | None
    source: str
    epoch: str
    """The history the decision and its events belong to."""


async def recover(context: ServerContext, channel: str, position: Position) -> Outcome:
    """Decide one channel's recovery: from the window if it can, else from the broker."""
    reader = context.reader
    if not reader.current_epoch():  # the broker has not told us its history yet
        return Outcome(False, [], Reason.BROKER_UNAVAILABLE, "broker", "")
    local = decide_locally(context, channel, position)
    if not isinstance(local, Unknown):
        return local
    limit = context.config.history.recovery_max_messages
    try:
        page = await reader.read_broker(channel, position.seq, limit)
    except HistoryUnavailable:
        decided: Recovered[Event] | NotRecovered = NotRecovered(Reason.BROKER_UNAVAILABLE)
        epoch = reader.current_epoch()
    else:
        decided = assess_history(
            position.seq, position.epoch, page.epoch, page.latest_seq, page.events, limit
        )
        epoch = page.epoch
    if isinstance(decided, Recovered):
        return Outcome(True, list(decided.messages), None, "broker", epoch)
    latest = await reader.latest_event(channel)
    if latest is not None:
        epoch = latest.publication.epoch
    return Outcome(False, [latest] if latest else [], decided.reason, "broker", epoch)


def decide_locally(context: ServerContext, channel: str, position: Position) -> Outcome | Unknown:
    """The window's decision, without awaiting (Unknown: only the broker can tell)."""
    reader = context.reader
    limit = context.config.history.recovery_max_messages
    window = reader.read_window(channel, position.seq, limit)
    local = assess_local(
        position.seq, position.epoch, window.epoch, window.latest_seq, window.events, limit
    )
    if isinstance(local, Recovered):
        return Outcome(True, list(local.messages), None, "window", window.epoch)
    if isinstance(local, Unknown):
        return local
    latest = reader.window.latest(channel, trio.current_time())
    return Outcome(False, [latest] if latest else [], local.reason, "window", window.epoch)


def settle(context: ServerContext, channel: str, position: Position, outcome: Outcome) -> Outcome:
    """The outcome to hand over now: a decision made in a history that has since been
    replaced (the epoch changed while the broker was read) is made again from the window,
    so the ack, the events and the live messages all belong to the history clients get."""
    epoch = context.reader.current_epoch()
    if outcome.epoch == epoch or not epoch:
        return outcome
    local = decide_locally(context, channel, position)
    if isinstance(local, Outcome):
        return local
    reason = Reason.EPOCH_CHANGED if position.epoch != epoch else Reason.BROKER_UNAVAILABLE
    latest = context.reader.window.latest(channel, trio.current_time())
    return Outcome(False, [latest] if latest else [], reason, "window", epoch)


READ_CONCURRENCY = 16
"""Channels of one subscribe read from the broker at once: a subscribe of many channels
during an outage lasts about one ``history.read_timeout``, not one per channel."""


async def _read_positions(
    context: ServerContext, asked: dict[str, Position], unknown: list[str]
) -> tuple[dict[str, Outcome], dict[str, tuple[str, int] | None]]:
    """Every recovery's outcome and every new channel's position, read concurrently."""
    outcomes: dict[str, Outcome] = {}
    starts: dict[str, tuple[str, int] | None] = {}
    limiter = trio.CapacityLimiter(READ_CONCURRENCY)

    async def one_recovery(channel: str, position: Position) -> None:
        async with limiter:
            outcomes[channel] = await recover(context, channel, position)

    async def one_start(channel: str) -> None:
        async with limiter:
            starts[channel] = await context.reader.latest_known(channel)

    async with trio.open_nursery() as nursery:
        for channel, position in asked.items():
            nursery.start_soon(one_recovery, channel, position)
        for channel in unknown:
            nursery.start_soon(one_start, channel)
    # In the order the client asked, whatever order the reads ended in.
    return {channel: outcomes[channel] for channel in asked}, {
        channel: starts[channel] for channel in unknown
    }


def gap_event(channel: str, first: int, last: int, reason: str) -> Event:
    """A gap notice that sits in a replay like the messages it stands for."""
    marker = Publication(channel, seq=last, prev=first - 1, epoch="", ts=0.0, payload=b"")
    return Event(marker, gap_frame(channel, first, last, reason), refused=reason)


def _frames(items: list[Event | Missed]) -> list[Event]:
    """What the seam hands over, with each missed range as a gap notice in its place."""
    return [
        gap_event(item.channel, item.from_seq, item.to_seq, item.reason)
        if isinstance(item, Missed)
        else item
        for item in items
    ]


async def subscribe(connection: Connection, action: SubscribeAction) -> None:
    context = connection.context
    # A server just started: its broker may not feed anything yet, and what is published
    # between an ack and the broker's first consumer would never come.
    await context.reader.until_ready()
    hub = context.hub
    history = context.reader.window
    # Live messages wait for the channels being recovered, and for new concrete channels this
    # process has not seen yet (their position comes from the broker).
    unknown = [
        name
        for name in action.added
        if not is_pattern(name) and name not in action.recover and not history.knows(name)
    ]
    temporary: list[str] = []
    for channel in (*action.recover, *unknown):
        connection.seam.begin(channel)
        if channel not in connection.session.subscriptions:
            temporary.append(channel)
        hub.add(channel, connection)
    # The broker feeds every channel subscribed here before any position is read: what is
    # published from then on comes live, what came before is in the history read below.
    await context.interest.ensure([*action.added, *action.recover])
    outcomes, starts = await _read_positions(context, action.recover, unknown)

    # From here on nothing awaits: the ack, the replays and the held live messages are
    # queued in this order before any other message can reach the connection.
    for key in temporary:
        hub.remove(key, connection)
    if connection.closing is not None:
        return
    for key in action.added:
        hub.add(key, connection)
    epoch = context.reader.current_epoch()
    positions: dict[str, Position] = {}
    reports: dict[str, RecoveryReport] = {}
    sends: list[Event] = []
    for channel, decided in outcomes.items():
        asked = action.recover[channel]
        outcome = settle(context, channel, asked, decided)
        events = list(outcome.events)
        if outcome.recovered:
            last = events[-1].seq if events else asked.seq
        else:
            # The client keeps what it has: a latest value it already holds is not sent
            # again, and the position it is given is never behind its own (the live messages
            # link from there, and the seam announces what they skip).
            valid = asked.epoch == epoch and outcome.reason is not Reason.UNKNOWN_POSITION
            own = asked.seq if valid else 0
            events = [event for event in events if event.seq > own]
            last = events[-1].seq if events else max(own, history.last_seq(channel))
        sends.extend(_frames(connection.seam.hand_over(channel, last, events)))
        positions[channel] = Position(epoch, last)
        reports[channel] = RecoveryReport(
            recovered=outcome.recovered,
            count=len(outcome.events) if outcome.recovered else 0,
            reason=outcome.reason.value if outcome.reason else None,
        )
        _count(connection, channel, outcome)
    released: set[str] = set()
    for channel, start in starts.items():
        # The broker could not say, or said it of a history replaced since: no position,
        # live messages as they come.
        if start is None or start[0] != epoch:
            sends.extend(_frames(connection.seam.release(channel)))
            released.add(channel)
            continue
        sends.extend(_frames(connection.seam.hand_over(channel, start[1])))
        positions[channel] = Position(epoch, start[1])
    for name in action.requested:
        # A released channel gets no position even if the window has learnt one since: what
        # was held and released may be older than it.
        if (
            not is_pattern(name)
            and name not in positions
            and name not in released
            and history.knows(name)
        ):
            positions[name] = Position(epoch, history.last_seq(name))
    if not epoch:  # the broker has not said which history this is: positions mean nothing
        positions.clear()
    connection.send_message(connection.session.subscription_ack(action, positions, reports))
    connection.send_handed_over(sends)
    connection.log.info(
        "subscribe",
        channels=action.requested,
        added=len(action.added),
        count=len(connection.session.subscriptions),
    )


def _count(connection: Connection, channel: str, outcome: Outcome) -> None:
    metrics = connection.context.metrics
    label = "recovered" if outcome.recovered else "not_recovered"
    reason = outcome.reason.value if outcome.reason else "none"
    metrics.recoveries.labels(label, reason).inc()
    if outcome.recovered:
        metrics.recovered_messages.inc(len(outcome.events))
    connection.context.events.emit(
        "recover", connection.id, channel=channel, outcome=label, reason=reason
    )
    connection.log.info(
        "recover",
        channel=channel,
        outcome=label,
        reason=reason,
        count=len(outcome.events) if outcome.recovered else 0,
        source=outcome.source,
    )


def unsubscribe(connection: Connection, action: UnsubscribeAction) -> None:
    hub = connection.context.hub
    for key in action.removed:
        hub.remove(key, connection)
        connection.seam.forget(key)
    connection.send_message(connection.session.unsubscription_ack(action))
    connection.log.info("unsubscribe", channels=action.requested, removed=len(action.removed))
