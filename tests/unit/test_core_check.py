"""The compiled core is needed by the node only: clients and publishers import without it.

Each case runs a fresh interpreter in which ``fanout_core`` cannot be
imported (``sys.modules['fanout_core'] = None`` before anything else).
"""

from __future__ import annotations

import subprocess
import sys

from fanout._core_check import BUILD_MESSAGE

BLOCK = "import sys; sys.modules['fanout_core'] = None\n"


def py(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=60)


def test_the_block_really_hides_the_core():
    r = py("import fanout_core")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_client_and_publisher_import_without_the_core():
    r = py("import fanout, fanout.client, fanout.publisher, fanout.config, fanout.protocol\n"
           "from fanout.client import Client\nfrom fanout.publisher import Publisher\n"
           "assert 'fanout_core._core' not in sys.modules\nprint('ok')")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_serve_without_the_core_exits_with_the_build_message():
    r = py("sys.argv = ['fanout', 'serve']\nfrom fanout.cli import main\nmain()")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert BUILD_MESSAGE in r.stderr
    assert "Traceback" not in r.stderr
    assert "fanout listening" not in r.stderr


def test_other_commands_work_without_the_core():
    r = py("sys.argv = ['fanout', 'config']\nfrom fanout.cli import main\nmain()")
    assert r.returncode == 0, r.stderr
    assert '"WS_PORT"' in r.stdout


def test_require_core_passes_when_it_is_built():
    r = subprocess.run([sys.executable, "-c", "from fanout._core_check import require_core; require_core()"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
