"""``odin ctl``'s client against an in-process server: a uid the server refuses is exit 3,
as a socket it cannot open is (the subprocess tests, tests/e2e/test_ctl.py, cover the rest)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from odin_fanout import ctl
from tests.helpers import running_server
from tests.odin.test_control import control_for

pytestmark = pytest.mark.trio


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="odin-ctl-", dir="/tmp") as directory:
        yield Path(directory) / "run"


def run_ctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


async def test_a_uid_the_server_refuses_is_exit_3(socket_dir: Path) -> None:
    async with (
        running_server() as harness,
        control_for(harness, socket_dir, allow_root=False) as control,
    ):
        control.uid = os.getuid() + 4242  # as if the server ran as another user
        code, out, err = await trio.to_thread.run_sync(
            run_ctl, "status", "--socket", str(control.path)
        )
        assert code == ctl.EX_UNREACHABLE, err
        assert "permission_denied" in err and out == ""
        control.uid = os.getuid()
        code, out, err = await trio.to_thread.run_sync(
            run_ctl, "status", "--json", "--socket", str(control.path)
        )
        assert code == ctl.EX_OK, err
        assert json.loads(out)["hello"]["instance"] == harness.context.instance
