"""The session's side of in-band tokens: ``auth`` only first, ``refresh`` only with a token,
and a connection that owes a token closed by anything else; arbitrary frames never raise."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from odin_fanout.protocol.access import Grant, rules_from
from odin_fanout.protocol.channels import ChannelRules
from odin_fanout.protocol.close_codes import CloseCode
from odin_fanout.protocol.errors import ErrorCode
from odin_fanout.protocol.messages import Error
from odin_fanout.protocol.session import (
    Action,
    CloseAction,
    Reply,
    Session,
    SessionLimits,
    SubscribeAction,
    TokenAction,
)

LIMITS = SessionLimits(rate_burst=10_000, rate_per_second=10_000.0)


def make_session(*, awaiting_auth: bool = False, grant: Grant | None = None) -> Session:
    return Session(
        limits=LIMITS,
        rules=ChannelRules(),
        last_activity=0.0,
        access=rules_from(["PRIV.*=token"]),
        grant=grant or Grant(),
        awaiting_auth=awaiting_auth,
    )


def send(session: Session, document: dict[str, Any] | str) -> Action:
    frame = document if isinstance(document, str) else json.dumps(document)
    return session.receive(frame, now=0.0, wall_ms=0)


def test_a_connection_owing_its_token_must_send_auth_first() -> None:
    session = make_session(awaiting_auth=True)
    action = send(session, {"type": "auth", "id": 1, "data": {"token": "t"}})
    assert action == TokenAction("t", refresh=False, request_id=1)
    assert session.take_grant(Grant(subject="alice", channels=("PRIV.*",)), refresh=False) is None
    assert not session.awaiting_auth
    # Then the channels its token allows.
    subscribed = send(session, {"type": "subscribe", "data": {"channels": ["PRIV.trade"]}})
    assert isinstance(subscribed, SubscribeAction) and subscribed.added == ["PRIV.trade"]


def test_anything_else_first_closes_a_connection_owing_its_token() -> None:
    for frame in ({"type": "subscribe", "data": {"channels": ["BTC.trade"]}}, "not json", "{}"):
        action = send(make_session(awaiting_auth=True), frame)
        assert action == CloseAction(CloseCode.AUTH_REQUIRED, "authentication required")
    binary = make_session(awaiting_auth=True).receive(b"\x00", now=0.0, wall_ms=0)
    assert isinstance(binary, CloseAction)


def test_auth_is_refused_after_the_first_message_and_refresh_without_a_token() -> None:
    session = make_session()
    send(session, {"type": "heartbeat"})
    late = send(session, {"type": "auth", "data": {"token": "t"}})
    assert isinstance(late, Reply) and isinstance(late.message, Error)
    assert late.message.code == ErrorCode.INVALID_MESSAGE
    refresh = send(session, {"type": "refresh", "data": {"token": "t"}})
    assert isinstance(refresh, Reply) and isinstance(refresh.message, Error)
    assert refresh.message.code == ErrorCode.UNAUTHORIZED


def test_a_refresh_keeps_the_subject_and_the_current_subscriptions() -> None:
    session = make_session(grant=Grant(subject="alice", channels=("PRIV.*",)))
    send(session, {"type": "subscribe", "data": {"channels": ["PRIV.trade"]}})
    assert send(session, {"type": "refresh", "data": {"token": "t"}}) == TokenAction(
        "t", refresh=True, request_id=None
    )
    other = session.take_grant(Grant(subject="mallory", channels=("PRIV.*",)), refresh=True)
    assert other is not None and other[0] == ErrorCode.UNAUTHORIZED
    narrower = session.take_grant(Grant(subject="alice", channels=("BTC.*",)), refresh=True)
    assert narrower is not None and narrower[0] == ErrorCode.FORBIDDEN
    assert session.grant.channels == ("PRIV.*",)  # nothing changed
    later = Grant(subject="alice", channels=("PRIV.*",), expires_at=2e9)
    assert session.take_grant(later, refresh=True) is None
    assert session.grant == later


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.dictionaries(
            st.sampled_from(["type", "data", "id", "token"]),
            st.one_of(
                st.sampled_from(["auth", "refresh", "subscribe"]),
                st.text(max_size=20),
                st.integers(),
                st.none(),
                st.dictionaries(st.sampled_from(["token", "channels"]), st.text(max_size=50)),
            ),
        ).map(json.dumps),
    ),
    st.booleans(),
)
def test_any_frame_gets_an_answer_never_an_exception(frame: str, awaiting: bool) -> None:
    action = make_session(awaiting_auth=awaiting).receive(frame, now=0.0, wall_ms=0)
    if awaiting:
        assert isinstance(action, CloseAction | TokenAction)
