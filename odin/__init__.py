"""Odin: a real-time WebSocket fan-out server for market events, on Trio."""

from __future__ import annotations

__version__ = "0.1.0"
