"""promtool accepts the shipped Prometheus config and rules, and the rules'
unit tests pass, with a firing case for every alert."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.conftest import DEPLOY, require

PROM = DEPLOY / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
TESTS = sorted((PROM / "tests").glob("*.yml"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, timeout=30)


def test_check_config() -> None:
    run = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(RULES)} rule files found" in run.stdout


def test_check_rules() -> None:
    assert RULES
    run = _promtool("check", "rules", *map(str, RULES))
    assert run.returncode == 0, run.stdout + run.stderr


def test_rule_unit_tests_pass() -> None:
    assert TESTS
    run = _promtool("test", "rules", *map(str, TESTS))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    fires: set[str] = set()
    quiet: set[str] = set()
    for f in TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert alerts, "no alerts found"
    assert alerts - fires == set(), f"alerts never tested firing: {sorted(alerts - fires)}"
    assert alerts - quiet == set(), f"alerts never tested quiet: {sorted(alerts - quiet)}"
    assert {"FanoutNodeNotReady", "FanoutNatsDisconnected", "FanoutConsumerLagGrowing", "FanoutDropsRising",
            "FanoutBrakeActive", "FanoutLatencyP99High"} <= alerts


def test_a_broken_rule_is_caught(tmp_path) -> None:
    # The check can fail: a rule with a PromQL syntax error is refused.
    path = tmp_path / "broken_rules.yml"
    path.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(fanout_deliveries_total[1m]\n")
    run = _promtool("check", "rules", str(path))
    assert run.returncode != 0
