"""The policy for a stream that exists (``plan_stream``): Odin raises the limits it manages
and adds what it needs, never lowers what the stream has, and reports what it keeps."""

from __future__ import annotations

import dataclasses

import pytest
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from odin_fanout.broker.nats.jetstream import SUBJECTS, plan_stream, stream_config, subject_covers
from odin_fanout.config import NatsSection

WANTED = stream_config(NatsSection(replicas=3))


def existing(**changes: object) -> StreamConfig:
    """The stream as the server reports it: Odin's own configuration, then ``changes``."""
    return dataclasses.replace(WANTED, **changes)  # type: ignore[arg-type]


def test_the_stream_as_configured_needs_nothing() -> None:
    plan = plan_stream(WANTED, existing())
    assert (plan.update, plan.differs) == ({}, {})


def test_more_replicas_configured_are_raised() -> None:
    plan = plan_stream(WANTED, existing(num_replicas=1))
    assert plan.update == {"num_replicas": 3}
    assert plan.differs == {}


def test_fewer_replicas_configured_never_downgrade_the_stream() -> None:
    one = stream_config(NatsSection(replicas=1))
    plan = plan_stream(one, existing(num_replicas=3))
    assert plan.update == {}
    assert plan.differs == {"num_replicas": {"stream": 3, "odin": 1}}


def test_a_lower_limit_elsewhere_does_not_carry_the_replicas_down() -> None:
    # The old comparison updated the whole configuration when any limit differed, and with
    # it the replicas: here only max_msgs rises, and the stream's 3 replicas are reported.
    one = stream_config(NatsSection(replicas=1, max_msgs=2_000_000))
    plan = plan_stream(one, existing(num_replicas=3, max_msgs=1_000_000))
    assert plan.update == {"max_msgs": 2_000_000}
    assert plan.differs == {"num_replicas": {"stream": 3, "odin": 1}}


@pytest.mark.parametrize(
    ("field", "lower", "higher"),
    [
        ("max_age", 60.0, 7200.0),
        ("max_msgs", 10, 5_000_000),
        ("max_bytes", 2 * 1024 * 1024, 4 * 1024 * 1024 * 1024),
        ("max_msgs_per_subject", 5, 50_000),
        ("duplicate_window", 10.0, 600.0),
    ],
)
def test_each_limit_is_raised_and_never_lowered(field: str, lower: object, higher: object) -> None:
    raised = plan_stream(WANTED, existing(**{field: lower}))
    assert raised.update == {field: getattr(WANTED, field)}
    assert raised.differs == {}
    kept = plan_stream(WANTED, existing(**{field: higher}))
    assert kept.update == {}
    assert kept.differs == {field: {"stream": higher, "odin": getattr(WANTED, field)}}


@pytest.mark.parametrize(
    ("field", "unlimited"),
    [("max_age", 0.0), ("max_msgs", -1), ("max_bytes", -1), ("max_msgs_per_subject", -1)],
)
def test_an_unlimited_stream_is_never_limited(field: str, unlimited: object) -> None:
    plan = plan_stream(WANTED, existing(**{field: unlimited}))
    assert plan.update == {}
    assert plan.differs == {field: {"stream": "unlimited", "odin": getattr(WANTED, field)}}


def test_storage_and_discard_are_kept_and_reported() -> None:
    plan = plan_stream(WANTED, existing(storage=StorageType.MEMORY, discard=DiscardPolicy.NEW))
    assert plan.update == {}
    assert plan.differs == {
        "storage": {"stream": "memory", "odin": "file"},
        "discard": {"stream": "new", "odin": "old"},
    }


def test_what_odin_needs_is_added_and_the_rest_of_theirs_kept() -> None:
    plan = plan_stream(WANTED, existing(subjects=["other.>"], allow_direct=False))
    assert plan.update == {"subjects": ["other.>", SUBJECTS], "allow_direct": True}
    wider = plan_stream(WANTED, existing(subjects=["odin.>", "other.>"]))
    assert wider.update == {}
    assert wider.differs == {"subjects": {"stream": ["odin.>", "other.>"], "odin": [SUBJECTS]}}


def test_raises_and_reports_together() -> None:
    plan = plan_stream(WANTED, existing(num_replicas=5, max_age=60.0, max_msgs=-1))
    assert plan.update == {"max_age": WANTED.max_age}
    assert plan.differs == {
        "num_replicas": {"stream": 5, "odin": 3},
        "max_msgs": {"stream": "unlimited", "odin": WANTED.max_msgs},
    }


@pytest.mark.parametrize(
    ("pattern", "covers"),
    [
        (">", True),
        ("odin.>", True),
        ("odin.token.>", True),
        ("odin.*.>", True),
        ("odin.token.*", False),
        ("odin.token.BTC.>", False),
        ("odin.token", False),
        ("other.>", False),
    ],
)
def test_subject_covers(pattern: str, covers: bool) -> None:
    assert subject_covers(pattern, SUBJECTS) is covers


def test_replicas_are_bounded() -> None:
    for bad in (0, 6):
        with pytest.raises(ValueError, match="replicas"):
            NatsSection(replicas=bad)
