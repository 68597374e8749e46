"""Publishing to the fan-out stream from a Python backend.

Backends publish the payload bytes to a subject under the stream's subjects
(PROTOCOL.md, "Publishers"). Each publish waits for JetStream's ack, so when
it returns the message is stored and every node will deliver it; the returned
number is its ``stream_seq``.

- ``msg_id`` becomes the ``Nats-Msg-Id`` header: JetStream drops a second
  message with the same id inside the stream's duplicate window (and answers
  with the first one's sequence), so a publisher may retry after a timeout
  without producing a duplicate.
- ``priority`` becomes the ``Fanout-Priority`` header (``low``, ``medium``,
  ``high`` (default) or ``critical``); throttled clients lose low ones first.

One-off::

    from fanout.publisher import publish
    seq = await publish("odin.token.abc.update", b'{"price": 1.5}', servers="nats://127.0.0.1:4222")

Many messages (connect once)::

    async with Publisher("nats://n1:4222,nats://n2:4222") as pub:
        await pub.publish("odin.global.trending", payload, priority="medium", msg_id="trending-1764284630")
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError

from .brokers.base import PRIORITIES, PRIORITY_HEADER, PRIORITY_NAMES, parse_priority
from .config import Config
from .subjects import subject_error

log = logging.getLogger("fanout.publisher")

__all__ = ["Publisher", "publish", "publish_acked", "build_headers", "priority_name", "tls_context", "split_servers",
           "connect_options", "config_connect_options"]

MSG_ID_HEADER = "Nats-Msg-Id"


def priority_name(priority: str | int) -> str:
    """``"high"`` from ``"HIGH"``, ``"high"`` or ``2``; ValueError on anything else.

    Stricter than :func:`fanout.brokers.base.parse_priority` (the one parser,
    used here) in one way: a publisher must name a priority, so None and ""
    are refused rather than taken as the default.
    """
    if priority is None or priority == "":
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")
    return PRIORITY_NAMES[parse_priority(priority)]


def build_headers(priority: str | int | None, msg_id: str | None) -> dict[str, str]:
    """The NATS headers of one published message. No priority (None, or the
    hub's UNSET -1) sends no ``Fanout-Priority``: the nodes' WS_PRIORITY_RULES decide."""
    headers = {} if priority is None or priority == -1 else {PRIORITY_HEADER: priority_name(priority)}
    if msg_id:
        headers[MSG_ID_HEADER] = msg_id
    return headers


def split_servers(servers: str | list[str]) -> list[str]:
    """``"nats://a:4222, nats://b:4222"`` -> a list; lists pass through."""
    if isinstance(servers, str):
        servers = servers.split(",")
    out = [s.strip() for s in servers if s and s.strip()]
    if not out:
        raise ValueError("no NATS server URL given")
    return out


def tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext | None:
    """A client TLS context from PEM files, or None when none is given."""
    if not (ca or cert or key):
        return None
    ctx = ssl.create_default_context(cafile=ca or None)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def connect_options(*, name: str, user: str | None = None, password: str | None = None, token: str | None = None,
                    creds_file: str | None = None, tls: ssl.SSLContext | None = None,
                    reconnect_time_wait: float = 1.0, **extra: Any) -> dict[str, Any]:
    """The one builder of :func:`nats.connect` options (the node's broker and :class:`Publisher`).

    Reconnects forever. ``creds_file`` is passed as a path (nats-py's
    ``user_credentials``): nats-py reads the file again on every connect and
    reconnect, so a rotated creds file is used from the next reconnect on.
    ``extra`` (callbacks, timeouts) is merged last and wins.
    """
    opts: dict[str, Any] = {"name": name, "allow_reconnect": True, "max_reconnect_attempts": -1,
                            "reconnect_time_wait": reconnect_time_wait}
    if user:
        opts["user"] = user
        opts["password"] = password or ""
    if token:
        opts["token"] = token
    if creds_file:
        opts["user_credentials"] = creds_file
    if tls is not None:
        opts["tls"] = tls
    opts.update(extra)
    return opts


def config_connect_options(cfg: Config, *, name: str, **extra: Any) -> dict[str, Any]:
    """:func:`connect_options` from the node's settings (NATS_USER/PASSWORD/TOKEN/CREDS_FILE, NATS_TLS_*)."""
    return connect_options(name=name, user=cfg.nats_user or None, password=cfg.nats_password or None,
                           token=cfg.nats_token or None, creds_file=cfg.nats_creds_file or None,
                           tls=tls_context(cfg.nats_tls_ca, cfg.nats_tls_cert, cfg.nats_tls_key), **extra)


async def _close_quietly(nc: NATS) -> None:
    try:
        await nc.close()
    except Exception:  # a half-made connection may fail to close; nothing to keep
        pass


def _check_subject(subject: str) -> None:
    problem = subject_error(subject, wildcards=False)
    if problem:
        raise ValueError(f"invalid subject {subject!r}: {problem}")


class Publisher:
    """A JetStream publisher that connects once; use as ``async with``.

    ``stream`` (optional) makes JetStream refuse a message that would not
    land in that stream (``Nats-Expected-Stream``). ``timeout`` bounds the
    wait for each ack, retries included; the default outlasts a stream
    leader election (4 to 9 s in NATS). ``domain`` is the JetStream domain
    (``JS_DOMAIN``; nats-py's ``nc.jetstream(domain=...)``). Extra keyword
    arguments go to :func:`nats.connect`.
    """

    def __init__(self, servers: str | list[str] = "nats://127.0.0.1:4222", *, stream: str | None = None,
                 user: str | None = None, password: str | None = None, token: str | None = None,
                 creds_file: str | None = None, tls: ssl.SSLContext | None = None, timeout: float = 10.0,
                 name: str = "fanout-publisher", connect_wait: float = 10.0, domain: str | None = None,
                 **connect_opts: Any) -> None:
        self.servers = split_servers(servers)
        self.stream = stream
        self.timeout = timeout
        self.connect_wait = connect_wait
        self.domain = domain or None
        self._opts = connect_options(name=name, user=user, password=password, token=token, creds_file=creds_file,
                                     tls=tls, **connect_opts)
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None

    @classmethod
    def from_config(cls, cfg: Config, **kwargs: Any) -> Publisher:
        """A publisher for the node's NATS settings (NATS_URL, credentials, TLS, JS_STREAM_NAME, JS_DOMAIN)."""
        if not cfg.nats_url:
            raise ValueError("NATS_URL is not set")
        kwargs.setdefault("stream", cfg.js_stream_name)
        kwargs.setdefault("domain", cfg.js_domain or None)
        return cls(cfg.nats_url, user=cfg.nats_user or None, password=cfg.nats_password or None,
                   token=cfg.nats_token or None, creds_file=cfg.nats_creds_file or None,
                   tls=tls_context(cfg.nats_tls_ca, cfg.nats_tls_cert, cfg.nats_tls_key), **kwargs)

    async def connect(self) -> Publisher:
        """Connect, or raise ConnectionError after ``connect_wait`` seconds of failed tries.

        nats-py keeps retrying a failed first connect by itself; a publisher
        should rather fail fast with the reason (refused, authorization
        violation, TLS) than hang.
        """
        if self._nc is not None:
            return self
        last: list[BaseException] = []

        async def on_error(exc: BaseException) -> None:
            # The server closes the socket after refusing credentials; keep
            # the refusal, not the reset that follows it.
            if not (last and "authorization" in str(last[0]).lower()):
                last[:] = [exc]
            log.debug("nats error: %s", exc)

        nc = NATS()
        opts = {"error_cb": on_error, **self._opts}
        try:
            await asyncio.wait_for(nc.connect(self.servers, **opts), self.connect_wait)
        except TimeoutError:
            await _close_quietly(nc)
            why = f"{type(last[0]).__name__}: {last[0]}" if last else "timed out"
            raise ConnectionError(f"cannot connect to NATS at {', '.join(self.servers)}: {why}") from None
        except BaseException:
            await _close_quietly(nc)
            raise
        self._nc = nc
        self._js = nc.jetstream(timeout=self.timeout, domain=self.domain)
        return self

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await nc.close()

    async def __aenter__(self) -> Publisher:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(self, subject: str, payload: bytes | str, *, priority: str | int = "high",
                      msg_id: str | None = None, timeout: float | None = None) -> int:
        """Publish and wait for the ack; returns the message's ``stream_seq``.

        Retries within ``timeout`` (see :func:`publish_acked`). Raises
        ValueError for a bad subject or priority, and nats-py's errors
        (``nats.errors.TimeoutError``, ``nats.js.errors.NoStreamResponseError``
        when no stream takes the subject, ``APIError``) otherwise.
        """
        _check_subject(subject)
        headers = build_headers(priority, msg_id)
        if isinstance(payload, str):
            payload = payload.encode()
        if self._js is None:
            await self.connect()
        assert self._js is not None
        ack = await publish_acked(self._js, subject, bytes(payload), headers=headers, stream=self.stream,
                                  timeout=timeout or self.timeout)
        return ack.seq


async def publish_acked(js: JetStreamContext, subject: str, payload: bytes, *, headers: dict[str, str],
                        stream: str | None, timeout: float) -> api.PubAck:
    """``js.publish`` that rides out a stream leader election or a reconnect.

    "No responders" means no stream leader took the message (none is
    elected yet, or no stream has the subject), so it is retried until
    ``timeout`` runs out; nothing can be stored twice by that. A timed-out
    attempt is retried only with a ``Nats-Msg-Id`` (it may have been stored;
    JetStream drops the repeat). nats.go retries the same way.
    """
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        left = deadline - time.monotonic()
        try:
            return await js.publish(subject, payload, timeout=max(0.05, left), stream=stream,
                                    headers=dict(headers))
        except (NoStreamResponseError, nats.errors.TimeoutError) as exc:
            retry = isinstance(exc, NoStreamResponseError) or MSG_ID_HEADER in headers
            if not retry or deadline - time.monotonic() < pause:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)


async def publish(subject: str, payload: bytes | str, *, servers: str | list[str] = "nats://127.0.0.1:4222",
                  priority: str | int = "high", msg_id: str | None = None, stream: str | None = None,
                  timeout: float = 10.0, **connect_opts: Any) -> int:
    """Connect, publish one message with ack, close; returns its ``stream_seq``."""
    _check_subject(subject)
    priority_name(priority)
    async with Publisher(servers, stream=stream, timeout=timeout, **connect_opts) as pub:
        return await pub.publish(subject, payload, priority=priority, msg_id=msg_id)
