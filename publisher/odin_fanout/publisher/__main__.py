from __future__ import annotations

import sys

from odin_fanout.publisher.cli import main

sys.exit(main())
