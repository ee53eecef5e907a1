"""The writer: what a flush writes at once, what a task writes later while the socket pushes
back, the queue's answers (queued, full, closed), the waits, and a peer that goes away. Real
sockets (a local socket pair, no network), and in-memory streams for the path without a file
descriptor."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from odin_fanout.server.outbox import Outbox
from odin_fanout.server.writer import Flusher, Offer, Writer

pytestmark = pytest.mark.trio


@asynccontextmanager
async def socket_pair(
    *, small_buffers: bool = False
) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    """The writer's end and the reader's end; with ``small_buffers`` the socket takes only a
    few kilobytes before it pushes back."""
    left, right = trio.socket.socketpair()
    if small_buffers:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
    try:
        yield ours, theirs
    finally:
        await ours.aclose()
        await theirs.aclose()


def frames_of(count: int, *, seed: int = 1, largest: int = 3000) -> list[bytes]:
    """Distinct frames of varied sizes, so a cut anywhere shows in the bytes received."""
    rng = random.Random(seed)
    return [f"[{n}:".encode() + rng.randbytes(rng.randint(1, largest)) + b"]" for n in range(count)]


async def read_exactly(stream: trio.abc.ReceiveStream, size: int, timeout: float = 10) -> bytes:
    data = bytearray()
    with trio.fail_after(timeout):
        while len(data) < size:
            chunk = await stream.receive_some(65536)
            assert chunk, f"EOF after {len(data)} of {size} bytes"
            data += chunk
    return bytes(data)


def offer_all(writer: Writer, frames: list[bytes]) -> None:
    for frame in frames:
        assert writer.offer(frame) is Offer.QUEUED


async def test_a_batch_leaves_in_order_in_one_flush_without_a_task() -> None:
    frames = [f"frame {n:04d};".encode() for n in range(200)]
    total = sum(map(len, frames))
    flusher = Flusher()
    async with socket_pair() as (ours, theirs), trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(1000, 1 << 20), flusher)
        writer.attach(nursery)
        offer_all(writer, frames)
        assert writer.bytes_written == 0  # nothing leaves before the flush
        assert writer.queued_messages == 200
        flusher.flush()
        # The socket took all of it, synchronously, within the flush: no task was needed.
        assert writer.bytes_written == total
        assert writer.queued_messages == writer.queued_bytes == 0
        assert not nursery.child_tasks
        assert await read_exactly(theirs, total) == b"".join(frames)


async def test_what_the_socket_does_not_take_is_written_by_a_task_as_the_peer_reads() -> None:
    frames = frames_of(200)
    total = sum(map(len, frames))
    async with (
        socket_pair(small_buffers=True) as (ours, theirs),
        trio.open_nursery() as nursery,
    ):
        writer = Writer(ours, Outbox(1000, 1 << 20), Flusher())
        writer.attach(nursery)
        offer_all(writer, frames)
        writer.flush()
        assert 0 < writer.bytes_written < total
        assert writer.queued_bytes == total - writer.bytes_written
        assert len(nursery.child_tasks) == 1  # the task waiting for the socket
        received = await read_exactly(theirs, total)
        assert received == b"".join(frames)
        with trio.fail_after(5):
            await writer.wait_flushed()
        assert writer.bytes_written == total
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks  # an idle writer has no task


async def test_frames_offered_while_the_task_waits_follow_the_earlier_ones() -> None:
    first, second = frames_of(100, seed=2), frames_of(100, seed=3)
    total = sum(map(len, first + second))
    flusher = Flusher()
    async with (
        socket_pair(small_buffers=True) as (ours, theirs),
        trio.open_nursery() as nursery,
    ):
        writer = Writer(ours, Outbox(1000, 1 << 20), flusher)
        writer.attach(nursery)
        offer_all(writer, first)
        flusher.flush()
        assert len(nursery.child_tasks) == 1
        offer_all(writer, second)
        flusher.flush()  # the task owns the socket: this flush writes nothing
        assert len(nursery.child_tasks) == 1
        assert await read_exactly(theirs, total) == b"".join(first + second)


async def test_full_at_the_bound_and_closed_after_mark_closed() -> None:
    async with socket_pair() as (ours, _):
        writer = Writer(ours, Outbox(2, 1000), Flusher())
        assert writer.offer(b"one", "a", 1) is Offer.QUEUED
        assert writer.offer(b"two", "a", 2) is Offer.QUEUED
        assert writer.offer(b"three", "a", 3) is Offer.FULL
        assert writer.queued_messages == 2
        assert writer.offer(b"close", force=True) is Offer.QUEUED
        assert writer.queued_messages == 3
        writer.mark_closed()
        assert writer.is_closed
        assert (writer.queued_messages, writer.queued_bytes) == (0, 0)
        assert writer.offer(b"late") is Offer.CLOSED
        assert writer.offer(b"late", force=True) is Offer.CLOSED
        writer.flush()
        assert writer.bytes_written == 0


async def test_set_limits_applies_to_the_next_offer() -> None:
    async with socket_pair() as (ours, _):
        writer = Writer(ours, Outbox(1, 1000), Flusher())
        assert writer.offer(b"one") is Offer.QUEUED
        assert writer.offer(b"two") is Offer.FULL
        writer.set_limits(2, 1000)
        assert writer.offer(b"two") is Offer.QUEUED


async def test_wait_for_room_returns_once_the_peer_has_read_enough() -> None:
    # 100 frames of 1000 bytes fill the queue to its bound; the socket takes ~8 KB of them.
    frames = [bytes([n]) * 1000 for n in range(100)]
    total = sum(map(len, frames))
    room = trio.Event()
    async with (
        socket_pair(small_buffers=True) as (ours, theirs),
        trio.open_nursery() as nursery,
    ):
        writer = Writer(ours, Outbox(100, 100_000), Flusher())
        writer.attach(nursery)
        offer_all(writer, frames)
        assert writer.offer(b"x") is Offer.FULL

        async def replay_step() -> None:
            await writer.wait_for_room()
            room.set()

        nursery.start_soon(replay_step)
        await trio.testing.wait_all_tasks_blocked()
        assert not room.is_set()  # the peer has read nothing: still more than half full

        received = bytearray()
        with trio.fail_after(10):
            while not writer.outbox.half_empty:
                received += await theirs.receive_some(65536)
                await trio.testing.wait_all_tasks_blocked()
        # Half empty, but far from empty: the wait must be over now, not when all is sent.
        assert writer.queued_messages > 10
        assert room.is_set()
        received += await read_exactly(theirs, total - len(received))
        assert bytes(received) == b"".join(frames)


async def test_wait_flushed_returns_once_everything_is_written() -> None:
    frames = frames_of(100, seed=4)
    total = sum(map(len, frames))
    flushed = trio.Event()
    async with (
        socket_pair(small_buffers=True) as (ours, theirs),
        trio.open_nursery() as nursery,
    ):
        writer = Writer(ours, Outbox(1000, 1 << 20), Flusher())
        writer.attach(nursery)
        offer_all(writer, frames)

        async def flush_all() -> None:
            await writer.wait_flushed()
            flushed.set()

        nursery.start_soon(flush_all)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set()
        received = bytearray()
        with trio.fail_after(10):
            while len(received) < total:
                received += await theirs.receive_some(4096)
                await trio.testing.wait_all_tasks_blocked()
                # Over exactly when the last byte is handed to the socket.
                assert flushed.is_set() == (writer.queued_bytes == 0)
        assert flushed.is_set()
        assert received == b"".join(frames)
        assert writer.bytes_written == total


async def test_wait_flushed_with_nothing_queued_returns_at_once() -> None:
    async with socket_pair() as (ours, _):
        writer = Writer(ours, Outbox(10, 1000), Flusher())
        with trio.fail_after(1):
            await writer.wait_flushed()
            await writer.wait_for_room()


async def test_a_closed_peer_marks_the_writer_closed_without_raising() -> None:
    flusher = Flusher()
    async with socket_pair() as (ours, theirs), trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(10, 1000), flusher)
        writer.attach(nursery)
        await theirs.aclose()
        assert writer.offer(b"hello?") is Offer.QUEUED
        flusher.flush()  # must not raise
        assert writer.is_closed
        assert isinstance(writer.error, OSError)
        assert writer.offer(b"again") is Offer.CLOSED
        with trio.fail_after(1):
            await writer.wait_flushed()
            await writer.wait_for_room()


async def test_a_peer_that_goes_away_while_the_task_waits_ends_the_task_quietly() -> None:
    frames = frames_of(100, seed=5)
    async with (
        socket_pair(small_buffers=True) as (ours, theirs),
        trio.open_nursery() as nursery,
    ):
        writer = Writer(ours, Outbox(1000, 1 << 20), Flusher())
        writer.attach(nursery)
        offer_all(writer, frames)
        writer.flush()
        assert len(nursery.child_tasks) == 1
        await theirs.aclose()
        with trio.fail_after(5):
            await writer.wait_flushed()
        assert writer.is_closed
        assert isinstance(writer.error, OSError)
        assert writer.queued_messages == 0
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks
    # The nursery closed without an exception from the writer's task.


class CountingWriter(Writer):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


async def test_flusher_flushes_every_marked_writer_once() -> None:
    flusher = Flusher()
    async with (
        socket_pair() as (a, a_peer),
        socket_pair() as (b, b_peer),
        socket_pair() as (c, _),
    ):
        writers = [CountingWriter(stream, Outbox(100, 10_000), flusher) for stream in (a, b, c)]
        a_frames = [f"a{n};".encode() for n in range(5)]
        b_frames = [f"b{n};".encode() for n in range(7)]
        offer_all(writers[0], a_frames)
        offer_all(writers[1], b_frames)
        flusher.flush()
        assert [w.flushes for w in writers] == [1, 1, 0]
        assert [w.bytes_written for w in writers] == [15, 21, 0]
        assert await read_exactly(a_peer, 15) == b"".join(a_frames)
        assert await read_exactly(b_peer, 21) == b"".join(b_frames)
        flusher.flush()  # nothing marked since
        assert [w.flushes for w in writers] == [1, 1, 0]
        assert writers[1].offer(b"more") is Offer.QUEUED
        flusher.flush()
        assert [w.flushes for w in writers] == [1, 2, 0]
        assert await read_exactly(b_peer, 4) == b"more"


async def test_flusher_run_writes_what_nobody_flushed() -> None:
    flusher = Flusher()
    async with socket_pair() as (ours, theirs), trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        writer = Writer(ours, Outbox(10, 1000), flusher)
        writer.attach(nursery)
        assert writer.offer(b"ping") is Offer.QUEUED
        assert await read_exactly(theirs, 4, timeout=5) == b"ping"
        assert writer.offer(b"pong") is Offer.QUEUED
        assert await read_exactly(theirs, 4, timeout=5) == b"pong"
        nursery.cancel_scope.cancel()


async def test_a_stream_without_a_file_descriptor_is_written_by_the_task() -> None:
    frames = frames_of(100, seed=6)  # well over one joined batch (64 KiB)
    total = sum(map(len, frames))
    ours, theirs = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(1000, 1 << 20), Flusher())
        writer.attach(nursery)
        offer_all(writer, frames)
        writer.flush()
        assert writer.bytes_written == 0
        assert len(nursery.child_tasks) == 1
        assert await read_exactly(theirs, total) == b"".join(frames)
        with trio.fail_after(5):
            await writer.wait_flushed()
        assert writer.bytes_written == total
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks


async def test_frames_being_sent_on_a_stream_without_a_file_descriptor_are_not_dropped() -> None:
    # A lockstep stream's send_all returns only once the peer has read: the frames handed to
    # it are on their way, like a started frame, and conflating meanwhile must not cut them.
    ours, theirs = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(1000, 1 << 20), Flusher())
        writer.attach(nursery)
        for seq in (1, 2):
            writer.offer(f"<a#{seq}>".encode(), "a", seq)
        writer.flush()
        await trio.testing.wait_all_tasks_blocked()  # the task is in send_all with a#1, a#2
        writer.offer(b"<a#3>", "a", 3)
        writer.offer(b"<b#1>", "b", 1)
        # The queue is full, the connection conflates (connection.py's _overflow).
        writer.outbox.conflate(lambda channel, first, last: f"<gap {first}-{last}>".encode())
        received = bytearray()

        async def read_all() -> None:
            while True:
                received.extend(await theirs.receive_some(65536))

        nursery.start_soon(read_all)
        with trio.fail_after(5):
            await writer.wait_flushed()
        await trio.testing.wait_all_tasks_blocked()
        # a#1 and a#2 were on their way, so nothing was lost and no gap is announced; above all
        # every frame arrives whole.
        assert bytes(received) == b"<a#1><a#2><a#3><b#1>"
        assert writer.queued_bytes == 0
        nursery.cancel_scope.cancel()


async def test_write_now_writes_a_lone_frame_at_once_and_queues_behind_a_waiting_queue() -> None:
    async with socket_pair() as (ours, theirs), trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(100, 100_000), Flusher())
        writer.attach(nursery)
        assert writer.write_now(b"alone", "a", 1, 0.0) is Offer.QUEUED
        # On the wire already: no flush, nothing queued.
        assert (writer.bytes_written, writer.queued_messages) == (5, 0)
        assert await read_exactly(theirs, 5) == b"alone"
        # Behind frames that wait for a flush, it waits too, so the order holds.
        assert writer.offer(b"first") is Offer.QUEUED
        assert writer.write_now(b"second", "a", 2, 0.0) is Offer.QUEUED
        assert writer.queued_messages == 2
        writer.flush()
        assert await read_exactly(theirs, 11) == b"firstsecond"
        writer.mark_closed()
        assert writer.write_now(b"late", "a", 3, 0.0) is Offer.CLOSED


async def test_write_now_queues_what_the_socket_did_not_take_in_order() -> None:
    frames = frames_of(60, seed=7)
    async with socket_pair(small_buffers=True) as (ours, theirs), trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(1000, 1_000_000), Flusher())
        writer.attach(nursery)
        for frame in frames:
            assert writer.write_now(frame, "a", 1, 0.0) is Offer.QUEUED
        assert writer.queued_messages > 0  # the socket pushed back: the rest waits in order
        total = b"".join(frames)
        assert await read_exactly(theirs, len(total)) == total
        with trio.fail_after(10):
            await writer.wait_flushed()
        assert writer.bytes_written == len(total)


async def test_forced_frames_leave_live_frames_the_whole_bound() -> None:
    # A subscribe's hand-over is forced past the bound; the live messages after it are not
    # refused for it (the client would be taken for a slow consumer).
    async with socket_pair() as (ours, _):
        writer = Writer(ours, Outbox(2, 1000), Flusher())
        for n in range(5):
            assert writer.offer(f"replay {n}".encode(), force=True) is Offer.QUEUED
        assert writer.offer(b"live 1", "a", 1) is Offer.QUEUED
        assert writer.offer(b"live 2", "a", 2) is Offer.QUEUED
        assert writer.offer(b"live 3", "a", 3) is Offer.FULL
        assert writer.queued_messages == 7


async def test_what_write_now_could_not_write_counts_against_the_bound() -> None:
    big = b"x" * 1_000_000  # more than the socket takes at once
    async with socket_pair(small_buffers=True) as (ours, theirs), trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(2, 2_000_000), Flusher())
        writer.attach(nursery)
        assert writer.write_now(big, "a", 1, 0.0) is Offer.QUEUED
        assert writer.queued_messages == 1  # its rest, which is a live message like any
        assert writer.offer(b"live 2", "a", 2) is Offer.QUEUED
        assert writer.offer(b"live 3", "a", 3) is Offer.FULL
        assert await read_exactly(theirs, len(big) + 6) == big + b"live 2"
        nursery.cancel_scope.cancel()


async def test_wait_for_room_waits_for_forced_frames_too() -> None:
    # A paced replay's frames are forced: the pace must still follow the reader.
    async with socket_pair(small_buffers=True) as (ours, theirs), trio.open_nursery() as nursery:
        writer = Writer(ours, Outbox(4, 1_000_000), Flusher())
        writer.attach(nursery)
        frames = frames_of(40, seed=3)
        for frame in frames:
            writer.offer(frame, force=True)
        waited = trio.Event()

        async def wait() -> None:
            await writer.wait_for_room()
            waited.set()

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()  # nothing read yet: far over half the bound
        total = b"".join(frames)
        assert await read_exactly(theirs, len(total)) == total
        with trio.fail_after(10):
            await waited.wait()
        nursery.cancel_scope.cancel()
