"""``odin-stress``'s entry point: without the ``stress`` extra it says in one line what to
install (exit 2) instead of a traceback from the first import that fails."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Final

EX_USAGE: Final = 2
NEEDED: Final = {"rich": "rich", "hdrh": "hdrhistogram"}
"""Import name: distribution, for what ``odin-stress`` cannot start without (uvloop is used
when present)."""


def missing() -> list[str]:
    return [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]


def main(argv: Sequence[str] | None = None) -> int:
    absent = missing()
    if absent:
        sys.stderr.write(
            f"odin-stress needs the stress extra ({', '.join(absent)} not installed): "
            "pip install 'odin-fanout[stress]' (in a checkout: pip install -e '.[stress]')\n"
        )
        return EX_USAGE
    from odin_fanout.stress.cli import main as run

    return run(argv)
