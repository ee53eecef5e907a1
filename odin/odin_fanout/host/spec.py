"""What a supervisor tells a worker it starts: one JSON argument (``odin serve --worker``).

The worker loads its configuration as the supervisor did (the same file and flag values,
``overrides``), so a SIGHUP reloads every worker the same way; what only a worker needs (its
slot, the inherited sockets, the embedded NATS's address) comes here too.
"""

from __future__ import annotations

import attrs
import cattrs
import orjson


@attrs.frozen
class WorkerSpec:
    slot: int
    count: int
    supervisor_pid: int
    directory: str
    """The host directory (shared metrics, the workers' state)."""
    status_fd: int
    """One end of a socket pair: the worker writes its ``ready`` line there, and reads EOF
    when the supervisor is gone (then it drains and exits)."""
    listen_fds: list[int] = attrs.Factory(list)
    """Listening sockets inherited from the supervisor (``server.worker_sockets = shared``)."""
    reuseport: list[tuple[str, int]] = attrs.Factory(list)
    """Addresses to bind with SO_REUSEPORT (``server.worker_sockets = reuseport``)."""
    config_file: str | None = None
    overrides: dict[str, object] = attrs.Factory(dict)
    """The supervisor's, with the worker's own: ``nats.url`` of the embedded server,
    ``control.path``, the simulator off but in the first worker."""

    def encode(self) -> str:
        return orjson.dumps(_CONVERTER.unstructure(self)).decode()

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        """Raises ValueError on anything but what ``encode`` wrote."""
        try:
            return _CONVERTER.structure(orjson.loads(text), cls)
        except (orjson.JSONDecodeError, cattrs.BaseValidationError, TypeError) as exc:
            raise ValueError(f"not a worker specification: {exc}") from None


_CONVERTER = cattrs.Converter()
_CONVERTER.register_structure_hook_func(lambda kind: kind is object, lambda value, _: value)
