"""Fixtures for the node tests.

``shared_node`` is one default node per test module: tests that only need a
default node and fresh connections use it (each connection starts at seq 1
either way), which keeps the suite's process starts down. Tests that look at
node-wide state (absolute metric values, stream_seq from 1, shutdown) use
``node`` or ``node_factory`` instead, and metric checks on the shared node
compare before and after.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.node import NodeProcess


@pytest.fixture(scope="module")
def shared_node() -> Iterator[NodeProcess]:
    n = NodeProcess().start()
    try:
        yield n
    finally:
        assert n.stop() == 0
