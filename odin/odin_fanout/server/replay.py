"""The in-connection ``replay`` request, answered from the same history as recovery.

Each channel's replay ends with ``replay_complete`` or ``replay_incomplete`` naming the ranges
that could not be served, never with a silently short answer. Replayed frames are paced by the
connection's queue (the reader waits for room), so a large replay cannot make its own client
look like a slow consumer; live messages keep flowing meanwhile and clients order by position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from odin_fanout.core.recovery import Reason, plan_replay
from odin_fanout.protocol.channels import covered_by
from odin_fanout.protocol.messages import Range, ReplayComplete, ReplayIncomplete
from odin_fanout.protocol.session import ReplayAction
from odin_fanout.server.history_reads import (
    HistoryUnavailable,
    Slice,
    window_proves,
)

if TYPE_CHECKING:
    from odin_fanout.server.connection import Connection


async def replay(connection: Connection, action: ReplayAction) -> None:
    context = connection.context
    metrics = context.metrics
    channels = action.channels
    if channels is None:
        subscriptions = connection.session.subscriptions
        known = context.reader.window.channels()
        channels = sorted(channel for channel in known if covered_by(channel, subscriptions))
    budget = context.config.history.replay_max_messages
    for channel in channels:
        if connection.closing is not None:
            return
        sent, reason, missing = await _replay_channel(connection, channel, action, budget)
        budget -= sent
        metrics.replayed_messages.inc(sent)
        metrics.frames_sent.inc(sent)
        metrics.replays.labels("complete" if reason is None else "incomplete").inc()
        if reason is None:
            reply: ReplayComplete | ReplayIncomplete = ReplayComplete(
                channel=channel, sent=sent, id=action.request_id
            )
        else:
            reply = ReplayIncomplete(
                channel=channel,
                sent=sent,
                total=sent + sum(last - first + 1 for first, last in missing),
                missing=[Range(first, last) for first, last in missing],
                reason=reason.value,
                message=_EXPLANATIONS[reason],
                id=action.request_id,
            )
        connection.send_message(reply)
        connection.log.info(
            "replay", channel=channel, sent=sent, outcome=reason.value if reason else "complete"
        )


async def _replay_channel(
    connection: Connection, channel: str, action: ReplayAction, budget: int
) -> tuple[int, Reason | None, list[tuple[int, int]]]:
    context = connection.context
    top = action.until if action.until is not None else context.reader.window.last_seq(channel)
    everything = [(action.after + 1, max(action.after + 1, top))]
    if action.epoch is not None and action.epoch != context.reader.current_epoch():
        return 0, Reason.EPOCH_CHANGED, everything
    try:
        found = await _read(connection, channel, action.after, budget)
    except HistoryUnavailable:
        return 0, Reason.BROKER_UNAVAILABLE, everything
    plan = plan_replay(action.after, action.until, found.latest_seq, found.events, budget)
    sent = 0
    for event in plan.messages:
        await connection.writer.wait_for_room()
        if connection.closing is not None:
            break
        if connection.wants(event):
            connection.send_frame(event.frame, force=True)
            sent += 1
    return sent, plan.reason, plan.missing


async def _read(connection: Connection, channel: str, after: int, limit: int) -> Slice:
    context = connection.context
    window = context.reader.read_window(channel, after, limit)
    if window_proves(window, after, limit):
        return window
    return await context.reader.read_broker(channel, after, limit)


_EXPLANATIONS = {
    Reason.EPOCH_CHANGED: "the history these positions belong to is gone; resubscribe",
    Reason.HISTORY_EXPIRED: "some of these positions are no longer in the history",
    Reason.LIMIT_EXCEEDED: "more messages than one replay may send; ask again from the last one",
    Reason.BROKER_UNAVAILABLE: "the history could not be read; try again",
    Reason.UNKNOWN_POSITION: "these positions were never issued",
}
