"""The env var tables in README.md and docs/operations.md are the schema's.

A new setting in fanout/config.py fails this test until
``python -m fanout.envdoc --write`` regenerates both tables.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fanout import envdoc
from fanout.config import FIELDS
from tests.deploy.conftest import ROOT


@pytest.mark.parametrize("rel", envdoc.TARGETS)
def test_marked_region_matches_the_schema(rel: str) -> None:
    text = (ROOT / rel).read_text(encoding="utf-8")
    assert envdoc.render_region(text, rel) == text, f"{rel} is stale: run python -m fanout.envdoc --write"


def test_table_has_one_row_per_setting_in_schema_order() -> None:
    rows = envdoc.table().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == list(FIELDS)
    assert all(f"`--{env.lower().replace('_', '-')}`" in r for env, r in zip(FIELDS, rows, strict=True))


def test_check_flag_reports_a_stale_file(tmp_path) -> None:
    for rel in envdoc.TARGETS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"intro\n{envdoc.BEGIN}\n| old |\n{envdoc.END}\noutro\n", encoding="utf-8")
    assert envdoc.rewrite(tmp_path, check=True) == list(envdoc.TARGETS)
    assert envdoc.rewrite(tmp_path) == list(envdoc.TARGETS)       # rewrites...
    assert envdoc.rewrite(tmp_path, check=True) == []              # ...and then it is current
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("outro\n") and "| `WS_PORT` |" in text


def test_missing_markers_are_an_error() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        envdoc.render_region("no markers here", "x.md")


def test_cli_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "fanout.envdoc"], capture_output=True, text=True,
                         check=True, timeout=30, cwd=ROOT).stdout
    assert out == envdoc.table()
