"""TLS on the client listener (``server.tls_cert``, ``server.tls_key``): the context, and the
holder the accept path reads once per connection.

A reload (SIGHUP) builds a new context from the files, which may have changed under the same
names (a renewed certificate), and swaps it into the holder: connections accepted from then on
get the new certificate, those already open keep the context they were wrapped with. A file
that cannot be used refuses the reload (``ConfigError``, naming the setting) and the running
context stays.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from odin_fanout.config import ConfigError, ServerSection


def server_context(settings: ServerSection) -> ssl.SSLContext | None:
    """A server-side context for ``settings``' certificate and key, or None without TLS.
    Raises ConfigError naming the setting when a file cannot be used."""
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert = Path(settings.tls_cert).expanduser()
    key = Path(settings.tls_key).expanduser()
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError([f"server.tls_cert: {exc.strerror}: {exc.filename}"]) from None
    except (ssl.SSLError, OSError) as exc:
        detail = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            [f"server.tls_cert: cannot use {cert} with server.tls_key {key}: {detail}"]
        ) from None
    return context


class TlsHolder:
    """The client listener's TLS context in effect (None: plain ``ws://``)."""

    def __init__(self, settings: ServerSection) -> None:
        self.context = server_context(settings)
        self.enabled = self.context is not None
        """Fixed at start: whether the client listener speaks TLS (a reload may change the
        certificate, not whether there is one)."""

    def reload(self, settings: ServerSection) -> None:
        """Build the context of ``settings`` and put it in effect for new connections; raises
        ConfigError (the running context kept) if the files cannot be used."""
        if not self.enabled:
            return
        context = server_context(settings)
        if context is not None:
            self.context = context
