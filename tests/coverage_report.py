"""Coverage by package, from the combined data of a `coverage run -m pytest` (tox -e check):
for each package of the measured source (odin_fanout, odin_fanout/server, odin_fanout/console,
...) its statements and how many ran, then each part of the repository (odin, console,
publisher, stress) and the total. Files no test imported count, as unexecuted (``source_pkgs``
in pyproject.toml).

    coverage combine && python -m tests.coverage_report
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parents[1]


def statements_by_file(cov: coverage.Coverage) -> dict[Path, tuple[int, int]]:
    """Each measured file (relative to the repository): its statements, and those not run."""
    cov.load()
    counts = {}
    for name in sorted(cov.get_data().measured_files()):
        path = Path(name)
        if not path.is_relative_to(ROOT) or not path.exists():
            continue
        _, statements, _, missing, _ = cov.analysis2(name)
        counts[path.relative_to(ROOT)] = (len(statements), len(missing))
    return counts


def table(rows: dict[str, tuple[int, int]]) -> list[str]:
    width = max(len(name) for name in rows)
    lines = [f"{'package':<{width}}  {'stmts':>6}  {'miss':>6}  {'cover':>6}"]
    for name, (statements, missing) in rows.items():
        cover = 100.0 * (statements - missing) / statements if statements else 100.0
        lines.append(f"{name:<{width}}  {statements:>6}  {missing:>6}  {cover:>5.1f}%")
    return lines


def main() -> int:
    files = statements_by_file(coverage.Coverage())
    if not files:
        print("no coverage data: run `coverage run -m pytest`, then `coverage combine`")
        return 1
    directories: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    packages: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total = [0, 0]
    for path, (statements, missing) in files.items():
        # A part's folder (odin/, console/, ...) holds its piece of the odin_fanout namespace:
        # directories are shown by the package they are, grouped by the folder.
        package = path.parent.relative_to(path.parts[0]).as_posix()
        for counts in (directories[package], packages[path.parts[0]], total):
            counts[0] += statements
            counts[1] += missing
    rows = {name: (s, m) for name, (s, m) in sorted(directories.items()) if s}
    rows.update({f"{name} (all)": (s, m) for name, (s, m) in sorted(packages.items())})
    rows["total"] = (total[0], total[1])
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
