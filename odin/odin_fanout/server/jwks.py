"""Token keys from a JWKS URL (``auth.jwks_url``): fetched, cached, refreshed, served stale.

One task (``run``, in the server's root nursery) owns the fetches: one at start, then one
every ``auth.jwks_refresh`` (after a failure, again after ``jwks_min_interval``, at most
``jwks_refresh``). A token naming a ``kid`` the keys lack asks for one at once
(``refresh_for_unknown_kid``), unless such a fetch happened within ``jwks_min_interval``: a
client making up ``kid``s cannot make Odin hammer the key server. Callers that ask while a
fetch is in flight share it; the fetch runs in this task, so a caller that gives up (its
``jwks_timeout``) does not cancel it for the others.

When fetches fail, the keys of the last good one stay in use until ``jwks_max_stale`` after
it, then are dropped: tokens are refused (``unknown_key``) until a fetch succeeds. A server
whose first fetch fails starts anyway and refuses tokens until keys arrive.

HTTP is httpx (on anyio, which runs under Trio); redirects are not followed, and a document
larger than ``MAX_DOCUMENT`` is refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import httpx
import jwt
import orjson
import trio

from odin_fanout.config import AuthSection
from odin_fanout.logs import Log
from odin_fanout.metrics import Metrics
from odin_fanout.protocol.access import Grant
from odin_fanout.server.tokens import Key, TokenRefused, Verifier, jwks_document_keys
from odin_fanout.version import __version__

MAX_DOCUMENT = 1 << 20
"""Bytes; a larger JWKS response is a failed fetch."""
_LOG_FAILURE_EVERY = 60.0


class JwksFetchError(Exception):
    pass


class JwksSource:
    """The keys of ``settings.jwks_url`` (none without one: ``run`` then returns at once)."""

    def __init__(self, settings: AuthSection, metrics: Metrics, log: Log) -> None:
        self.settings = settings
        self.url = settings.jwks_url
        self._metrics = metrics
        self._log = log
        self._keys: tuple[Key, ...] = ()
        self.fetched_at: float | None = None
        """When (trio's clock) the last good fetch ended; None before the first."""
        self._started_at: float | None = None
        self._last_kid_fetch = -math.inf
        self._pending = True
        """A fetch is asked for or in flight (the first one, from the start)."""
        self._round = trio.Event()
        """Set when the pending (or next) fetch ends."""
        self._wake = trio.Event()
        self._failure_logged = -math.inf
        if self.url:
            metrics.before_scrape(self._update_age)

    # ---- what the verifier reads ----------------------------------------------------------

    def keys(self) -> Sequence[Key]:
        """The keys in use: the last good fetch's, unless older than ``jwks_max_stale``."""
        if self.fetched_at is None or self.age() > self.settings.jwks_max_stale:
            return ()
        return self._keys

    def age(self) -> float:
        """Seconds since the last good fetch (since ``run`` started, before the first one)."""
        since = self.fetched_at if self.fetched_at is not None else self._started_at
        if since is None:
            return 0.0
        return max(0.0, trio.current_time() - since)

    # ---- asking for a fetch ---------------------------------------------------------------

    async def refresh_for_unknown_kid(self) -> bool:
        """Fetch now, for a token whose ``kid`` the keys lack, and wait for it; or join the
        fetch in flight. False (at once) when such a fetch happened within
        ``jwks_min_interval``: the keys are what they were."""
        if not self.url:
            return False
        done = self._round
        if not self._pending:
            now = trio.current_time()
            if now - self._last_kid_fetch < self.settings.jwks_min_interval:
                return False
            self._last_kid_fetch = now
            self._pending = True
            self._wake.set()
        await done.wait()
        return True

    # ---- the task -------------------------------------------------------------------------

    async def run(self) -> None:
        if not self.url:
            return
        self._started_at = trio.current_time()
        headers = {"Accept": "application/json", "User-Agent": f"odin/{__version__}"}
        async with httpx.AsyncClient(
            timeout=self.settings.jwks_timeout, headers=headers, follow_redirects=False
        ) as client:
            while True:
                ok = await self._fetch(client)
                await self._wait(self._next_delay(ok))

    def _next_delay(self, ok: bool) -> float:
        settings = self.settings
        if ok:
            return settings.jwks_refresh
        return min(settings.jwks_refresh, max(settings.jwks_min_interval, 1.0))

    async def _wait(self, delay: float) -> None:
        """Until ``delay`` has passed or a fetch is asked for; drops the keys on the way when
        they grow stale."""
        due = trio.current_time() + delay
        while not self._wake.is_set():
            deadline = due
            drop_at = self._drop_at()
            if drop_at is not None:
                deadline = min(deadline, drop_at)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            if drop_at is not None and trio.current_time() >= drop_at and self._keys:
                self._log.warning(
                    "jwks_keys_dropped",
                    url=self.url,
                    age=round(self.age(), 1),
                    max_stale=self.settings.jwks_max_stale,
                )
                self._keys = ()
            if trio.current_time() >= due:
                break
        self._wake = trio.Event()

    def _drop_at(self) -> float | None:
        if not self._keys or self.fetched_at is None:
            return None
        return self.fetched_at + self.settings.jwks_max_stale

    async def _fetch(self, client: httpx.AsyncClient) -> bool:
        self._pending = True
        try:
            try:
                with trio.fail_after(self.settings.jwks_timeout):
                    keys = jwks_document_keys(await self._get(client), skip_unusable=True)
            except (
                JwksFetchError, httpx.HTTPError, trio.TooSlowError, ValueError, TypeError,
                jwt.PyJWTError,
            ) as exc:  # fmt: skip
                self._failed(exc)
                return False
            self._succeeded(keys)
            return True
        finally:
            self._pending = False
            done, self._round = self._round, trio.Event()
            done.set()

    async def _get(self, client: httpx.AsyncClient) -> object:
        async with client.stream("GET", self.url) as response:
            if response.status_code != 200:
                raise JwksFetchError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT:
                    raise JwksFetchError(f"document larger than {MAX_DOCUMENT} bytes")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise JwksFetchError(f"not JSON: {exc}") from None

    def _succeeded(self, keys: list[Key]) -> None:
        before = sorted(str(key.kid) for key in self.keys())
        self._keys = tuple(keys)
        self.fetched_at = trio.current_time()
        self._metrics.jwks_fetches["ok"].inc()
        kids = sorted(str(key.kid) for key in keys)
        if kids != before:
            self._log.info("jwks_updated", url=self.url, kids=kids)

    def _failed(self, exc: BaseException) -> None:
        self._metrics.jwks_fetches["error"].inc()
        now = trio.current_time()
        if now - self._failure_logged < _LOG_FAILURE_EVERY:
            return
        self._failure_logged = now
        held = bool(self.keys())
        self._log.warning(
            "jwks_fetch_failed",
            url=self.url,
            error=f"{type(exc).__name__}: {exc}"[:300],
            serving="stale keys" if held else "no keys (tokens are refused)",
            age=round(self.age(), 1) if self.fetched_at is not None else None,
        )

    def _update_age(self) -> None:
        # Outside Trio (no clock) there is nothing to measure against.
        with contextlib.suppress(RuntimeError):
            self._metrics.jwks_age.set(self.age())


async def verify_token(
    verifier: Verifier, source: JwksSource, settings: AuthSection, token: str
) -> Grant:
    """``verifier.verify``, and when the token names a ``kid`` the JWKS lacks (its keys may
    have rotated), one fetch (rate-limited, bounded by ``jwks_timeout``) and a second try:
    for tokens from the upgrade request and in-band alike. Raises TokenRefused."""
    try:
        return verifier.verify(token)
    except TokenRefused as exc:
        if exc.reason != "unknown_key" or not settings.jwks_url:
            raise
        refused = exc
    with trio.move_on_after(settings.jwks_timeout):
        if await source.refresh_for_unknown_kid():
            return verifier.verify(token)
    raise refused
