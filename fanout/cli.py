"""The ``fanout`` command: serve, config, publish, token.

Every setting of :mod:`fanout.config` is a flag on ``serve`` and ``config``
(``WS_PORT`` <-> ``--ws-port``); flags win over env vars.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Optional

import typer

from .config import FIELDS, Config, ConfigError, load

# rich_markup_mode=None: plain click help. Rich markup would read every flag's
# "[env X; default Y]" as a style tag and print nothing of it.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="fanout: WebSocket fan-out node. Settings come from env vars; every one has a mirroring flag.")


def _flag(env: str) -> str:
    return "--" + env.lower().replace("_", "-")


def _default_text(value: Any) -> str:
    """A default as one would write it in the env var (as the README's table shows it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "(empty)" if value == "" else str(value)


def _with_config_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``fn`` one optional string flag per config field; it receives them as
    ``overrides`` (env name -> value) plus its own parameters."""
    own = list(inspect.signature(fn).parameters.values())
    own = [p for p in own if p.name != "overrides"]
    extra = [
        inspect.Parameter(f"cfg_{env.lower()}", inspect.Parameter.KEYWORD_ONLY,
                          default=typer.Option(None, _flag(env), help=f"{f.metadata['help']} [env {env}; default {_default_text(f.default)}]",
                                               show_default=False),
                          annotation=Optional[str])  # noqa: UP045 - typer reads this at run time
        for env, f in FIELDS.items()
    ]

    def wrapper(**kwargs: Any) -> Any:
        overrides = {env: kwargs.pop(f"cfg_{env.lower()}") for env in FIELDS}
        return fn(overrides=overrides, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + extra)  # type: ignore[attr-defined]
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _load(overrides: dict[str, Any]) -> Config:
    try:
        return load(overrides=overrides)
    except ConfigError as exc:
        typer.echo(f"fanout: bad configuration: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
@_with_config_flags
def serve(overrides: dict[str, Any]) -> None:
    """Run the node (embedded bus unless NATS_URL is set)."""
    from ._core_check import require_core

    try:
        require_core()   # only the node needs the compiled core; say how to build it
    except ImportError as exc:
        typer.echo(f"fanout: {exc}", err=True)
        raise typer.Exit(1) from None
    cfg = _load(overrides)
    from . import log
    from .server import run

    log.setup(cfg.log_level)
    raise typer.Exit(asyncio.run(run(cfg)))


@app.command("config")
@_with_config_flags
def show_config(overrides: dict[str, Any]) -> None:
    """Print the effective configuration (env vars and flags applied) as JSON."""
    cfg = _load(overrides)
    typer.echo(json.dumps(cfg.as_env(), indent=2))


@app.command()
def publish(
    subject: str = typer.Argument(..., help="subject, e.g. odin.token.abc.update"),
    payload: str = typer.Argument(..., help="payload text, or @file to read it from a file, or @- for stdin"),
    priority: str = typer.Option("high", "--priority", "-p", help="low|medium|high|critical"),
    url: str = typer.Option("", "--url", help="embedded node ops URL (default http://127.0.0.1:$HEALTH_PORT)"),
    msg_id: str = typer.Option("", "--msg-id", help="Nats-Msg-Id for JetStream de-duplication"),
) -> None:
    """Publish one message: to JetStream when NATS_URL is set, else to a node's /publish."""
    if payload.startswith("@"):
        data = sys.stdin.buffer.read() if payload == "@-" else open(payload[1:], "rb").read()
    else:
        data = payload.encode()
    cfg = _load({})
    if cfg.nats_url and not url:
        from .publisher import Publisher
        from .subjects import matches_any, subject_error

        # Checked here, so the answer names the setting rather than being a
        # JetStream "no responders" after the publish timeout.
        problem = subject_error(subject, wildcards=False)
        if problem is None and not matches_any(cfg.stream_subjects, subject):
            problem = f"not in the stream's subjects (JS_STREAM_SUBJECTS={cfg.js_stream_subjects})"
        if problem:
            typer.echo(f"fanout: cannot publish to {subject!r}: {problem}", err=True)
            raise typer.Exit(2)

        async def go() -> int:
            async with Publisher.from_config(cfg) as pub:
                return await pub.publish(subject, data, priority=priority, msg_id=msg_id or None)

        try:
            seq = asyncio.run(go())
        except Exception as exc:
            typer.echo(f"fanout: publish failed: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(json.dumps({"stream_seq": seq, "subject": subject}))
        return
    base = url or f"http://127.0.0.1:{cfg.health_port}"
    headers = {"Fanout-Priority": priority, "Content-Type": "application/octet-stream"}
    if msg_id:
        headers["Nats-Msg-Id"] = msg_id
    req = urllib.request.Request(f"{base.rstrip('/')}/publish/{subject}", data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            typer.echo(resp.read().decode())
    except urllib.error.HTTPError as exc:
        typer.echo(f"fanout: publish refused ({exc.code}): {exc.read().decode(errors='replace')}", err=True)
        raise typer.Exit(1) from None
    except urllib.error.URLError as exc:
        typer.echo(f"fanout: cannot reach {base}: {exc.reason}", err=True)
        raise typer.Exit(1) from None


@app.command()
def token(
    sub: str = typer.Argument(..., help="user id"),
    channels: str | None = typer.Option(None, help="comma-separated allowed patterns (default: any)"),
    ttl: int = typer.Option(3600, help="seconds until it expires"),
    secret: str = typer.Option("", help="HS256 secret (default $WS_AUTH_SECRET)"),
) -> None:
    """Make an HS256 client token (for testing auth)."""
    from .auth import sign

    key = secret or os.environ.get("WS_AUTH_SECRET", "")
    if not key:
        typer.echo("fanout: no secret: pass --secret or set WS_AUTH_SECRET", err=True)
        raise typer.Exit(2)
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + ttl}
    if channels:
        claims["channels"] = [c.strip() for c in channels.split(",") if c.strip()]
    typer.echo(sign(claims, key))


def main() -> None:
    app()
