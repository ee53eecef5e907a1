"""``server.worker_sockets = reuseport``: the supervisor holds the port with sockets that are
bound but do not listen, so an address in use is one error before any worker starts."""

from __future__ import annotations

import socket

import pytest

from odin_fanout.host.supervisor import reserve_port
from odin_fanout.server.app import StartError


def test_port_0_becomes_one_port_held_for_the_workers() -> None:
    reserved = reserve_port("127.0.0.1", 0)
    try:
        ports = {sock.getsockname()[1] for sock in reserved}
        assert len(ports) == 1 and 0 not in ports
        (port,) = ports
        # A worker binds the same port beside it (SO_REUSEPORT) and listens.
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.listen()
        worker.close()
        # Anyone else is refused the port while it is held.
        other = socket.socket()
        with pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        other.close()
    finally:
        for sock in reserved:
            sock.close()


def test_an_address_in_use_is_one_error_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartError, match=rf"^address 127\.0\.0\.1:{port} "):
            reserve_port("127.0.0.1", port)


def test_an_ops_address_in_use_names_its_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartError) as refused:
            reserve_port("127.0.0.1", port, setting="server.ops_listen")
        assert str(refused.value) == (
            f"address 127.0.0.1:{port} already in use (server.ops_listen)"
        )
