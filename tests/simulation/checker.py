"""The client-side checker: what one virtual client saw, judged against the broker's truth.

Per channel the checker keeps what a careful client keeps (docs/protocol.md, "Detecting a
gap"): the last position seen, its epoch, the gap notices since the last event, and what the
last subscribe's recovery report promised. Every message the client reads goes through
``on_message``; a broken rule becomes a line in ``violations`` (never an exception, so one
scenario reports every problem it found, with the client, the session and the virtual time).

The rules:

- **no silent gap**: an event's ``prev`` is the channel's last position, unless gap notices
  came since, and then it is at most the end of the last notice;
- **no duplicate, no reorder**: an event's ``seq`` is past the last position (and past the
  notices since);
- **exact gap notices**: a notice starts after what the client has, the positions between
  that and its start hold no message of the channel, it ends on a message of the channel
  (the truth), and for a refused body (``invalid_payload``) it names exactly that position;
- **exact recovery**: ``recovered: true`` means the next ``count`` events of the channel link
  from the position asked, with no notice among them, and end at the position the ack gave;
  ``recovered: false`` means the channel's latest value (the ack's position) comes next, or
  nothing does and events link from that position; ``epoch_changed`` only when the epoch did;
- **events are true**: every event is a publication of its channel and epoch, with that
  ``prev`` and that body, on a channel the client's acknowledged subscriptions cover;
- **the slow-consumer policy hits only slow readers**: a fast reader is never closed with
  1008 nor conflated; ``conflated`` notices only under the ``conflate`` policy;
- **closes are the expected ones**: 1000 (the client's), 1001 (the drain, after a
  ``reconnect``), 1008 ``slow consumer`` (slow readers only); no ``error`` reply at all.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from odin_fanout.protocol.channels import matches
from tests.simulation.broker import ChannelTruth, Truth

REFUSED = ("invalid_payload", "payload_too_large")
BROKER_REASONS = ("missed", "feed_overflow", "recovery_overflow", *REFUSED)


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


@attrs.define
class Notice:
    first: int
    last: int
    reason: str


@attrs.define
class ChannelState:
    last: int | None = None
    """The last position seen (an event's seq, or a recovery's/ack's position)."""
    epoch: str | None = None
    notices: list[Notice] = attrs.Factory(list)
    """Gap notices since the last event."""
    baseline: int | None = None
    """After ``recovered: false``: the latest value's position, which may come next."""
    exact: int = 0
    """Events of an exact recovery still to come."""
    exact_end: int = 0


@attrs.define
class Request:
    channels: list[str]
    recover: dict[str, tuple[str, int]]


@attrs.define
class Counts:
    events: int = 0
    notices: dict[str, int] = attrs.Factory(dict)
    exact: int = 0
    replayed: int = 0
    reset: dict[str, int] = attrs.Factory(dict)
    slow_closed: int = 0
    shutdown_closed: int = 0

    def add(self, other: Counts) -> None:
        self.events += other.events
        self.exact += other.exact
        self.replayed += other.replayed
        self.slow_closed += other.slow_closed
        self.shutdown_closed += other.shutdown_closed
        for mine, theirs in ((self.notices, other.notices), (self.reset, other.reset)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value


class ClientChecker:
    def __init__(
        self,
        name: str,
        truth: Truth,
        *,
        slow: bool,
        policy: str,
    ) -> None:
        self.name = name
        self.truth = truth
        self.slow = slow
        self.policy = policy
        self.channels: dict[str, ChannelState] = {}
        self.violations: list[str] = []
        self.counts = Counts()
        self.session = 0
        self.keys: list[str] = []
        """Channels and patterns acknowledged in this session."""
        self._requests: dict[int, Request] = {}
        self._coverage: dict[str, bool] = {}
        self._reconnect_hint = False
        self.now = 0.0
        self.trace = False

    # ---- reporting -------------------------------------------------------------------------

    def fail(self, problem: str) -> None:
        self.violations.append(f"{self.name} session {self.session} t={self.now:.3f}: {problem}")

    # ---- the client's side of a session ----------------------------------------------------

    def recover_positions(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        """Where this client is, for every channel it tracks that ``keys`` cover."""
        return {
            channel: (state.epoch, state.last)
            for channel, state in self.channels.items()
            if state.last is not None
            and state.epoch is not None
            and any(matches(key, channel) for key in keys)
        }

    def start_session(self, request_id: int, keys: list[str], recover: dict[str, Any]) -> None:
        self.session += 1
        self.keys = []
        self._coverage.clear()
        self._reconnect_hint = False
        for channel, state in self.channels.items():
            if channel not in recover:
                self.channels[channel] = ChannelState()
            else:
                state.notices.clear()
                state.baseline = None
                state.exact = 0
        self.subscribing(request_id, keys, recover)

    def subscribing(self, request_id: int, keys: list[str], recover: dict[str, Any]) -> None:
        self._requests[request_id] = Request(list(keys), dict(recover))

    def end_session(self) -> None:
        """The connection ended: notices not followed by an event still move the position
        (the protocol's rule: set last to the notice's end)."""
        for channel, state in self.channels.items():
            if state.notices and state.epoch != self.truth.epochs[-1]:
                # Notices carry no epoch: after an epoch change the first ones may be the new
                # history's. Whatever position they give, its recovery is refused as
                # epoch_changed (the client's history is gone), so they cannot hide a loss.
                state.notices.clear()
            if state.notices:
                self._settle_notices(channel, state, None)
            if state.exact:
                # The connection ended inside an exact recovery: the rest never came.
                state.exact = 0
            if state.baseline is not None:
                state.baseline = None

    # ---- what the server sent ----------------------------------------------------------------

    def on_message(self, message: dict[str, Any], now: float) -> None:
        self.now = now
        if self.trace:
            print(f"{self.name} s{self.session} t={now:.3f} <- {message}")
        kind = message.get("type")
        if "seq" in message:
            self._on_event(message)
        elif kind == "gap":
            self._on_gap(message)
        elif kind == "subscription_ack":
            self._on_ack(message)
        elif kind == "reconnect":
            self._reconnect_hint = True
        elif kind in ("hello", "pong", "unsubscription_ack"):
            pass
        else:
            self.fail(f"unexpected message {message}")

    def on_close(self, code: int | None, reason: str, *, ours: bool, stopping: bool) -> None:
        if ours and code == 1000:
            return
        if code == 1008 and reason == "slow consumer":
            self.counts.slow_closed += 1
            if not self.slow:
                self.fail("a fast reader was closed as a slow consumer")
        elif code == 1001:
            self.counts.shutdown_closed += 1
            if not stopping:
                self.fail("closed with 1001 before the drain")
            if not self._reconnect_hint:
                self.fail("closed with 1001 without a reconnect hint first")
        elif code is None:
            if not (stopping and self.slow):
                self.fail("connection lost without a close frame")
        else:
            self.fail(f"closed by the server with {code} {reason!r}")

    def _state(self, channel: str) -> ChannelState:
        state = self.channels.get(channel)
        if state is None:
            state = self.channels[channel] = ChannelState()
        return state

    def _covered(self, channel: str) -> bool:
        known = self._coverage.get(channel)
        if known is None:
            known = self._coverage[channel] = any(matches(key, channel) for key in self.keys)
        return known

    def _on_ack(self, message: dict[str, Any]) -> None:
        request = self._requests.pop(message.get("id", -1), None)
        if request is None:
            self.fail(f"an ack for no request: {message}")
            return
        if message.get("subscribed") != request.channels:
            self.fail(f"ack subscribed {message.get('subscribed')} for {request.channels}")
        positions: dict[str, dict[str, Any]] = message.get("positions", {})
        recovery: dict[str, dict[str, Any]] = message.get("recovery", {})
        if set(recovery) != set(request.recover):
            self.fail(f"recovery report for {sorted(recovery)}, asked {sorted(request.recover)}")
        if request.recover and message.get("recovered") != all(
            report.get("recovered") for report in recovery.values()
        ):
            self.fail(f"top-level recovered is wrong: {message}")
        for channel, report in recovery.items():
            self._on_recovery(channel, report, request.recover.get(channel), positions)
        self._coverage.clear()
        for key in request.channels:
            if key not in self.keys:
                self.keys.append(key)
            if "*" in key or key in recovery:
                continue
            state = self._state(key)
            position = positions.get(key)
            if position is None:
                continue
            seq, epoch = position["seq"], position["epoch"]
            if state.last is not None and state.epoch == epoch:
                # Already received through a pattern: the position may not skip messages
                # (gap notices since the last event count: the client has been told of those).
                truth = self.truth.channel(epoch, key)
                have = state.last
                for notice in state.notices:
                    if notice.first <= have + 1 or not truth.between(have + 1, notice.first - 1):
                        have = max(have, notice.last)
                skipped = truth.between(have + 1, seq)
                if skipped:
                    self.fail(f"{key}: subscribed at {seq}, past {skipped} never received")
                if seq <= state.last:
                    continue
            state.last, state.epoch, state.notices = seq, epoch, []

    def _on_recovery(
        self,
        channel: str,
        report: dict[str, Any],
        asked: tuple[str, int] | None,
        positions: dict[str, dict[str, Any]],
    ) -> None:
        if asked is None:
            return
        epoch, seq = asked
        state = self._state(channel)
        state.notices.clear()
        position = positions.get(channel)
        if report.get("recovered"):
            self.counts.exact += 1
            count = report.get("count", 0)
            if position is None:
                self.fail(f"{channel}: recovered without a position in the ack")
                return
            if position["epoch"] != epoch:
                self.fail(f"{channel}: recovered from epoch {epoch} into {position['epoch']}")
            state.last, state.epoch, state.baseline = seq, epoch, None
            state.exact, state.exact_end = count, position["seq"]
            self.counts.replayed += count
            if count == 0 and position["seq"] != seq:
                self.fail(f"{channel}: recovered nothing but the position moved {seq}->{position}")
            if count and position["seq"] <= seq:
                self.fail(f"{channel}: recovered {count} but the position is {position}")
            return
        reason = report.get("reason") or "?"
        self.counts.reset[reason] = self.counts.reset.get(reason, 0) + 1
        if report.get("count", 0) != 0:
            self.fail(f"{channel}: not recovered but count {report.get('count')}")
        if reason == "epoch_changed" and epoch == self.truth.epochs[-1]:
            self.fail(f"{channel}: epoch_changed, but {epoch} is the current epoch")
        if reason != "epoch_changed" and self.truth.epoch_index(epoch) < 0:
            self.fail(f"{channel}: position of an unknown epoch {epoch} refused as {reason}")
        state.exact = 0
        if position is None:
            state.last = state.epoch = state.baseline = None
        else:
            state.last = state.baseline = position["seq"]
            state.epoch = position["epoch"]

    def _on_gap(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        first, last, reason = message["from"], message["to"], message["reason"]
        counts = self.counts.notices
        counts[reason] = counts.get(reason, 0) + 1
        if not self._covered(channel):
            self.fail(f"gap notice on {channel}, which no acknowledged subscription covers")
        if reason == "conflated":
            if self.policy != "conflate":
                self.fail(f"{channel}: conflated under the {self.policy} policy")
            elif not self.slow:
                self.fail(f"{channel}: a fast reader was conflated ({first}..{last})")
        elif reason not in BROKER_REASONS:
            self.fail(f"{channel}: gap notice with reason {reason!r}")
        if first > last:
            self.fail(f"{channel}: gap notice {first}..{last} ({reason}) is an inverted range")
        state = self._state(channel)
        if reason in REFUSED and first == last:
            # A publication whose body cannot be delivered: its notice stands in its place, in
            # a replay as in the live stream, and links like the event would.
            self._on_event(
                {"channel": channel, "seq": last, "epoch": state.epoch, "refused": reason}
            )
            return
        if state.exact:
            self.fail(
                f"{channel}: gap notice {first}..{last} ({reason}) inside an exact recovery "
                f"({state.exact} events still owed)"
            )
        state.notices.append(Notice(first, last, reason))

    def _on_event(self, message: dict[str, Any]) -> None:
        channel, seq = message["channel"], message["seq"]
        refused = message.get("refused")
        if refused is None:
            self.counts.events += 1
            prev, epoch = message["prev"], message["epoch"]
        else:
            # A refused publication's notice carries no prev and no epoch: the channel's, or
            # a later one (the publication may be the first of a new epoch); on a channel not
            # seen yet, any (a slow reader may still be reading an older epoch).
            epochs = self.truth.epochs
            first = max(0, self.truth.epoch_index(message["epoch"]))
            for epoch in epochs[first:]:
                known = self.truth.channel(epoch, channel).messages.get(seq)
                if known is not None and not _is_json(known[1]):
                    break
            else:
                self.fail(f"{channel}: {refused} notice for {seq}, not a refused publication")
                return
            message["epoch"] = epoch
            prev = message["prev"] = known[0]
            message["data"] = None
        truth = self.truth.channel(epoch, channel)
        known = truth.messages.get(seq)
        if known is None:
            self.fail(f"{channel}: event {seq} of epoch {epoch} was never published")
        elif refused is None:
            if known[0] != prev:
                self.fail(f"{channel}: event {seq} has prev {prev}, the broker gave {known[0]}")
            if orjson.loads(known[1]) != message.get("data"):
                self.fail(f"{channel}: event {seq} does not carry the published body")
        if not self._covered(channel):
            self.fail(f"event {channel} {seq}, which no acknowledged subscription covers")
        state = self._state(channel)
        if state.epoch is not None and epoch != state.epoch:
            self._epoch_switch(channel, state, message)
            return
        state.epoch = epoch
        if state.baseline is not None:
            baseline, state.baseline = state.baseline, None
            if seq == baseline and not state.notices:
                state.last = seq
                return
        if state.last is None:
            self._settle_notices(channel, state, truth)
            state.last = seq
            return
        cursor, noticed = self._settle_notices(channel, state, truth)
        assert cursor is not None
        if seq <= cursor:
            self.fail(f"{channel}: duplicate or reorder: seq {seq} after {cursor}")
            return
        if prev > cursor:
            self.fail(f"{channel}: silent gap: prev {prev} but the last position is {cursor}")
        elif prev != cursor and not noticed:
            self.fail(f"{channel}: prev {prev} is behind the last position {cursor}")
        if state.exact:
            state.exact -= 1
            if state.exact == 0 and seq != state.exact_end:
                self.fail(
                    f"{channel}: exact recovery ended at {seq}, the ack said {state.exact_end}"
                )
        state.last = seq

    def _settle_notices(
        self, channel: str, state: ChannelState, truth: ChannelTruth | None
    ) -> tuple[int | None, bool]:
        """Check the notices since the last event against the truth: (the position after
        them, whether there were any). Each must start right after what the client has (no
        message of the channel in between) and end on a message of the channel."""
        notices, state.notices = state.notices, []
        if not notices:
            return state.last, False
        if truth is None:
            truth = self.truth.channel(state.epoch or self.truth.epochs[-1], channel)
        start = cursor = state.last
        problems = []
        for notice in notices:
            where = f"{channel}: gap notice {notice.first}..{notice.last} ({notice.reason})"
            if start is None:
                # Nothing received yet: the notice may belong to an epoch before the event's.
                if not any(
                    notice.last in self.truth.channel(epoch, channel).messages
                    for epoch in self.truth.epochs
                ):
                    self.fail(f"{where} does not end on a message of the channel")
            elif notice.last not in truth.messages:
                self.fail(f"{where} does not end on a message of the channel")
            if cursor is not None:
                if notice.first <= cursor:
                    problems.append(f"{where} repeats positions up to {cursor}, already had")
                skipped = truth.between(cursor + 1, notice.first - 1)
                if skipped:
                    problems.append(f"{where} starts after {cursor}: {skipped} skipped silently")
            cursor = notice.last if cursor is None else max(cursor, notice.last)
        for problem in problems:
            self.fail(problem)
        if state.last is not None:
            state.last = cursor
        return cursor, True

    def _epoch_switch(self, channel: str, state: ChannelState, message: dict[str, Any]) -> None:
        epoch, seq, prev = message["epoch"], message["seq"], message["prev"]
        assert state.epoch is not None
        if self.truth.epoch_index(epoch) < self.truth.epoch_index(state.epoch):
            self.fail(f"{channel}: event {seq} of epoch {epoch} after epoch {state.epoch}")
        notices, state.notices = state.notices, []
        announced = max((notice.last for notice in notices), default=0)
        if prev != 0 and prev > announced:
            self.fail(
                f"{channel}: silent gap across the epoch change {state.epoch}->{epoch}: "
                f"first event {seq} has prev {prev}"
            )
        if state.exact:
            self.fail(f"{channel}: the epoch changed inside an exact recovery")
        state.epoch, state.last, state.baseline, state.exact = epoch, seq, None, 0
