"""The screenshot tool saves the four views, with the fake servers' data in them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.console.screenshots import capture


@pytest.mark.asyncio
async def test_the_four_views_are_saved(tmp_path: Path) -> None:
    saved = await capture(tmp_path)
    assert [path.name for path in saved] == [
        "console-overview.svg",
        "console-connections.svg",
        "console-channels.svg",
        "console-events.svg",
    ]
    texts = {path.stem.removeprefix("console-"): path.read_text() for path in saved}
    assert all(text.startswith("<svg") for text in texts.values())
    assert "c81e07" in texts["overview"]
    assert "1,467" in texts["overview"]  # the total of connections
    assert "3f9a1c-25" in texts["connections"]
    assert "BTC.trade" in texts["channels"]
    assert "conn_close" in texts["events"]
