from __future__ import annotations

from odin.cli import main

raise SystemExit(main())
