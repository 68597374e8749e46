"""What the JS client tests need, checked once per session: Node.js, clients/js built, Chromium.

``js_setup()`` returns why the JS tests cannot run (a skip reason) or None.
When ``clients/js/node_modules`` is missing it runs ``npm ci`` there once (CI
runs it beforehand: see .ci/run); when ``dist/`` is older than ``src/`` it
runs ``npm run build`` (a failing build fails the tests: it is not optional).
``react_app_setup()`` does the same for examples/react-app.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PKG = ROOT / "clients" / "js"
APP = ROOT / "examples" / "react-app"

_why: dict[str, str | None] = {}


def node_bin() -> str:
    node = shutil.which("node")
    assert node is not None
    return node


def _node_problem() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "node (Node.js >= 18) is not installed"
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        major = int(out.lstrip("v").split(".")[0])
    except ValueError:
        return f"cannot read the Node.js version from {out!r}"
    if major < 18:
        return f"Node.js {out} is too old (need >= 18)"
    return None


def _npm_ci(folder: Path) -> str | None:
    if (folder / "node_modules" / ".package-lock.json").is_file():
        return None
    npm = shutil.which("npm")
    rel = folder.relative_to(ROOT)
    if npm is None:
        return f"npm is not installed: cannot install the dev dependencies of {rel} (npm ci --prefix {rel})"
    try:
        res = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True, text=True,
                             timeout=300)
    except subprocess.TimeoutExpired:
        return f"npm ci in {rel} timed out (run it before the tests)"
    if res.returncode != 0:
        return f"npm ci in {rel} failed (offline?): {res.stderr.strip()[-300:]}"
    return None


def _newest(folder: Path, pattern: str) -> float:
    return max((p.stat().st_mtime for p in folder.rglob(pattern)), default=0.0)


def _build(folder: Path, inputs: list[Path], output: Path) -> None:
    """Run ``npm run build`` when an input is newer than ``output``; a failure fails the test."""
    built = output.stat().st_mtime if output.exists() else 0.0
    if all(_newest(p, "*") <= built if p.is_dir() else p.stat().st_mtime <= built for p in inputs):
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed to build " + str(folder)
    res = subprocess.run([npm, "run", "build"], cwd=folder, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.fail(f"npm run build in {folder.relative_to(ROOT)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def js_setup() -> None:
    """Skip (with the reason) unless Node.js and clients/js's dependencies are there; build when stale."""
    if "pkg" not in _why:
        _why["pkg"] = _node_problem() or _npm_ci(PKG)
    if _why["pkg"]:
        pytest.skip(_why["pkg"])
    _build(PKG, [PKG / "src", PKG / "package.json", PKG / "tsconfig.json"], PKG / "dist" / "fanout-client.min.js")


def react_app_setup() -> None:
    """js_setup() plus examples/react-app installed and built."""
    js_setup()
    if "app" not in _why:
        _why["app"] = _npm_ci(APP)
    if _why["app"]:
        pytest.skip(_why["app"])
    _build(APP, [APP / "src", APP / "index.html", APP / "build.mjs", PKG / "dist" / "react.js",
                 PKG / "dist" / "fanout-worker.js"],
           APP / "dist" / "app.js")


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


CHROMIUM_MISSING = "Chromium is not installed (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"


def chromium_setup() -> str:
    path = chromium()
    if path is None:
        pytest.skip(CHROMIUM_MISSING)
    return path
