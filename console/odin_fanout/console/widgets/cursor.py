"""The tables' rows, with the keys of k9s and less besides the arrows: ``j``/``k`` a row down or
up, ``g``/``G`` the first or the last row."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable


class CursorTable(DataTable[str | Text]):
    # The table's own actions, so each key does exactly what its arrow (or ctrl+home/end)
    # does. Bound here, on the table: a filter being typed in never sees them.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Next row", show=False),
        Binding("k", "cursor_up", "Previous row", show=False),
        Binding("g", "scroll_top", "First row", show=False),
        Binding("G", "scroll_bottom", "Last row", show=False, key_display="G"),
    ]
