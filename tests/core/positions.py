"""Positioned messages for the core's tests: a position and its predecessor, nothing else."""

from __future__ import annotations

import attrs


@attrs.frozen
class Msg:
    seq: int
    prev: int


def chain(*seqs: int, prev: int = 0) -> list[Msg]:
    """Messages of one channel at ``seqs``, each linked to the one before."""
    messages = []
    for seq in seqs:
        messages.append(Msg(seq, prev))
        prev = seq
    return messages
