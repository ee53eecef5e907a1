"""``odin-stress`` without its extra: one line saying what to install, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_the_stress_extra_it_says_what_to_install() -> None:
    # -S: no site-packages, as in an install without the extra (the check needs only the
    # standard library, and runs before anything else is imported); the stress tool's folder
    # alone on the path.
    code = "from odin_fanout.stress.entry import main; raise SystemExit(main(['profiles']))"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "stress")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("odin-stress needs the stress extra (rich, hdrhistogram not installed)")
    assert "pip install 'odin-fanout[stress]'" in line


def test_with_the_extra_it_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "odin_fanout.stress", "profiles"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "smoke" in done.stdout
