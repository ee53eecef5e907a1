"""Keeping what the broker feeds this process to what its clients subscribe to.

One task (``run``) turns the hub's keys into filters (``odin_fanout.core.interest``) and hands them
to the broker whenever they change: at once when a subscription needs a channel not fed yet
(``ensure``, which the subscribe awaits, so the client's positions are read only once the
channel's live messages are sure to come), and when keys have lingered ``broker.
interest_linger`` seconds without subscribers. Changes that arrive together are applied
together: a crowd of clients subscribing at once costs one change.

The history window follows: a channel the broker stops feeding, or starts feeding again, is
forgotten, because what the window held of it stopped being complete when its feed stopped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from odin_fanout.core.interest import Lingering
from odin_fanout.protocol.channels import Filters, covers, covers_all, filters_for

if TYPE_CHECKING:
    from odin_fanout.server.context import ServerContext


class InterestKeeper:
    def __init__(self, context: ServerContext) -> None:
        self._context = context
        broker = context.config.broker
        self._everything = broker.interest == "all"
        self._max_filters = broker.interest_max_filters
        self._lingering = Lingering(broker.interest_linger)
        self.applied: Filters = None
        """What the broker was last told (None: every channel, as a broker starts)."""
        self._started = False
        self._asked_for: Filters = None
        """What the broker was last asked for (it may feed more: ``applied``)."""
        self._requested: set[str] = set()
        """Keys of subscriptions under way, not in the hub yet."""
        self._asked = 0
        self._served = 0
        self._served_event = trio.Event()
        self._wake = trio.Event()
        context.hub.on_key_emptied = self._key_emptied

    async def ensure(self, keys: Iterable[str]) -> None:
        """Return once the broker feeds every channel ``keys`` receive (or after
        ``history.read_timeout``: a broker that cannot say stays asked, and the
        subscription goes on as it would without its history)."""
        if self._everything:
            return
        wanted = list(keys)
        if self._started and covers_all(self.applied, wanted):
            return
        self._requested.update(wanted)
        self._asked += 1
        asked = self._asked
        self._wake.set()
        with trio.move_on_after(self._context.config.history.read_timeout):
            while self._served < asked:
                await self._served_event.wait()

    def _key_emptied(self, key: str) -> None:  # noqa: ARG002
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        metrics = self._context.metrics
        if self._everything:
            metrics.interest_filters.set(-1)
            task_status.started()
            return
        task_status.started()
        while True:
            asked = self._asked
            now = trio.current_time()
            live = [*self._context.hub.key_names(), *self._requested]
            self._requested.clear()
            desired = filters_for(self._lingering.wanted(live, now), self._max_filters)
            if not self._started or desired != self._asked_for:
                await self._apply(desired)
            self._served = asked
            served, self._served_event = self._served_event, trio.Event()
            served.set()
            if self._asked != asked:
                continue  # asked again meanwhile
            expiry = self._lingering.next_expiry()
            with trio.move_on_at(expiry if expiry is not None else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _apply(self, desired: Filters) -> None:
        context = self._context
        before = self.applied
        self._asked_for = desired
        fed = await context.broker.want(desired)
        self.applied, self._started = fed, True
        window = context.reader.window
        changed = [
            channel
            for channel in window.channels()
            if covers(before, channel) != covers(fed, channel)
        ]
        for channel in changed:
            window.forget(channel)
        context.metrics.interest_filters.set(-1 if fed is None else len(fed))
        if fed != before:
            context.metrics.interest_changes.inc()
            # Taking everything, or no longer, is worth an operator's eye (past the bound a
            # process reads the firehose); the rest comes and goes with the clients.
            level = context.log.info if (fed is None) != (before is None) else context.log.debug
            level(
                "interest_changed",
                filters="all" if fed is None else len(fed),
                forgotten=len(changed),
            )
