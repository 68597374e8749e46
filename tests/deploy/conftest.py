"""Fixtures for the deployment tests: the Debian tools they drive, a self-signed cert.

The tools are optional on a developer's machine (.ci/run installs them best
effort); a test that lacks one skips with a reason naming the binary and its
Debian package, so a missing tool is never mistaken for a pass.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# binary -> Debian package that ships it
PACKAGES = {"haproxy": "haproxy", "prometheus": "prometheus", "promtool": "prometheus",
            "docker-compose": "docker-compose", "openssl": "openssl"}


def require(binary: str) -> str:
    """Path of ``binary``, or skip the test naming it and its Debian package."""
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").is_file() else None)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian package {PACKAGES[binary]}; optional, .ci/run installs it)")
    return path


@pytest.fixture(scope="session")
def self_signed_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding fanout.pem (cert + key) and fanout.crt, made by deploy/make-cert.sh."""
    require("openssl")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["sh", str(DEPLOY / "make-cert.sh"), str(out), "localhost"], check=True,
                   capture_output=True, timeout=30)
    assert (out / "fanout.pem").is_file() and (out / "fanout.crt").is_file()
    return out
