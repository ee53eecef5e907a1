"""Messages the network side posts to the app: links, updates and the outcome of actions."""

from __future__ import annotations

from textual.message import Message

from odin_fanout.console.link import LinkStatus
from odin_fanout.control.protocol import HostWorkers, RateHistory, Update


class LinkChanged(Message):
    def __init__(self, key: str, status: LinkStatus) -> None:
        super().__init__()
        self.key = key
        self.status = status


class UpdateArrived(Message):
    def __init__(self, key: str, update: Update) -> None:
        super().__init__()
        self.key = key
        self.update = update


class HistoryArrived(Message):
    """A server's last hour of rates, at attach."""

    def __init__(self, key: str, history: RateHistory) -> None:
        super().__init__()
        self.key = key
        self.history = history


class WorkersArrived(Message):
    """A supervisor's report of its workers."""

    def __init__(self, key: str, workers: HostWorkers) -> None:
        super().__init__()
        self.key = key
        self.workers = workers


class ActionOutcome(Message):
    """What came of an operator's action (kick, drain), for a notification."""

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__()
        self.text = text
        self.error = error
