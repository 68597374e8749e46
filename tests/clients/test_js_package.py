"""The @fanout/client package itself: node:test unit tests, types, size budget, the npm tarball.

- ``node --test clients/js/test/*.test.mjs``: unit tests of the pure parts and
  the client under Node.js against a real node process the JS tests start
  themselves (``python -m fanout serve`` with this interpreter, $FANOUT_PYTHON);
- ``tsc --strict`` over a type-test file (clients/js/test/types/usage.tsx, with
  ``@ts-expect-error`` lines that must stay errors) and over examples/react-app;
- the size budgets: dist/fanout-client.min.js at most 8 KiB gzipped, the worker
  file dist/fanout-worker.js (one connection per browser) at most 12 KiB;
- ``npm pack`` output installs into a fresh app with ``--offline`` (nothing
  from the registry: the package has no runtime dependencies) and imports
  through its ``exports`` map.

Skips (with the reason, tests/clients/jsenv.py) when Node.js or npm are missing.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.clients.jsenv import APP, PKG, js_setup, node_bin, react_app_setup

BUDGET = 8 * 1024
WORKER_BUDGET = 12 * 1024


def run(cmd: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    import os
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-3000:]}"
    return res


def test_node_test_runner_suite():
    js_setup()
    files = sorted(str(p.relative_to(PKG)) for p in (PKG / "test").glob("*.test.mjs"))
    assert files, "no clients/js/test/*.test.mjs"
    res = run([node_bin(), "--test", *files], PKG, timeout=120, FANOUT_PYTHON=sys.executable)
    assert "# fail 0" in res.stdout and "# pass " in res.stdout, res.stdout[-3000:]


def test_type_test_compiles_strict():
    js_setup()
    run([str(PKG / "node_modules" / ".bin" / "tsc"), "-p", "test/types/tsconfig.json"], PKG)


def test_react_example_compiles_strict():
    react_app_setup()
    run([str(APP / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], APP)


def test_core_bundle_size_budget():
    js_setup()
    data = (PKG / "dist" / "fanout-client.min.js").read_bytes()
    size = len(gzip.compress(data, 9))
    print(f"fanout-client.min.js: {len(data)} bytes, {size} gzipped")
    assert size <= BUDGET, f"core bundle {size} bytes min+gzip > {BUDGET}"


def test_worker_file_size_budget():
    js_setup()
    data = (PKG / "dist" / "fanout-worker.js").read_bytes()
    size = len(gzip.compress(data, 9))
    print(f"fanout-worker.js: {len(data)} bytes, {size} gzipped")
    assert size <= WORKER_BUDGET, f"worker file {size} bytes min+gzip > {WORKER_BUDGET}"


def test_npm_pack_installs_into_a_fresh_app_offline(tmp_path):
    js_setup()
    npm = shutil.which("npm")
    assert npm is not None
    out = run([npm, "pack", "--json", "--ignore-scripts", "--pack-destination", str(tmp_path)], PKG)
    info = json.loads(out.stdout)[0]
    files = {f["path"] for f in info["files"]}
    assert {"dist/index.js", "dist/index.d.ts", "dist/react.js", "dist/react.d.ts",
            "dist/fanout-client.min.js", "dist/fanout-worker.js", "package.json", "README.md"} <= files
    assert not any(f.startswith(("test/", "node_modules/")) for f in files), sorted(files)
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "fresh-app", "private": True, "type": "module"}))
    run([npm, "install", "--offline", "--no-audit", "--no-fund", str(tmp_path / info["filename"])], app)
    assert json.loads((app / "package.json").read_text())["dependencies"]["@fanout/client"]
    assert not (app / "node_modules" / "react").exists()        # react is an optional peer
    (app / "main.mjs").write_text(
        "import { connect, FanoutClient, subjectMatches } from '@fanout/client';\n"
        "const c = new FanoutClient();\n"
        "console.log(JSON.stringify({ connect: typeof connect, state: c.state,"
        " match: subjectMatches('a.*', 'a.b'), react: import.meta.resolve('@fanout/client/react'),"
        " worker: import.meta.resolve('@fanout/client/fanout-worker.js') }));\n")
    got = json.loads(run([node_bin(), "main.mjs"], app).stdout)
    assert got["connect"] == "function" and got["state"] == "disconnected" and got["match"] is True
    assert got["react"].endswith("/node_modules/@fanout/client/dist/react.js")
    assert got["worker"].endswith("/node_modules/@fanout/client/dist/fanout-worker.js")     # for an app to serve
    # The types resolve through the exports map too (Node16 resolution, as a TypeScript app would).
    (app / "check.ts").write_text(
        "import { connect, type DataMessage } from '@fanout/client';\n"
        "const c = connect('ws://127.0.0.1:1/ws', { token: 't' });\n"
        "c.subscribe('odin.global.trending').on('message', (m: DataMessage) => m.stream_seq.toFixed());\n")
    (app / "tsconfig.json").write_text(json.dumps({"compilerOptions": {
        "strict": True, "noEmit": True, "module": "node16", "moduleResolution": "node16", "target": "es2020",
        "lib": ["es2020", "dom"], "types": []}, "files": ["check.ts"]}))
    run([str(PKG / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"], app)
