from __future__ import annotations

from odin_fanout.cli import main

raise SystemExit(main())
