"""``python -m console``: the same as ``odin-console``."""

from __future__ import annotations

from odin_fanout.console.cli import main

raise SystemExit(main())
