"""odin-console: the operator's terminal console for Odin servers, on Textual.

It runs in its own process on asyncio and talks to each server only through the control
protocol (``odin_fanout.control``) over the server's Unix socket.
"""

from __future__ import annotations
