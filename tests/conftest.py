"""Shared fixtures: a real node process (see tests/helpers/node.py)."""

from __future__ import annotations

import pytest

from tests.helpers.node import NodeProcess


@pytest.fixture
def node_factory():
    """Start nodes with extra env; all are stopped at teardown."""
    nodes: list[NodeProcess] = []

    def make(**env: str) -> NodeProcess:
        n = NodeProcess({k: str(v) for k, v in env.items()}).start()
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        n.stop()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    """One embedded-mode node with default settings on ephemeral ports."""
    return node_factory()
