"""Deterministic simulations: the real server (``OdinServer`` with its sessions, hub, history
window, recovery seam, fan-out, writers and the ``MemoryBroker``) under hundreds of virtual
clients, in virtual time (an autojumping ``MockClock``), driven by one seed each.

What a scenario does (tests/simulation/scenario.py): 100-250 clients, each with a profile drawn
from the seed (concrete channels and ``SYMBOL.*`` / ``*.event`` / ``*.*`` patterns; fast
readers, and slow ones that read a few hundred bytes a tick and stall; one to four sessions,
left politely or by dropping the connection, each later one subscribing with ``recover`` from
the positions the client kept, some subscribing to more mid-session) against a publisher
that sends bursts on weighted channels, publications the server never gets (gaps it must
announce), bodies that are not JSON, floods past the broker feed's capacity, and one or two
epoch changes; the server's limits (queue bound, slow-consumer policy ``close`` or
``conflate``, history window, recovery limit, broker history, read latency) come from the seed
too. At the end the server drains and must leave nothing behind. The invariants are in
tests/simulation/checker.py (per client, against the broker's record of every publication)
and scenario.py (queue bounds, the server's logged errors, leftovers after the drain).

Runs: 20 fixed seeds always; ``hypothesis`` draws a few more (``max_examples`` 3, no
shrinking: a smaller seed is another scenario, not a simpler one); a batch of random seeds for
``ODIN_SIM_BUDGET_SECONDS`` of wall time (default 10). A failure names its seed; rerun it
alone with ``pytest tests/simulation --sim-seed=N`` or ``ODIN_SIM_SEED=N pytest
tests/simulation``; ``ODIN_SIM_TRACE=client-7`` prints what that client reads.
One seed decides everything the scenario does; Trio's scheduler may interleave tasks
differently from run to run (its scheduling randomness is not ours to seed), which is why
every invariant holds for any interleaving.

Throughput, measured on the 2-core CI machine (no coverage): the 20 fixed seeds simulate
about 11.3 connected client-hours (virtual time, summed over ~6,300 client sessions of 100-250
distinct clients per seed) in about 27 s of scenario wall time, i.e. 20-25 client-hours per
wall minute; under pytest the fixed seeds take about 36 s. The time-boxed batch prints its own
figure (``-s``).
"""

from __future__ import annotations

import os
import random
import time

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.simulation.scenario import Report, plan, run

FIXED_SEEDS = list(range(1, 21))
BUDGET = float(os.environ.get("ODIN_SIM_BUDGET_SECONDS", "10"))


def asked_seed(config: pytest.Config) -> int | None:
    seed = config.getoption("--sim-seed", default=None)
    if seed is None and os.environ.get("ODIN_SIM_SEED"):
        seed = int(os.environ["ODIN_SIM_SEED"])
    return seed if seed is None else int(seed)


def judge(report: Report) -> None:
    if report.violations:
        shown = "\n  ".join(report.violations[:40])
        more = len(report.violations) - 40
        pytest.fail(
            f"simulation seed {report.seed} broke {len(report.violations)} invariants "
            f"(rerun: pytest tests/simulation --sim-seed={report.seed}, or "
            f"ODIN_SIM_SEED={report.seed}):\n  {shown}"
            + (f"\n  ... {more} more" if more > 0 else "")
            + f"\n{report.summary()}",
            pytrace=False,
        )


def simulate(seed: int) -> Report:
    """One scenario in a fresh Trio run with an autojumping clock (what ``autojump_clock``
    gives a pytest-trio test), for the tests that are not themselves async."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(run, plan(seed), clock=clock)


@pytest.mark.trio
@pytest.mark.parametrize("seed", FIXED_SEEDS)
async def test_fixed_seed(
    seed: int, autojump_clock: trio.testing.MockClock, request: pytest.FixtureRequest
) -> None:
    asked = asked_seed(request.config)
    if asked is not None and asked != seed:
        pytest.skip(f"only seed {asked} was asked for")
    report = await run(plan(seed))
    print(report.summary())
    judge(report)


@pytest.mark.trio
async def test_the_seed_asked_for(
    autojump_clock: trio.testing.MockClock, request: pytest.FixtureRequest
) -> None:
    seed = asked_seed(request.config)
    if seed is None:
        pytest.skip("no --sim-seed / ODIN_SIM_SEED given")
    report = await run(plan(seed))
    print(report.summary())
    judge(report)


@settings(
    max_examples=3,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(min_value=1_000, max_value=2**32 - 1))
def test_hypothesis_seeds(seed: int) -> None:
    judge(simulate(seed))


def test_random_seeds_for_the_time_budget(request: pytest.FixtureRequest) -> None:
    if asked_seed(request.config) is not None:
        pytest.skip("a single seed was asked for")
    chooser = random.Random()  # which seeds: anything; each one is still an exact replay
    deadline = time.perf_counter() + BUDGET
    reports: list[Report] = []
    while time.perf_counter() < deadline:
        reports.append(simulate(chooser.randrange(2**32)))
        judge(reports[-1])
    hours = sum(report.client_seconds for report in reports) / 3600
    wall = sum(report.wall_seconds for report in reports)
    print(
        f"{len(reports)} random seeds ({[r.seed for r in reports]}): {hours:.2f} client-hours "
        f"in {wall:.1f} s of wall time, {hours / max(wall, 1e-9) * 60:.1f} client-hours/minute"
    )
