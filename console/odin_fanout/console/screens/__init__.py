"""The console's modal screens: confirmations and help."""

from __future__ import annotations
