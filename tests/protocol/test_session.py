"""The per-connection protocol rules: frames in, one action out, time passed in."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.protocol.channels import ChannelRules
from odin_fanout.protocol.close_codes import RATE_LIMIT_REASON, CloseCode
from odin_fanout.protocol.codec import encode
from odin_fanout.protocol.errors import ErrorCode
from odin_fanout.protocol.messages import Error, Pong, RecoveryReport, RequestId
from odin_fanout.protocol.publication import Position
from odin_fanout.protocol.session import (
    Action,
    BadMessage,
    CloseAction,
    RateLimited,
    ReplayAction,
    Reply,
    Session,
    SessionLimits,
    SubscribeAction,
    UnsubscribeAction,
)

# Generous rate limits, so only the rate-limit tests ever hit them.
UNLIMITED = SessionLimits(rate_burst=10_000, rate_per_second=10_000.0, abuse_threshold=10_000.0)


def make_session(limits: SessionLimits = UNLIMITED, now: float = 0.0) -> Session:
    return Session(limits=limits, rules=ChannelRules(), last_activity=now)


def send(session: Session, document: dict[str, Any], now: float = 0.0) -> Action:
    return session.receive(json.dumps(document), now=now, wall_ms=1_000)


def subscribe(
    session: Session,
    channels: list[str],
    *,
    recover: dict[str, Any] | None = None,
    request_id: RequestId | None = None,
) -> Action:
    data: dict[str, Any] = {"channels": channels}
    if recover is not None:
        data["recover"] = recover
    document: dict[str, Any] = {"type": "subscribe", "data": data}
    if request_id is not None:
        document["id"] = request_id
    return send(session, document)


def replay(session: Session, request_id: RequestId | None = None, **data: Any) -> Action:
    document: dict[str, Any] = {"type": "replay", "data": data}
    if request_id is not None:
        document["id"] = request_id
    return send(session, document)


def error_of(action: Action) -> Error:
    assert isinstance(action, Reply), action
    assert isinstance(action.message, Error), action
    return action.message


# ---- heartbeat --------------------------------------------------------------------------------


def test_heartbeat_is_answered_with_pong_at_wall_time():
    session = make_session()
    action = session.receive('{"type":"heartbeat","id":"h1"}', now=5.0, wall_ms=1_700_000_000_000)
    assert action == Reply(Pong(ts=1_700_000_000_000, id="h1"))
    assert session.receive('{"type":"heartbeat"}', now=6.0, wall_ms=42) == Reply(Pong(ts=42))


# ---- subscribe --------------------------------------------------------------------------------


def test_subscribe_adds_channels_and_reports_what_was_new():
    session = make_session()
    first = subscribe(session, ["BTC.trade", "ETH.*"], request_id=1)
    assert first == SubscribeAction(
        requested=["BTC.trade", "ETH.*"], added=["BTC.trade", "ETH.*"], recover={}, request_id=1
    )
    second = subscribe(session, ["*.trade", "BTC.trade"])
    assert second == SubscribeAction(
        requested=["*.trade", "BTC.trade"], added=["*.trade"], recover={}, request_id=None
    )
    assert session.subscriptions == {"BTC.trade", "ETH.*", "*.trade"}


def test_subscribe_removes_duplicates_keeping_request_order():
    session = make_session()
    action = subscribe(session, ["ETH.trade", "BTC.trade", "ETH.trade", "*.*", "BTC.trade"])
    assert isinstance(action, SubscribeAction)
    assert action.requested == ["ETH.trade", "BTC.trade", "*.*"]
    assert action.added == ["ETH.trade", "BTC.trade", "*.*"]


def test_subscribe_with_an_invalid_channel_changes_nothing():
    session = make_session()
    subscribe(session, ["BTC.trade"])
    error = error_of(subscribe(session, ["ETH.trade", "eth.trade"], request_id="s"))
    assert error.code == ErrorCode.INVALID_CHANNEL
    assert "'eth.trade'" in error.message
    assert "upper-case" in error.message
    assert error.request == "subscribe"
    assert error.id == "s"
    assert session.subscriptions == {"BTC.trade"}


def test_subscription_limit_counts_only_new_subscriptions():
    session = make_session(
        SessionLimits(max_subscriptions=3, rate_burst=1000, rate_per_second=1000.0)
    )
    assert isinstance(subscribe(session, ["A.trade", "B.trade"]), SubscribeAction)
    # Re-subscribing held channels plus one new one reaches the limit exactly: allowed.
    action = subscribe(session, ["A.trade", "B.trade", "C.trade"])
    assert isinstance(action, SubscribeAction)
    assert action.added == ["C.trade"]
    assert session.subscriptions == {"A.trade", "B.trade", "C.trade"}


def test_subscription_limit_refusal_leaves_the_subscriptions_unchanged():
    session = make_session(
        SessionLimits(max_subscriptions=3, rate_burst=1000, rate_per_second=1000.0)
    )
    subscribe(session, ["A.trade", "B.trade"])
    error = error_of(subscribe(session, ["A.trade", "C.trade", "D.trade"], request_id=2))
    assert error.code == ErrorCode.SUBSCRIPTION_LIMIT
    assert "4 subscriptions" in error.message
    assert "limit is 3" in error.message
    assert error.request == "subscribe"
    assert error.id == 2
    assert session.subscriptions == {"A.trade", "B.trade"}


def test_subscribe_with_recover():
    session = make_session()
    action = subscribe(
        session,
        ["BTC.trade", "ETH.*"],
        recover={"BTC.trade": {"epoch": "e1", "seq": 10}, "ETH.social": {"epoch": "e1", "seq": 0}},
    )
    assert isinstance(action, SubscribeAction)
    assert action.recover == {"BTC.trade": Position("e1", 10), "ETH.social": Position("e1", 0)}


@pytest.mark.parametrize(
    ("channels", "recover", "why"),
    [
        (["BTC.*"], {"BTC.*": {"epoch": "e", "seq": 1}}, "cannot recover a pattern"),
        (["BTC.trade"], {"ETH.trade": {"epoch": "e", "seq": 1}}, "not among the channels"),
        (["BTC.trade"], {"BTC.trade": {"epoch": "e", "seq": -1}}, "seq must be >= 0"),
        (["BTC.*"], {"BTC.price": {"epoch": "e", "seq": 1}}, "unknown event"),
    ],
)
def test_invalid_recover_positions_are_refused_and_change_nothing(channels, recover, why):
    session = make_session()
    error = error_of(subscribe(session, channels, recover=recover, request_id="r"))
    assert error.code == ErrorCode.INVALID_POSITION
    assert why in error.message
    assert error.request == "subscribe"
    assert error.id == "r"
    assert session.subscriptions == set()


def test_recover_must_be_covered_by_this_subscribe_not_an_earlier_one():
    session = make_session()
    subscribe(session, ["ETH.trade"])
    error = error_of(
        subscribe(session, ["BTC.trade"], recover={"ETH.trade": {"epoch": "e", "seq": 3}})
    )
    assert error.code == ErrorCode.INVALID_POSITION
    assert session.subscriptions == {"ETH.trade"}


# ---- unsubscribe ------------------------------------------------------------------------------


def test_unsubscribe_removes_only_held_subscriptions():
    session = make_session()
    subscribe(session, ["BTC.trade", "ETH.*"])
    action = send(
        session, {"type": "unsubscribe", "id": 4, "data": {"channels": ["ETH.*", "SOL.trade"]}}
    )
    assert action == UnsubscribeAction(
        requested=["ETH.*", "SOL.trade"], removed=["ETH.*"], request_id=4
    )
    assert session.subscriptions == {"BTC.trade"}
    assert isinstance(action, UnsubscribeAction)
    ack = session.unsubscription_ack(action)
    assert ack.unsubscribed == ["ETH.*", "SOL.trade"]
    assert ack.count == 1
    assert ack.id == 4


def test_unsubscribe_with_an_invalid_channel_changes_nothing():
    session = make_session()
    subscribe(session, ["BTC.trade"])
    error = error_of(
        send(session, {"type": "unsubscribe", "data": {"channels": ["BTC.trade", "BTC"]}})
    )
    assert error.code == ErrorCode.INVALID_CHANNEL
    assert error.request == "unsubscribe"
    assert session.subscriptions == {"BTC.trade"}


# ---- replay -----------------------------------------------------------------------------------


def test_replay_since():
    action = replay(make_session(), request_id="q", channel="BTC.trade", since=7, epoch="e1")
    assert action == ReplayAction(
        channels=["BTC.trade"], after=7, until=None, epoch="e1", request_id="q"
    )


def test_replay_from_to_is_inclusive():
    action = replay(make_session(), channels=["BTC.trade"], **{"from": 5, "to": 9})
    assert action == ReplayAction(
        channels=["BTC.trade"], after=4, until=9, epoch=None, request_id=None
    )


def test_replay_single_position():
    action = replay(make_session(), **{"from": 1, "to": 1})
    assert isinstance(action, ReplayAction)
    assert (action.after, action.until) == (0, 1)


def test_replay_without_channels_means_every_subscribed_channel():
    action = replay(make_session(), since=0)
    assert isinstance(action, ReplayAction)
    assert action.channels is None


def test_replay_merges_channel_and_channels_without_duplicates():
    action = replay(
        make_session(), channel="ETH.trade", channels=["BTC.trade", "ETH.trade"], since=3
    )
    assert isinstance(action, ReplayAction)
    assert action.channels == ["ETH.trade", "BTC.trade"]


@pytest.mark.parametrize(
    ("data", "code", "why"),
    [
        ({"channel": "BTC.trade"}, ErrorCode.INVALID_MESSAGE, "either 'since' or 'from'"),
        ({"since": 1, "from": 1, "to": 2}, ErrorCode.INVALID_MESSAGE, "either 'since' or"),
        ({"since": 1, "to": 2}, ErrorCode.INVALID_MESSAGE, "either 'since' or"),
        ({"from": 1}, ErrorCode.INVALID_MESSAGE, "both 'from' and 'to'"),
        ({"to": 1}, ErrorCode.INVALID_MESSAGE, "both 'from' and 'to'"),
        ({"from": 5, "to": 4}, ErrorCode.INVALID_POSITION, "'from' <= 'to'"),
        ({"from": 0, "to": 4}, ErrorCode.INVALID_POSITION, "1 <= 'from'"),
        ({"since": -1}, ErrorCode.INVALID_POSITION, "'since' must be >= 0"),
        ({"channel": "BTC.*", "since": 0}, ErrorCode.INVALID_CHANNEL, "is a pattern"),
        ({"channels": ["BTC.trade", "*.*"], "since": 0}, ErrorCode.INVALID_CHANNEL, "pattern"),
        ({"channels": ["BTC.bogus"], "since": 0}, ErrorCode.INVALID_CHANNEL, "unknown event"),
    ],
)
def test_invalid_replays_are_refused(data, code, why):
    error = error_of(replay(make_session(), request_id=11, **data))
    assert error.code == code
    assert why in error.message
    assert error.request == "replay"
    assert error.id == 11


def test_replay_of_an_empty_channel_name_is_refused():
    # "" is not SYMBOL.event: the client must be told, not handed a replay of no channel
    # (which the server answers with nothing at all).
    error = error_of(replay(make_session(), request_id=12, channel="", since=0))
    assert error.code == ErrorCode.INVALID_CHANNEL
    assert error.id == 12


# ---- frames the protocol refuses ------------------------------------------------------------


def test_binary_frames_are_refused():
    session = make_session()
    action = session.receive(b'{"type":"heartbeat"}', now=0.0, wall_ms=0)
    assert action == Reply(
        Error(code=ErrorCode.BINARY_NOT_SUPPORTED, message="send JSON text frames, not binary"),
        notice=BadMessage(ErrorCode.BINARY_NOT_SUPPORTED, first=True),
    )


def test_bad_message_notice_is_first_only_once_per_code():
    session = make_session()

    def notice(frame: str | bytes) -> BadMessage:
        action = session.receive(frame, now=0.0, wall_ms=0)
        assert isinstance(action, Reply)
        assert isinstance(action.notice, BadMessage)
        return action.notice

    assert notice(b"x") == BadMessage(ErrorCode.BINARY_NOT_SUPPORTED, first=True)
    assert notice(b"y") == BadMessage(ErrorCode.BINARY_NOT_SUPPORTED, first=False)
    assert notice("{") == BadMessage(ErrorCode.INVALID_JSON, first=True)
    assert notice('{"type":"nope"}') == BadMessage(ErrorCode.UNKNOWN_TYPE, first=True)
    assert notice("]") == BadMessage(ErrorCode.INVALID_JSON, first=False)
    assert notice('{"type":"subscribe","data":{"channels":["x"]}}') == BadMessage(
        ErrorCode.INVALID_CHANNEL, first=True
    )
    assert notice('{"type":"nope"}') == BadMessage(ErrorCode.UNKNOWN_TYPE, first=False)


def test_decode_errors_become_error_replies_with_the_request_echoed():
    action = make_session().receive(
        '{"type":"replay","id":"z","data":{"since":"3"}}', now=0.0, wall_ms=0
    )
    error = error_of(action)
    assert error.code == ErrorCode.INVALID_MESSAGE
    assert "$.data.since" in error.message
    assert error.request == "replay"
    assert error.id == "z"


# ---- rate limit -------------------------------------------------------------------------------

SMALL = SessionLimits(rate_burst=5, rate_per_second=1.0, abuse_threshold=10.0)
HEARTBEAT = '{"type":"heartbeat"}'


def test_burst_is_admitted_then_rate_limited():
    session = make_session(SMALL)
    answers = [session.receive(HEARTBEAT, now=0.0, wall_ms=7) for _ in range(8)]
    assert answers[:5] == [Reply(Pong(ts=7))] * 5
    for index, action in enumerate(answers[5:]):
        error = error_of(action)
        assert error.code == ErrorCode.RATE_LIMIT_EXCEEDED
        assert "1/s, burst 5" in error.message
        assert isinstance(action, Reply)
        assert action.notice == RateLimited(first=index == 0)


def test_rate_limited_frames_are_dropped_unprocessed():
    session = make_session(SMALL)
    for _ in range(5):
        session.receive(HEARTBEAT, now=0.0, wall_ms=0)
    action = subscribe(session, ["BTC.trade"])
    assert error_of(action).code == ErrorCode.RATE_LIMIT_EXCEEDED
    assert session.subscriptions == set()


def test_each_streak_of_refusals_starts_with_first():
    session = make_session(SMALL)
    for _ in range(5):
        session.receive(HEARTBEAT, now=0.0, wall_ms=0)
    notices = []
    now = 0.0
    for _ in range(3):
        for _ in range(2):
            action = session.receive(HEARTBEAT, now=now, wall_ms=0)
            assert isinstance(action, Reply)
            notices.append(action.notice)
        now += 1.0  # one token: the next frame is admitted and ends the streak
        assert session.receive(HEARTBEAT, now=now, wall_ms=0) == Reply(Pong(ts=0))
    assert notices == [RateLimited(first=True), RateLimited(first=False)] * 3


def test_sustained_abuse_closes_the_connection():
    session = make_session(SMALL)
    now = 0.0
    actions = []
    # Ten frames a second against a refill of one: the abuse level grows by about 8 a second.
    for _ in range(200):
        action = session.receive(HEARTBEAT, now=now, wall_ms=0)
        actions.append(action)
        if isinstance(action, CloseAction):
            break
        now += 0.1
    assert actions[-1] == CloseAction(CloseCode.POLICY_VIOLATION, RATE_LIMIT_REASON)
    assert actions[-1].code == 1008
    assert RATE_LIMIT_REASON == "rate limit abuse"
    # Closed only after the threshold of refusals, not at the first one.
    refusals = [a for a in actions if isinstance(a, Reply) and isinstance(a.notice, RateLimited)]
    assert len(refusals) >= SMALL.abuse_threshold
    assert now < 5.0


def test_occasional_bursts_are_never_closed():
    session = make_session(SMALL)
    for burst in range(500):
        now = burst * 10.0
        # Twice the burst size every ten seconds: some refusals, never sustained abuse.
        for _ in range(10):
            action = session.receive(HEARTBEAT, now=now, wall_ms=0)
            assert not isinstance(action, CloseAction), f"closed in burst {burst}"


# ---- liveness ---------------------------------------------------------------------------------


def test_idle_deadline_follows_activity():
    session = make_session(SessionLimits(idle_timeout=30.0), now=100.0)
    assert session.idle_deadline() == 130.0
    session.note_activity(110.0)
    assert session.idle_deadline() == 140.0
    # Activity reported out of order never moves the deadline back.
    session.note_activity(105.0)
    assert session.idle_deadline() == 140.0


def test_every_frame_counts_as_activity_even_refused_ones():
    session = make_session(SessionLimits(idle_timeout=30.0), now=0.0)
    session.receive(b"binary", now=50.0, wall_ms=0)
    assert session.idle_deadline() == 80.0
    session.receive("not json", now=60.0, wall_ms=0)
    assert session.idle_deadline() == 90.0


# ---- acks -------------------------------------------------------------------------------------


def test_subscription_ack_without_recovery():
    session = make_session()
    subscribe(session, ["A.trade"])
    action = subscribe(session, ["B.trade", "A.trade"], request_id="x")
    assert isinstance(action, SubscribeAction)
    ack = session.subscription_ack(action, positions={}, recovery={})
    assert ack.subscribed == ["B.trade", "A.trade"]
    assert ack.count == 2
    assert ack.positions is None
    assert ack.recovered is None
    assert ack.recovery is None
    assert ack.id == "x"
    assert b'"recovered"' not in encode(ack)


def test_subscription_ack_recovered_only_if_every_channel_recovered():
    session = make_session()
    action = subscribe(
        session,
        ["A.trade", "B.trade"],
        recover={"A.trade": {"epoch": "e", "seq": 1}, "B.trade": {"epoch": "e", "seq": 2}},
    )
    assert isinstance(action, SubscribeAction)
    positions = {"A.trade": Position("e", 4), "B.trade": Position("e", 2)}
    good = {"A.trade": RecoveryReport(True, 3), "B.trade": RecoveryReport(True, 0)}
    ack = session.subscription_ack(action, positions, good)
    assert ack.recovered is True
    assert ack.positions == positions
    assert ack.recovery == good
    bad = {**good, "B.trade": RecoveryReport(False, 0, "history_expired")}
    assert session.subscription_ack(action, positions, bad).recovered is False


# ---- properties -------------------------------------------------------------------------------

names = st.sampled_from(
    ["BTC.trade", "ETH.trade", "BTC.*", "*.trade", "*.*", "SOL.social", "btc.trade", "X", ""]
)
frames = st.one_of(
    st.builds(
        lambda channels, request_id: {
            "type": "subscribe",
            "id": request_id,
            "data": {"channels": channels},
        },
        st.lists(names, max_size=4),
        st.integers(0, 5),
    ),
    st.builds(
        lambda channels: {"type": "unsubscribe", "data": {"channels": channels}},
        st.lists(names, max_size=4),
    ),
    st.builds(
        lambda channel, since: {"type": "replay", "data": {"channel": channel, "since": since}},
        names,
        st.integers(-2, 5),
    ),
    st.just({"type": "heartbeat"}),
    st.just({"type": "bogus"}),
)


@settings(max_examples=60)
@given(st.lists(st.tuples(frames, st.floats(0.0, 0.5)), max_size=30))
def test_any_frame_sequence_gives_encodable_replies_within_limits(script):
    limits = SessionLimits(max_subscriptions=3, rate_burst=10, rate_per_second=5.0)
    session = make_session(limits)
    now = 0.0
    for document, delay in script:
        now += delay
        before = set(session.subscriptions)
        action = session.receive(json.dumps(document), now=now, wall_ms=int(now * 1000))
        assert len(session.subscriptions) <= limits.max_subscriptions
        if isinstance(action, Reply):
            assert encode(action.message)
            assert session.subscriptions == before
        elif isinstance(action, SubscribeAction):
            assert session.subscriptions == before | set(action.added)
        elif isinstance(action, UnsubscribeAction):
            assert session.subscriptions == before - set(action.removed)
