"""CI guard: fail when a test skips for a reason the README does not list as optional.

Two halves in one file, so the list of reasons has one reader:

- a pytest plugin (``PYTHONPATH=.ci python -m pytest -p check_skips``): when
  ``FANOUT_SKIP_REPORT`` names a file, it writes there, as JSON, every skipped
  test and its reason (setup and call skips, ``skipif`` and
  ``pytest.skip(...)`` alike, xfail excluded). Without the variable it does nothing.
- a checker (``python .ci/check_skips.py REPORT [README.md]``): reads the
  report and the README section headed "Optional tests (may skip)", whose list
  items each start with a backticked reason prefix, and exits 1 naming every
  skip whose reason starts with none of them. Exit 2: the report or the
  section is missing (CI must not pass because the guard could not look).

Why a prefix: reasons carry details (a version, a path) after a fixed start.
Why the README: a user reading it learns what may legitimately not run.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

REPORT_ENV = "FANOUT_SKIP_REPORT"
HEADING = "Optional tests (may skip)"
_ITEM = re.compile(r"^\s*[-*]\s+`([^`]+)`")


# ------------------------------------------------------------ pytest plugin
_skips: list[dict[str, str]] = []


def _reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        text = str(longrepr)
    return text.removeprefix("Skipped: ")


def pytest_runtest_logreport(report: Any) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append({"test": report.nodeid, "reason": _reason(report)})


def pytest_collectreport(report: Any) -> None:
    # A module-level pytest.skip(allow_module_level=True) or importorskip.
    if report.skipped:
        _skips.append({"test": report.nodeid, "reason": _reason(report)})


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        Path(path).write_text(json.dumps({"exitstatus": int(exitstatus), "skips": _skips}, indent=1))


# ------------------------------------------------------------------ checker
def allowed_prefixes(readme: str) -> list[str] | None:
    """The backticked prefixes listed under the heading, or None when it is absent."""
    lines = readme.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and line.lstrip("#").strip() == HEADING:
            level = len(line) - len(line.lstrip("#"))
            out = []
            for item in lines[i + 1:]:
                if item.startswith("#") and len(item) - len(item.lstrip("#")) <= level:
                    break
                m = _ITEM.match(item)
                if m:
                    out.append(m.group(1))
            return out
    return None


def disallowed(skips: list[dict[str, str]], prefixes: list[str]) -> list[dict[str, str]]:
    return [s for s in skips if not any(s["reason"].startswith(p) for p in prefixes)]


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: check_skips.py REPORT [README.md]", file=sys.stderr)
        return 2
    report_path = Path(argv[0])
    readme_path = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / "README.md")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"check_skips: no skip report ({exc}); was pytest run with -p check_skips and {REPORT_ENV}?",
              file=sys.stderr)
        return 2
    prefixes = allowed_prefixes(readme_path.read_text())
    if prefixes is None:
        print(f"check_skips: {readme_path} has no '{HEADING}' section", file=sys.stderr)
        return 2
    skips = report.get("skips", [])
    bad = disallowed(skips, prefixes)
    for s in bad:
        print(f"check_skips: not optional: {s['test']}: {s['reason']}", file=sys.stderr)
    if bad:
        print(f"check_skips: {len(bad)} of {len(skips)} skips have a reason the README's "
              f"'{HEADING}' list does not name: install what they need, or list the reason there",
              file=sys.stderr)
        return 1
    print(f"check_skips: {len(skips)} skips, all listed as optional")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
