"""docs/deployment stays true to the files it describes: its links and paths exist, its ports
table lists every port the compose file publishes, and the connection limits it quotes are
the ones Odin derives from the memory limits the files set."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from odin_fanout.capacity import Limits, plan
from odin_fanout.config import HistorySection
from tests.deploy.tools import COMPOSE, DEPLOY, DOCKERFILE, ROOT

DOCS = ROOT / "docs" / "deployment"
PAGES = sorted(DOCS.glob("*.md"))
README = (DOCS / "README.md").read_text()
SERVICES = yaml.safe_load(COMPOSE.read_text())["services"]


def connections(memory: str, workers: int = 1) -> int:
    """What Odin admits under a memory limit written as compose or systemd write it, in all
    over ``workers`` workers."""
    value, unit = int(memory[:-1]), memory[-1]
    size = value * {"M": 2**20, "G": 2**30}[unit]
    limits = Limits(size, "cgroup", None, "none", 200_000)
    return plan(
        0, limits, history_bytes=HistorySection().max_bytes, workers=workers
    ).host_max_connections


def test_the_pages_are_there() -> None:
    assert {page.name for page in PAGES} == {
        "README.md",
        "vm.md",
        "cloud.md",
        "tls.md",
        "kubernetes.md",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_and_path_exists(page: Path) -> None:
    text = page.read_text()
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not link.startswith("http"):
            assert (page.parent / link).exists(), f"{page.name}: link {link}"
    for path in re.findall(r"`((?:deploy|monitoring|docs)/[^`\s]*)`", text):
        assert (ROOT / path).exists(), f"{page.name}: {path}"


def test_the_ports_table_lists_every_published_port() -> None:
    rows = [line for line in README.splitlines() if line.startswith("| `")]
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            # "${VAR:-default}:container" or "host_ip:published:container"
            resolved = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", spec)
            published = resolved.split(":")[-2]
            assert [row for row in rows if row.startswith(f"| `{name}`") and published in row], (
                f"{name}: port {published} is not in the table"
            )


def test_the_quoted_connection_limits_are_the_derived_ones() -> None:
    odin = SERVICES["odin"]
    memory = odin["deploy"]["resources"]["limits"]["memory"]
    # serve --workers 0: one worker per CPU of the container's quota, rounded up.
    assert odin["command"][-2:] == ["--workers", "0"]
    workers = math.ceil(float(odin["deploy"]["resources"]["limits"]["cpus"]))
    total = connections(memory, workers)
    # The pages wrap their lines: compare the words.
    readme = " ".join(README.split())
    assert f"{total:,} connections in all ({total // workers:,} per worker)" in readme
    vm = " ".join((DOCS / "vm.md").read_text().split())
    # One process per port (odin@.service): the drop-in is each process's limit.
    assert f"{connections(memory_max('odin@.service.d')):,} connections" in vm
    # odin.service: the drop-in is the host's, quoted for the two workers of a 2-vCPU VM.
    assert f"{connections(memory_max('odin.service.d'), 2):,} connections in all" in vm


def memory_max(drop_in_directory: str) -> str:
    drop_in = (DEPLOY / "systemd" / drop_in_directory / "memory.conf").read_text()
    match = re.search(r"^MemoryMax=(\S+)", drop_in, re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_the_base_image_named_is_the_one_built_on() -> None:
    base = re.search(r"^FROM (python:\S+) AS build", DOCKERFILE.read_text(), re.MULTILINE)
    assert base is not None
    assert f"`{base.group(1)}`" in README
