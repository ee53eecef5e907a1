from __future__ import annotations

from odin_fanout.stress.entry import main

raise SystemExit(main())
