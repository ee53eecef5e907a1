from __future__ import annotations

from stress.entry import main

raise SystemExit(main())
