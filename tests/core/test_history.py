"""The bounded per-channel history window: trimming, expiry, eviction and positions."""

from __future__ import annotations

import itertools

import attrs
import pytest

from odin_fanout.core.history import Appended, HistoryLog


@attrs.frozen
class Entry:
    seq: int
    prev: int


def make_log(
    max_messages: int = 100, max_age: float = 60.0, max_channels: int = 10
) -> HistoryLog[Entry]:
    return HistoryLog(max_messages=max_messages, max_age=max_age, max_channels=max_channels)


def fill(log: HistoryLog[Entry], channel: str, seqs: list[int], now: float = 0.0) -> None:
    """Append linked entries with the given positions."""
    prev = log.last_seq(channel)
    for seq in seqs:
        assert log.append(channel, Entry(seq, prev), now) == Appended()
        prev = seq


def seqs_of(entries: list[Entry]) -> list[int]:
    return [entry.seq for entry in entries]


@pytest.mark.parametrize(
    "limits",
    [
        {"max_messages": 0, "max_age": 1.0, "max_channels": 1},
        {"max_messages": 1, "max_age": 0.0, "max_channels": 1},
        {"max_messages": 1, "max_age": 1.0, "max_channels": 0},
    ],
)
def test_limits_must_be_positive(limits):
    with pytest.raises(ValueError, match="positive"):
        HistoryLog(**limits)


def test_append_and_read_back():
    log = make_log()
    fill(log, "A.trade", [1, 4, 9])
    assert log.knows("A.trade")
    assert not log.knows("B.trade")
    assert log.last_seq("A.trade") == 9
    assert log.last_seq("B.trade") == 0
    assert log.message_count() == 3
    assert log.latest("A.trade", now=0.0) == Entry(9, 4)
    assert seqs_of(log.after("A.trade", 0, limit=10, now=0.0)) == [1, 4, 9]


def test_max_messages_keeps_the_newest():
    log = make_log(max_messages=3)
    fill(log, "A.trade", [1, 2, 3, 4, 5])
    assert seqs_of(log.after("A.trade", 0, limit=10, now=0.0)) == [3, 4, 5]
    assert log.stats.messages_trimmed == 2
    assert log.message_count() == 3
    assert log.last_seq("A.trade") == 5


def test_max_age_expires_old_entries():
    log = make_log(max_age=10.0)
    log.append("A.trade", Entry(1, 0), now=0.0)
    log.append("A.trade", Entry(2, 1), now=5.0)
    log.append("A.trade", Entry(3, 2), now=8.0)
    # Exactly max_age old is still retained.
    assert seqs_of(log.after("A.trade", 0, limit=10, now=10.0)) == [1, 2, 3]
    assert seqs_of(log.after("A.trade", 0, limit=10, now=15.5)) == [3]
    assert log.stats.messages_expired == 2
    assert log.latest("A.trade", now=100.0) is None
    assert log.stats.messages_expired == 3
    assert log.after("A.trade", 0, limit=10, now=100.0) == []


def test_appending_expires_old_entries_of_that_channel():
    log = make_log(max_age=10.0)
    log.append("A.trade", Entry(1, 0), now=0.0)
    log.append("A.trade", Entry(2, 1), now=20.0)
    assert log.message_count() == 1
    assert log.stats.messages_expired == 1


def test_last_seq_survives_expiry():
    log = make_log(max_age=1.0)
    fill(log, "A.trade", [3, 7])
    log.expire_all(now=50.0)
    assert log.message_count() == 0
    assert log.knows("A.trade")
    assert log.last_seq("A.trade") == 7
    # A stale re-delivery is still recognised after its entry expired.
    assert log.append("A.trade", Entry(7, 3), now=50.0) == Appended(duplicate=True)


def test_expire_all_covers_every_channel():
    log = make_log(max_age=5.0)
    log.append("A.trade", Entry(1, 0), now=0.0)
    log.append("B.trade", Entry(2, 0), now=0.0)
    log.append("C.trade", Entry(3, 0), now=4.0)
    log.expire_all(now=7.0)
    assert log.message_count() == 1
    assert log.stats.messages_expired == 2
    assert log.latest("C.trade", now=7.0) == Entry(3, 0)


def test_max_channels_forgets_the_least_recently_appended_channel():
    log = make_log(max_channels=2)
    log.append("A.trade", Entry(1, 0), now=0.0)
    log.append("B.trade", Entry(2, 0), now=0.0)
    log.append("A.trade", Entry(3, 1), now=0.0)  # A is now the most recent
    log.append("C.trade", Entry(4, 0), now=0.0)
    assert log.channels() == ["A.trade", "C.trade"]
    assert not log.knows("B.trade")
    assert log.last_seq("B.trade") == 0
    assert log.after("B.trade", 0, limit=10, now=0.0) == []
    assert log.stats.channels_evicted == 1
    log.append("D.trade", Entry(5, 0), now=0.0)
    assert log.channels() == ["C.trade", "D.trade"]
    assert log.stats.channels_evicted == 2
    assert log.message_count() == 2


def test_duplicates_are_not_stored():
    log = make_log()
    fill(log, "A.trade", [5, 8])
    assert log.append("A.trade", Entry(8, 5), now=0.0) == Appended(duplicate=True)
    assert log.append("A.trade", Entry(6, 5), now=0.0) == Appended(duplicate=True)
    assert log.append("A.trade", Entry(1, 0), now=0.0) == Appended(duplicate=True)
    assert seqs_of(log.after("A.trade", 0, limit=10, now=0.0)) == [5, 8]
    assert log.last_seq("A.trade") == 8


def test_channels_are_independent():
    log = make_log()
    fill(log, "A.trade", [5])
    # Positions are shared by all channels: a lower position on another channel is no duplicate.
    assert log.append("B.trade", Entry(3, 0), now=0.0) == Appended()
    assert log.last_seq("A.trade") == 5
    assert log.last_seq("B.trade") == 3


def test_missed_positions_are_reported_when_prev_skips():
    log = make_log()
    fill(log, "A.trade", [2, 4])
    # The entry says the channel's previous message was at 9: 5..9 never reached the log.
    assert log.append("A.trade", Entry(12, 9), now=0.0) == Appended(missed_from=5, missed_to=9)
    # The entry is stored anyway, and the next linked one is fine.
    assert log.append("A.trade", Entry(13, 12), now=0.0) == Appended()
    assert seqs_of(log.after("A.trade", 0, limit=10, now=0.0)) == [2, 4, 12, 13]


def test_first_entry_of_a_channel_reports_nothing_missed():
    log = make_log()
    assert log.append("A.trade", Entry(50, 40), now=0.0) == Appended()


def test_prev_at_or_before_last_is_not_a_miss():
    log = make_log()
    fill(log, "A.trade", [4])
    # prev < last_seq happens when the log saw a message the publisher later superseded;
    # only skipped positions are reported.
    assert log.append("A.trade", Entry(7, 3), now=0.0) == Appended()


def test_skip_to_suppresses_a_second_report():
    log = make_log()
    fill(log, "A.trade", [2])
    log.skip_to("A.trade", 9)
    assert log.last_seq("A.trade") == 9
    assert log.append("A.trade", Entry(12, 9), now=0.0) == Appended()
    # skip_to never moves backwards, and ignores channels the log does not know.
    log.skip_to("A.trade", 5)
    assert log.last_seq("A.trade") == 12
    log.skip_to("Z.trade", 100)
    assert not log.knows("Z.trade")


def test_skip_to_makes_older_positions_duplicates():
    log = make_log()
    fill(log, "A.trade", [2])
    log.skip_to("A.trade", 9)
    assert log.append("A.trade", Entry(8, 2), now=0.0) == Appended(duplicate=True)


def test_after_returns_the_oldest_entries_after_a_position():
    log = make_log()
    fill(log, "A.trade", list(range(1, 11)))
    assert seqs_of(log.after("A.trade", 3, limit=100, now=0.0)) == list(range(4, 11))
    # At most limit + 1 entries, the oldest ones, so the caller can tell more exist.
    assert seqs_of(log.after("A.trade", 3, limit=2, now=0.0)) == [4, 5, 6]
    assert seqs_of(log.after("A.trade", 3, limit=0, now=0.0)) == [4]
    assert seqs_of(log.after("A.trade", 7, limit=3, now=0.0)) == [8, 9, 10]
    assert log.after("A.trade", 10, limit=5, now=0.0) == []
    assert log.after("A.trade", 99, limit=5, now=0.0) == []
    assert log.after("B.trade", 0, limit=5, now=0.0) == []


def test_after_a_position_between_entries():
    log = make_log()
    fill(log, "A.trade", [10, 20, 30])
    assert seqs_of(log.after("A.trade", 15, limit=5, now=0.0)) == [20, 30]
    assert seqs_of(log.after("A.trade", 0, limit=5, now=0.0)) == [10, 20, 30]


def test_latest():
    log = make_log()
    assert log.latest("A.trade", now=0.0) is None
    fill(log, "A.trade", [1, 2])
    assert log.latest("A.trade", now=0.0) == Entry(2, 1)


def test_clear_forgets_everything():
    log = make_log()
    fill(log, "A.trade", [1, 2])
    fill(log, "B.trade", [3])
    log.clear()
    assert log.channels() == []
    assert log.message_count() == 0
    assert log.last_seq("A.trade") == 0
    assert not log.knows("B.trade")
    # After a clear (new epoch), low positions are new again.
    assert log.append("A.trade", Entry(1, 0), now=0.0) == Appended()


# ---- the byte bound ----------------------------------------------------------------------


def sized_log(max_bytes: int, max_messages: int = 100, max_channels: int = 10) -> HistoryLog[Entry]:
    return HistoryLog(
        max_messages=max_messages, max_age=60.0, max_channels=max_channels, max_bytes=max_bytes
    )


def fill_sized(log: HistoryLog[Entry], channel: str, seqs: list[int], size: int) -> None:
    prev = log.last_seq(channel)
    for seq in seqs:
        assert log.append(channel, Entry(seq, prev), 0.0, size) == Appended()
        prev = seq


def test_max_bytes_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        HistoryLog(max_messages=1, max_age=1.0, max_channels=1, max_bytes=0)


def test_bytes_are_the_sizes_of_the_retained_entries_whichever_bound_drops_them():
    log = HistoryLog[Entry](max_messages=3, max_age=10.0, max_channels=2, max_bytes=10_000)
    fill_sized(log, "A.trade", [1, 2], 100)
    assert log.bytes == 200
    fill_sized(log, "A.trade", [3, 4, 5], 100)  # trimmed to 3
    assert (log.bytes, log.stats.messages_trimmed) == (300, 2)
    log.append("B.trade", Entry(6, 0), 5.0, 50)
    log.expire_all(now=10.5)  # A's entries, stored at 0, are older than 10 s
    assert (log.bytes, log.stats.messages_expired) == (50, 3)
    log.append("C.trade", Entry(7, 0), 5.0, 70)  # forgets A, the least recently published
    log.append("D.trade", Entry(8, 0), 5.0, 30)  # forgets B with its entry
    assert (log.bytes, log.stats.messages_forgotten) == (100, 1)
    log.clear()
    assert log.bytes == 0
    # Without a bound the sizes are only counted.
    unbounded = make_log()
    unbounded.append("A.trade", Entry(1, 0), 0.0, 10**9)
    assert unbounded.bytes == 10**9


def test_over_the_byte_bound_the_least_recently_published_channels_oldest_go_first():
    log = sized_log(max_bytes=1000)
    fill_sized(log, "A.trade", [1, 2, 3, 4], 100)
    fill_sized(log, "B.trade", [5, 6, 7, 8], 100)
    fill_sized(log, "A.trade", [9], 100)  # A is now the most recently published
    assert log.bytes == 900
    fill_sized(log, "C.trade", [10, 11], 100)  # 1100: B (least recent) loses its oldest two
    assert log.bytes <= 1000
    assert log.stats.messages_evicted == 2
    assert seqs_of(log.after("B.trade", 0, 100, 0.0)) == [7, 8]
    assert seqs_of(log.after("A.trade", 0, 100, 0.0)) == [1, 2, 3, 4, 9]
    assert log.message_count() * 100 == log.bytes


def test_a_channel_the_byte_bound_empties_keeps_its_position_and_is_idle():
    log = sized_log(max_bytes=1000)
    fill_sized(log, "A.trade", [1, 2], 100)
    fill_sized(log, "B.trade", [3, 4, 5, 6, 7, 8, 9, 10], 100)
    fill_sized(log, "C.trade", [11], 100)  # 1100: A's two go, A is emptied
    assert log.stats.messages_evicted == 2
    assert log.after("A.trade", 0, 100, 0.0) == []
    assert log.latest("A.trade", 0.0) is None
    # Known, with its last position: a client current on A is still told it is, and the next
    # entry on A is not reported as missing anything.
    assert log.knows("A.trade")
    assert log.last_seq("A.trade") == 2
    assert log.channel_stats("A.trade", 0.0, 1.0) == (0, 2, 0)
    assert sorted(log.channels()) == ["A.trade", "B.trade", "C.trade"]
    assert log.channel_count() == 3
    assert log.append("A.trade", Entry(12, 2), 0.0, 10) == Appended()
    assert log.append("A.trade", Entry(12, 2), 0.0, 10).duplicate
    log.skip_to("C.trade", 20)
    assert log.last_seq("C.trade") == 20


def test_an_idle_channel_skips_and_reports_what_it_missed():
    log = sized_log(max_bytes=100)
    fill_sized(log, "A.trade", [1], 100)
    fill_sized(log, "B.trade", [2], 100)  # A is emptied
    assert log.last_seq("A.trade") == 1 and log.after("A.trade", 0, 10, 0.0) == []
    log.skip_to("A.trade", 5)
    assert log.last_seq("A.trade") == 5
    assert log.append("A.trade", Entry(9, 7), 0.0, 10) == Appended(missed_from=6, missed_to=7)


def test_the_byte_bound_never_leaves_a_hole_in_what_a_channel_keeps():
    # Whatever is evicted, each channel keeps its newest entries, consecutive: a reader sees a
    # shorter window (and reads the broker for the rest), never one that skips a message.
    log = sized_log(max_bytes=5_000, max_channels=50)
    prev: dict[str, int] = {}
    for seq in range(1, 3000):
        channel = f"C{(seq * 7919) % 13}.trade"
        log.append(channel, Entry(seq, prev.get(channel, 0)), 0.0, 50 + seq % 200)
        prev[channel] = seq
        assert log.bytes <= 5_000
    for channel, last in prev.items():
        kept = log.after(channel, 0, 10_000, 0.0)
        assert all(b.prev == a.seq for a, b in itertools.pairwise(kept))
        assert not kept or kept[-1].seq == last
        assert log.last_seq(channel) == last
    assert log.stats.messages_evicted > 0


def test_the_channel_bound_forgets_idle_channels_first():
    log = sized_log(max_bytes=300, max_channels=3)
    fill_sized(log, "A.trade", [1], 200)
    fill_sized(log, "B.trade", [2], 200)  # A is emptied (idle)
    fill_sized(log, "C.trade", [3], 50)
    fill_sized(log, "D.trade", [4], 50)  # a fourth channel: the idle A goes
    assert not log.knows("A.trade")
    assert log.channel_count() == 3
    assert log.stats.channels_evicted == 1
    assert seqs_of(log.after("B.trade", 0, 10, 0.0)) == [2]


def test_eviction_makes_room_below_the_bound_so_it_runs_once_per_many_appends():
    log = sized_log(max_bytes=64_000, max_messages=10_000)
    fill_sized(log, "A.trade", list(range(1, 641)), 100)  # exactly at the bound
    assert log.stats.messages_evicted == 0
    fill_sized(log, "A.trade", [641], 100)
    # Down to 63,000 (1/64 below): ten entries, then nothing for the next ten appends.
    assert (log.stats.messages_evicted, log.bytes) == (11, 63_000)
    fill_sized(log, "A.trade", list(range(642, 652)), 100)
    assert log.stats.messages_evicted == 11


def test_a_new_epoch_keeps_the_channels_known_from_zero():
    log = make_log()
    fill(log, "A", [3, 5, 8])
    log.append("B", Entry(9, 0), 0.0)
    log.restart()
    assert log.message_count() == 0
    assert log.bytes == 0
    assert (log.knows("A"), log.last_seq("A")) == (True, 0)
    # The new history's first message of A skips 1-3: reported, like any later hole.
    assert log.append("A", Entry(4, 3), 0.0) == Appended(missed_from=1, missed_to=3)
    assert log.append("B", Entry(5, 0), 0.0) == Appended()
    # A channel never seen has nothing to compare with.
    assert log.append("C", Entry(7, 6), 0.0) == Appended()
