"""The console's view-model and formatting, without Textual or sockets: histories and the
event log stay bounded, totals count only the servers that are up, and each link state has
the words an operator needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from odin_fanout.console import format
from odin_fanout.console.link import LinkState, LinkStatus
from odin_fanout.console.model import GROUP_GAP, ConsoleModel, LoggedEvent, sum_snapshots
from odin_fanout.control.protocol import EventPage, NatsState, ServerEvent, ServerIdentity, Update
from tests.console.demo import sample_snapshot

PATH = Path("/run/odin/odin-41.sock")


def identity(instance: str = "a3f9") -> ServerIdentity:
    return ServerIdentity(1, "odin", "0.1.0", instance, 41, 0.0)


def up(model: ConsoleModel, key: str = "a", instance: str = "a3f9") -> None:
    model.attach(key, Path(f"/run/odin/{key}.sock"))
    model.set_link(key, LinkStatus(LinkState.CONNECTED, identity=identity(instance)))


def event(kind: str, conn: str = "a3f9-1", **detail: str | int) -> ServerEvent:
    return ServerEvent(seq=1, time=0.0, kind=kind, conn=conn, detail=dict(detail))


def slow(conn: str, at: float, dropped: int) -> ServerEvent:
    detail: dict[str, str | int | float | bool | None] = {"action": "conflated", "dropped": dropped}
    return ServerEvent(seq=1, time=at, kind="slow_consumer", conn=conn, detail=detail)


def test_an_update_sets_the_snapshot_and_the_rate_histories_stay_bounded() -> None:
    model = ConsoleModel(history=120)
    up(model)
    for tick in range(130):
        model.apply_update("a", Update(sample_snapshot("a3f9", tick), []))
    view = model.servers["a"]
    assert view.snapshot == sample_snapshot("a3f9", 129)
    assert len(view.rate_in) == len(view.rate_out) == 120
    assert view.rate_in[-1] == sample_snapshot("a3f9", 129).in_per_s
    assert view.rate_out[0] == sample_snapshot("a3f9", 10).out_per_s


def test_the_event_log_keeps_the_newest_and_says_when_the_server_dropped_some() -> None:
    model = ConsoleModel(events=5)
    up(model)
    added = model.apply_update(
        "a", Update(sample_snapshot("a3f9"), [event("conn_open"), event("kick")], events_dropped=7)
    )
    assert [logged.event.kind for logged in added] == ["conn_open", "kick", "events_dropped"]
    assert added[-1].details == "count=7"
    assert model.servers["a"].events_dropped == 7
    for number in range(4):
        model.apply_update(
            "a", Update(sample_snapshot("a3f9"), [event("recover", f"a3f9-{number}")])
        )
    assert len(model.events) == 5
    assert [logged.number for logged in model.events] == [2, 3, 4, 5, 6]
    assert model.events[0].server == "a3f9"


def test_repeated_slow_consumers_are_one_entry_per_connection_counted() -> None:
    model = ConsoleModel()
    up(model)
    flood = [slow("a3f9-5" if n % 2 else "a3f9-6", 100.0 + n, n) for n in range(10)]
    added = model.apply_update("a", Update(sample_snapshot("a3f9"), [event("conn_open"), *flood]))
    # Each entry once, in the order of the log, however many events it took in.
    assert [(e.event.kind, e.event.conn, e.count) for e in added] == [
        ("conn_open", "a3f9-1", 1),
        ("slow_consumer", "a3f9-6", 5),
        ("slow_consumer", "a3f9-5", 5),
    ]
    five = added[2]
    assert five.details == "×5, last: action=conflated dropped=9"
    assert (five.first_time, five.event.time) == (101.0, 109.0)
    assert len(model.events) == 3

    # More of the same later: the same entry counts on and is returned as changed.
    again = model.apply_update("a", Update(sample_snapshot("a3f9"), [slow("a3f9-5", 150.0, 2)]))
    assert again == [five]
    assert (five.count, five.details) == (6, "×6, last: action=conflated dropped=2")
    # The same connection on another server is another entry.
    up(model, "b", "c81e")
    other = model.apply_update("b", Update(sample_snapshot("c81e"), [slow("a3f9-5", 151.0, 1)]))
    assert other[0] is not five and other[0].count == 1
    # Other kinds are never grouped.
    kicks = model.apply_update("a", Update(sample_snapshot("a3f9"), [event("kick", "a3f9-5")] * 2))
    assert [e.count for e in kicks] == [1, 1]
    assert model.events_matching("×6") == [five]


def test_a_repeat_after_a_quiet_minute_or_out_of_the_log_starts_a_new_entry() -> None:
    model = ConsoleModel(events=3)
    up(model)
    snapshot = sample_snapshot("a3f9")
    [first] = model.apply_update("a", Update(snapshot, [slow("a3f9-5", 0.0, 1)]))
    [late] = model.apply_update("a", Update(snapshot, [slow("a3f9-5", 0.0 + GROUP_GAP + 1, 1)]))
    assert late is not first and late.count == 1
    # The log stays bounded, and a group that fell out of it is not counted on unseen.
    for n in range(3):
        model.apply_update("a", Update(snapshot, [event("conn_open", f"a3f9-{n}")]))
    assert len(model.events) == 3 and late not in model.events
    [back] = model.apply_update("a", Update(snapshot, [slow("a3f9-5", 62.0, 1)]))
    assert back is not late and back in model.events and back.count == 1


def test_the_event_filter_looks_at_kind_connection_and_details_ignoring_case() -> None:
    close = LoggedEvent(0, "a3f9", event("conn_close", "a3f9-17", code=1008, reason="slow"))
    assert close.matches("CONN_CLOSE")
    assert close.matches("a3f9-17")
    assert close.matches("code=1008")
    assert close.details == "code=1008 reason=slow"
    spaced = LoggedEvent(1, "a3f9", event("conn_close", reason="slow consumer", why="", code=1))
    assert spaced.details == 'reason="slow consumer" code=1'
    assert close.matches("  ")
    assert not close.matches("kick")
    model = ConsoleModel()
    up(model)
    model.apply_update("a", Update(sample_snapshot("a3f9"), [close.event, event("kick", "x-2")]))
    assert [logged.event.conn for logged in model.events_matching("kick")] == ["x-2"]


def test_each_broken_link_has_its_banner_and_a_working_one_none() -> None:
    model = ConsoleModel()
    model.attach("a", PATH)
    view = model.servers["a"]
    assert view.banner() == f"connecting to {PATH}…"
    model.set_link("a", LinkStatus(LinkState.CONNECTED, identity=identity()))
    assert view.banner() is None
    assert model.banners() == []
    assert view.label == "a3f9"
    cases = {
        LinkState.LOST: f"reconnecting to {PATH}… (connection refused)",
        LinkState.MISSING: f"socket missing: {PATH}",
        LinkState.DENIED: f"permission denied: {PATH}",
        LinkState.VERSION_MISMATCH: f"protocol version mismatch: {PATH}",
        LinkState.CONNECTING: f"reconnecting to {PATH}…",
        LinkState.NOT_ANSWERING: f"not answering: {PATH} (connection refused) (retrying)",
        LinkState.GONE: f"server gone: {PATH} (connection refused) (retrying)",
    }
    for state, words in cases.items():
        model.set_link("a", LinkStatus(state, "connection refused"))
        banner = view.banner()
        assert banner is not None
        assert banner.startswith(words)
        assert model.banners() == [banner]


def test_totals_add_the_servers_that_are_up_and_keep_the_worst_queue() -> None:
    model = ConsoleModel()
    up(model, "a", "a3f9")
    up(model, "b", "c81e")
    up(model, "c", "d00d")
    first = sample_snapshot("a3f9", connections=100)
    second = attrs.evolve(
        sample_snapshot("c81e", connections=50),
        deepest_queue=999,
        dropped={"conflated": 1, "other": 2},
        nats=NatsState(False, "reconnecting", "e1", pending=5, reconnects=2),
    )
    model.apply_update("a", Update(first, []))
    model.apply_update("b", Update(second, []))
    model.apply_update("c", Update(sample_snapshot("d00d", connections=1000), []))
    model.set_link("c", LinkStatus(LinkState.LOST, "connection closed"))
    total = model.total()
    assert total is not None
    assert total.connections == 150
    assert total.max_connections == 20_000
    assert total.in_per_s == pytest.approx(first.in_per_s + second.in_per_s)
    assert total.dropped == {"conflated": 1_181, "other": 2, "slow_consumer": 23}
    assert total.deepest_queue == 999
    assert not total.nats.connected
    assert total.nats.detail == "1 of 2 up"
    assert total.nats.pending == first.nats.pending + 5
    assert [view.key for view in model.live()] == ["a", "b"]


def test_total_history_adds_the_histories_aligned_on_the_latest_point() -> None:
    model = ConsoleModel()
    up(model, "a")
    up(model, "b")
    for rate in (1.0, 2.0, 3.0):
        model.apply_update("a", Update(attrs.evolve(sample_snapshot("a"), in_per_s=rate), []))
    model.apply_update("b", Update(attrs.evolve(sample_snapshot("b"), in_per_s=10.0), []))
    rate_in, _ = model.total_history()
    assert rate_in == [1.0, 2.0, 13.0]
    assert ConsoleModel().total() is None


def test_detach_forgets_a_server() -> None:
    model = ConsoleModel()
    up(model)
    model.detach("a")
    assert model.servers == {}
    model.set_link("a", LinkStatus(LinkState.CONNECTED))  # a late report: ignored
    assert model.apply_update("a", Update(sample_snapshot("a3f9"), [event("kick")])) == []


def test_the_formats_operators_read() -> None:
    assert format.count(1234567) == "1,234,567"
    assert format.rate(12.34) == "12.3"
    assert format.rate(46080.4) == "46,080"
    compact = [format.compact(v) for v in (12.34, 2400, 92_160, 118_000, 3_420_000)]
    assert compact == ["12.3", "2,400", "92.2k", "118k", "3.4M"]
    assert format.span(0.0, 0.4) == format.clock(0.0)
    assert format.span(0.0, 39.0) == f"{format.clock(0.0)}–{format.clock(39.0)}"
    assert [format.duration(s) for s in (45, 192, 7500, 277_200)] == [
        "45s",
        "3m12s",
        "2h05m",
        "3d05h",
    ]
    assert [format.age(s) for s in (0, 1.84, 75)] == ["-", "1.8s", "1m15s"]
    assert format.nbytes(212 * 1024 * 1024) == "212.0 MiB"
    assert format.nbytes(512) == "512 B"
    assert format.reasons({}) == "0"
    assert format.reasons({"b": 2, "a": 1, "c": 0}) == "3 (a 1, b 2)"
    assert format.channels(["BTC.trade"]) == "BTC.trade"
    assert format.channels(["BTC.trade", "ETH.trade", "SOL.trade", "XRP.trade"], 24) == (
        "BTC.trade,ETH.trade +2"
    )


def test_a_snapshot_fills_every_row_of_the_overview() -> None:
    snapshot = attrs.evolve(sample_snapshot("a3f9"), draining=True)
    rows = dict(zip(format.FIGURES, format.figures(snapshot), strict=True))
    assert rows["connections"] == "812 / 10,000"
    assert rows["headroom"] == "9,188 (92%)"
    assert rows["drops"] == "1,203 (conflated 1,180, slow_consumer 23)"
    assert rows["NATS"] == "connected, lag 3"
    assert rows["not recovered"] == "5 (epoch_changed 1, history_expired 4)"
    assert rows["draining"] == "YES"
    unlimited = attrs.evolve(snapshot, max_connections=0)
    assert format.figures(unlimited)[1] == "no limit"


def test_the_model_and_the_client_load_no_ui() -> None:
    modules = ", ".join(f"odin_fanout.console.{name}" for name in ("model", "client", "format"))
    code = f"import sys, {modules}; print(sorted(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    loaded = {name.strip("'") for name in result.stdout.strip("[]\n").split(", ")}
    assert "odin_fanout.console.model" in loaded
    assert {"textual", "trio", "odin_fanout.server"} & loaded == set()


def test_sums_of_one_snapshot_are_that_snapshot_in_its_counts() -> None:
    snapshot = sample_snapshot("a3f9", 3)
    total = sum_snapshots([snapshot])
    assert total.connections == snapshot.connections
    assert total.recoveries == snapshot.recoveries
    assert total.instance == "all"


def test_older_events_go_on_top_as_many_as_the_log_has_room_for() -> None:
    model = ConsoleModel(events=5)
    up(model)
    live = [ServerEvent(10 + n, 100.0 + n, "conn_open", f"a3f9-{n}") for n in range(3)]
    model.apply_update("a", Update(sample_snapshot("a3f9"), live))
    older = [ServerEvent(seq, float(seq), "conn_close", f"a3f9-{seq}") for seq in (6, 7, 8, 9)]
    page = EventPage(older, first=6, last=12, capacity=2000, more=False)
    added = model.add_older({"a": page})
    assert [logged.event.seq for logged in added] == [8, 9]  # room for two: the newest
    assert [logged.event.seq for logged in model.events] == [8, 9, 10, 11, 12]
    numbers = [logged.number for logged in model.events]
    assert numbers == sorted(numbers)  # before every entry that came live
    view = model.servers["a"]
    assert view.oldest_seq == 8
    assert not view.events_start  # 6 and 7 are still on the server
    assert model.room == 0
    assert model.add_older({"a": page}) == []
    # Another process behind the socket: its positions start again.
    other = attrs.evolve(identity(), pid=42)
    model.set_link("a", LinkStatus(LinkState.CONNECTED, identity=other))
    assert view.oldest_seq == 0
