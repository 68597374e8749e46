"""An independent Fossil delta decoder for the tests: npm's ``fossil-delta``
(``applyDelta``), run with Node.js.

``node_apply(cases)`` takes ``[(source, delta), ...]`` (bytes) and returns, per
case, the target bytes or the decoder's error text. It skips the test (with a
README-listed reason) when Node.js or npm is missing; the package comes from
this folder's lock file (``npm ci``, which .ci/run runs beforehand).
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from tests.clients.jsenv import _node_problem, _npm_ci, node_bin

HERE = Path(__file__).parent

_why: list[str | None] = []


def node_setup() -> None:
    """Skip unless Node.js and this folder's node_modules are there (runs npm ci once)."""
    if not _why:
        _why.append(_node_problem() or _npm_ci(HERE))
    if _why[0]:
        pytest.skip(_why[0])


def node_apply(cases: list[tuple[bytes, bytes]]) -> list[bytes | str]:
    node_setup()
    payload = json.dumps([{"source": base64.b64encode(s).decode(), "delta": base64.b64encode(d).decode()}
                          for s, d in cases])
    res = subprocess.run([node_bin(), str(HERE / "apply.mjs")], input=payload, capture_output=True, text=True,
                         timeout=60, cwd=HERE)
    assert res.returncode == 0, res.stderr
    return [base64.b64decode(r["target"]) if "target" in r else str(r["error"]) for r in json.loads(res.stdout)]
