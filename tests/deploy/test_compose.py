"""deploy/compose.yaml parses (Debian's docker-compose needs no engine for
``config``) and wires what docs/operations.md says it does."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.conftest import DEPLOY, ROOT, require

COMPOSE = DEPLOY / "compose.yaml"


def _config() -> dict:
    exe = require("docker-compose")
    run = subprocess.run([exe, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = subprocess.run([exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=30, check=True)
    return yaml.safe_load(out.stdout)


def test_compose_config_parses_and_wires_the_stack() -> None:
    cfg = _config()
    svc = cfg["services"]
    assert {"nats", "fanout-1", "fanout-2", "haproxy", "prometheus", "grafana", "loki", "promtail",
            "nats-exporter"} <= set(svc)
    # Two nodes from the repo's Dockerfile, each with its own id, on NATS.
    ids = set()
    for name in ("fanout-1", "fanout-2"):
        node = svc[name]
        assert node["build"]["dockerfile"] == "Dockerfile"
        assert (ROOT / node["build"]["context"]).resolve() == ROOT
        assert node["environment"]["NATS_URL"] == "nats://nats:4222"
        ids.add(node["environment"]["FANOUT_NODE_ID"])
        assert node["depends_on"]["nats"]["condition"] == "service_healthy"
    assert ids == {"fanout-1", "fanout-2"}
    # The nodes take WebSockets only from listed page origins, and the list is valid.
    from fanout.config import load

    for name in ("fanout-1", "fanout-2"):
        origins = svc[name]["environment"]["WS_ALLOWED_ORIGINS"]
        assert origins and load(environ={"WS_ALLOWED_ORIGINS": origins}).ws_allowed_origins == origins
    # JetStream with file storage on a volume, and a health check.
    nats = svc["nats"]
    assert "healthcheck" in nats and any(v.endswith(":/data") or "/data" in str(v) for v in nats["volumes"])
    assert "nats-data" in cfg["volumes"]
    assert "jetstream" in (DEPLOY / "nats" / "nats.conf").read_text()
    # Every file a service mounts from the repo exists (certs/ is made by make-cert.sh).
    for name, s in svc.items():
        for vol in s.get("volumes", []):
            src = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if src.startswith("/") and not src.startswith("/var/run") and not src.endswith("/certs"):
                assert (ROOT / src).exists() or __import__("pathlib").Path(src).exists(), f"{name}: {src} missing"
