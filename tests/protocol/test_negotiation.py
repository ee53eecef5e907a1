"""Which protocol a connection speaks, from its subprotocols and its query string."""

from __future__ import annotations

import pytest

from odin_fanout.protocol.negotiation import (
    SUBPROTOCOL_V1,
    UnsupportedVersion,
    negotiate,
)


def test_no_offer_is_the_original_protocol() -> None:
    chosen = negotiate([], [])
    assert (chosen.version, chosen.subprotocol, chosen.v1) == (0, None, False)


def test_the_v1_subprotocol_is_chosen_and_echoed_among_others() -> None:
    chosen = negotiate(["chat", SUBPROTOCOL_V1], [])
    assert (chosen.v1, chosen.subprotocol) == (True, SUBPROTOCOL_V1)


def test_unknown_subprotocols_alone_leave_the_original_protocol() -> None:
    chosen = negotiate(["mqtt", "odin.v2"], [])
    assert (chosen.v1, chosen.subprotocol) == (False, None)


@pytest.mark.parametrize(("values", "v1"), [(["1"], True), (["0"], False), (["0", "1"], True)])
def test_the_query_selects_a_version_without_a_subprotocol(values: list[str], v1: bool) -> None:
    chosen = negotiate([], values)
    assert (chosen.v1, chosen.subprotocol) == (v1, None)


@pytest.mark.parametrize("value", ["2", "v1", "", "-1"])
def test_a_version_we_do_not_speak_is_refused_with_the_value_named(value: str) -> None:
    with pytest.raises(UnsupportedVersion, match="protocol="):
        negotiate([], [value])
