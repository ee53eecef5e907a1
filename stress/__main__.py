from __future__ import annotations

from stress.cli import main

raise SystemExit(main())
