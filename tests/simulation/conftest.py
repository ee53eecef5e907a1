"""``--sim-seed=N``: run the simulation of seed N alone (also ``ODIN_SIM_SEED=N``)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="run only the simulation scenario of this seed (tests/simulation)",
    )
