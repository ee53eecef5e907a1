"""The console's views: overview, tables, event log."""

from __future__ import annotations
