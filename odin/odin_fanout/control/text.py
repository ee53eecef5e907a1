"""Control-protocol results as a person reads them, shared by ``odin ctl`` and the console:
times of day and tap lines (plain text, no UI)."""

from __future__ import annotations

import time

from odin_fanout.control.protocol import TapLine


def clock(unix_time: float, *, millis: bool = False) -> str:
    """Local time of day, ``HH:MM:SS`` (with ``millis``, ``HH:MM:SS.mmm``)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(unix_time))
    return f"{stamp}.{int(unix_time * 1000) % 1000:03d}" if millis else stamp


def tap_text(line: TapLine, *, conn: bool = False) -> str:
    """One tap line: time, (with ``conn``, the connection,) channel and position, frames
    skipped before it, the frame's text; or how the tapped connection closed."""
    stamp = clock(line.time, millis=True)
    who = f" {line.conn}" if conn else ""
    skipped = f" (skipped {line.skipped})" if line.skipped else ""
    if line.closed is not None:
        closed = line.closed
        return f"{stamp}{who}{skipped} closed {closed.code} {closed.reason!r} ({closed.why})"
    where = f" {line.channel}" if line.channel else ""
    if line.seq:
        where += f"#{line.seq}"
    cut = f" [cut at {len(line.text)} of {line.bytes} bytes]" if line.truncated else ""
    return f"{stamp}{who}{where}{skipped} {line.text}{cut}"
