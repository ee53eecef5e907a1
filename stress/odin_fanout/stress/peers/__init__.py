"""Servers under test, each a separate process started by ``odin_fanout.stress.bench_fanout``.

Every one speaks the same tiny protocol with the driver: it prints a JSON line
``{"event": "listening", "port": P}`` on stdout, publishes ``round(rate * duration)``
messages at a fixed rate (or ``--burst B`` messages at once) when it reads ``start`` on stdin,
prints ``{"event": "done", ...}`` when it has published them all, and exits on end of input on
stdin or after ``--max-seconds``. A peer whose server is another process (``nats-ws``:
nats-server) adds that process's ``pid`` to ``listening``, and the client protocol and path
(``protocol``, ``ws_path``) when they are not the default ones.
"""

from __future__ import annotations
