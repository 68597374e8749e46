"""deploy/k8s/ validated offline: schemas, security checks, and what the
manifests say against what the node does.

* ``kubernetes-validate`` (the package carries the API schemas) checks every
  manifest in strict mode (unknown fields are errors) against the oldest
  Kubernetes the HPA's ``tolerance`` needs (1.33) and the newest it knows.
  It has no schema for CRDs: the ServiceMonitor is checked against
  ``SERVICEMONITOR_SCHEMA`` below, the subset of the Prometheus Operator's CRD
  schema for the fields we use (same types, the CRD's duration pattern, unknown
  fields refused), not the whole CRD. The kustomizations and the Helm values
  are not Kubernetes objects: their shape is checked here field by field.
* ``checkov`` runs its Kubernetes checks with deploy/k8s/.checkov.yaml; every
  skipped check must carry a reason there, and none may fail. checkov lives in
  its own venv (it pins libraries of its own); .ci/run makes it.
* The cross-references no schema sees: selectors and named ports line up, the
  env names exist in fanout/config.py and the values pass the node's own
  validation, the grace period is longer than the drain window plus the
  shutdown timeout, the HPA's metric is one the node exports and the adapter
  serves, and the preStop hook, run as written against a real node, drains it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fanout.config import FIELDS, load, parse_duration
from fanout.metrics import Metrics
from tests.deploy.conftest import DEPLOY, ROOT, require
from tests.helpers.node import NodeProcess

K8S = DEPLOY / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" and not p.name.startswith("."))
# Oldest version the manifests are for (HPA behavior.*.tolerance is 1.33+), and the newest the package knows.
K8S_VERSIONS = ("1.33.0", None)
CRD_KINDS = {"ServiceMonitor"}

# The Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1), the
# fields this repo uses, typed as in the CRD's openAPIV3Schema.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
SERVICEMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"},
                    }}},
            },
        },
    },
}

# prometheus-adapter's discovery rule (its config's `rules:` items; the chart's rules.custom).
ADAPTER_RULE_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["seriesQuery", "metricsQuery"], "additionalProperties": False,
    "properties": {
        "seriesQuery": {"type": "string"},
        "seriesFilters": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                     "properties": {"is": {"type": "string"},
                                                                    "isNot": {"type": "string"}}}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "template": {"type": "string"},
            "overrides": {"type": "object", "additionalProperties": {
                "type": "object", "required": ["resource"], "additionalProperties": False,
                "properties": {"group": {"type": "string"}, "resource": {"type": "string"}}}}}},
        "name": {"type": "object", "additionalProperties": False, "required": ["matches"],
                 "properties": {"matches": {"type": "string"}, "as": {"type": "string"}}},
        "metricsQuery": {"type": "string"},
    },
}

# kustomize's Kustomization (kustomize.config.k8s.io/v1beta1): the fields these
# two kustomizations use, named as in kustomize's types; unknown fields refused
# (kustomize refuses them too).
_STR_LIST = {"type": "array", "items": {"type": "string"}}
KUSTOMIZATION_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["apiVersion", "kind"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "namespace": {"type": "string"},
        "resources": _STR_LIST,
        "labels": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
            "pairs": {"type": "object", "additionalProperties": {"type": "string"}},
            "includeSelectors": {"type": "boolean"}, "includeTemplates": {"type": "boolean"}}}},
        "images": {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                              "properties": {k: {"type": "string"} for k in ("name", "newName", "newTag", "digest")}}},
        "secretGenerator": {"type": "array", "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "type": {"type": "string"},
                           "behavior": {"enum": ["create", "replace", "merge"]},
                           "envs": _STR_LIST, "files": _STR_LIST, "literals": _STR_LIST,
                           "options": {"type": "object", "additionalProperties": False, "properties": {
                               "disableNameSuffixHash": {"type": "boolean"},
                               "labels": {"type": "object"}, "annotations": {"type": "object"}}}}}},
        "helmCharts": {"type": "array", "items": {
            "type": "object", "required": ["name", "repo", "version"], "additionalProperties": False,
            "properties": {k: {"type": "string"} for k in ("name", "repo", "version", "releaseName", "namespace",
                                                           "valuesFile")} | {"includeCRDs": {"type": "boolean"}}}},
    },
}


# ------------------------------------------------------------------ helpers
def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _docs(p)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _all() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    (c,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def _pod_labels() -> dict[str, str]:
    return _one("Deployment")["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _configmap() -> dict[str, str]:
    return _one("ConfigMap", "fanout-config")["data"]


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _kubernetes_validate():
    try:
        from kubernetes_validate import utils
    except ImportError:
        pytest.skip("kubernetes-validate not installed (pip extra `test`: pip install -e '.[test]')")
    return utils


def _jsonschema():
    """jsonschema, which comes with kubernetes-validate (skips like it when absent)."""
    _kubernetes_validate()
    import jsonschema

    return jsonschema


def _checkov() -> str:
    for candidate in (os.environ.get("CHECKOV"), str(ROOT / ".venv-checkov" / "bin" / "checkov"),
                      shutil.which("checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("checkov not installed (pip extra `checkov`, in a venv of its own: .ci/run makes .venv-checkov; "
                "or set CHECKOV)")


# ------------------------------------------------------- schema validation
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path) -> None:
    utils = _kubernetes_validate()
    jsonschema = _jsonschema()

    docs = _docs(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, SERVICEMONITOR_SCHEMA)
            continue
        for version in K8S_VERSIONS:
            utils.validate(doc, version or utils.latest_version(), strict=True)


def test_strict_validation_can_fail() -> None:
    utils = _kubernetes_validate()
    jsonschema = _jsonschema()

    dep = _one("Deployment")
    typo = json.loads(json.dumps(dep))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(jsonschema.ValidationError):
        utils.validate(typo, utils.latest_version(), strict=True)
    # The HPA's tolerance does not exist before 1.33: the floor in K8S_VERSIONS is real.
    with pytest.raises(jsonschema.ValidationError):
        utils.validate(_one("HorizontalPodAutoscaler"), "1.32.0", strict=True)
    sm = json.loads(json.dumps(_one("ServiceMonitor")))
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, SERVICEMONITOR_SCHEMA)


def test_kustomizations_have_kustomize_fields() -> None:
    jsonschema = _jsonschema()

    for path in (KUSTOMIZATION, K8S / "nats" / "kustomization.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), KUSTOMIZATION_SCHEMA)
    typo = yaml.safe_load(KUSTOMIZATION.read_text())
    typo["resource"] = typo.pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, KUSTOMIZATION_SCHEMA)


def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load(KUSTOMIZATION.read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert sorted(k["resources"]) == sorted(p.name for p in MANIFESTS)
    ns = k["namespace"]
    assert _one("Namespace")["metadata"]["name"] == ns
    for doc in _all():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, f"{doc['kind']}/{doc['metadata']['name']} not in {ns}"
    # Every Secret the pod reads is generated, from a file whose .example is committed.
    generated = {g["name"]: g for g in k["secretGenerator"]}
    for gen in generated.values():
        for env_file in gen["envs"]:
            assert (K8S / (env_file + ".example")).is_file(), f"{env_file}.example missing"
            assert env_file.startswith("secrets/") and env_file.endswith(".env")
    # The filled-in files never reach git.
    assert "deploy/k8s/secrets/*.env" in (ROOT / ".gitignore").read_text().splitlines()
    for e in _container()["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] in generated, f"{e['name']} reads Secret {ref['name']}, which is not generated"
            keys = {key for f in generated[ref["name"]]["envs"] for key in _env_file(K8S / (f + ".example"))}
            assert ref["key"] in keys, f"{ref['key']} is not in {ref['name']}'s .example"
    assert [i["name"] for i in k["images"]] == [_container()["image"].split(":")[0]]


# ------------------------------------------------------------------ checkov
def _run_checkov(directory: Path, config: Path = K8S / ".checkov.yaml") -> dict[str, Any]:
    run = subprocess.run([_checkov(), "--config-file", str(config), "-d", str(directory), "-o", "json"],
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip(), run.stderr[-3000:]
    out = json.loads(run.stdout)
    return out[0] if isinstance(out, list) else out


def test_checkov_passes_with_justified_skips(tmp_path: Path) -> None:
    """One run with deploy/k8s/.checkov.yaml minus its skip list: what fails must
    be exactly the skipped checks, so every skip is needed and nothing else fails."""
    lines = (K8S / ".checkov.yaml").read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    skips = set(config.pop("skip-check"))
    assert skips, "no skips: drop this part of the test"
    # Every skip has a reason on the line right above it.
    for check in skips:
        i = next(n for n, line in enumerate(lines) if line.strip() == f"- {check}")
        assert lines[i - 1].strip().startswith("#") and len(lines[i - 1].strip()) > 20, f"{check} is skipped without a reason"
    unskipped = tmp_path / "checkov.yaml"
    unskipped.write_text(yaml.safe_dump(config))
    # checkov also reads a .checkov.yaml in the scanned folder: scan a copy without it.
    copy = tmp_path / "k8s"
    copy.mkdir()
    for path in MANIFESTS:
        shutil.copy(path, copy / path.name)
    report = _run_checkov(copy, unskipped)
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert failed == skips, {c["check_id"]: c["resource"] for c in report["results"]["failed_checks"] if c["check_id"] not in skips}
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] >= 80, report["summary"]
    # The kinds checkov has checks for were all read.
    resources = {c["resource"].split(".")[0] for c in report["results"]["passed_checks"]}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= resources


def test_checkov_catches_a_privileged_container(tmp_path: Path) -> None:
    dep = json.loads(json.dumps(_one("Deployment")))
    sc = dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc.update(privileged=True, readOnlyRootFilesystem=False, allowPrivilegeEscalation=True)
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(dep))
    failed = {c["check_id"] for c in _run_checkov(tmp_path)["results"]["failed_checks"]}
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22"} <= failed, failed


# ------------------------------------------------------ the node's settings
def test_env_names_exist_in_the_config_schema() -> None:
    names = set(_configmap())
    names |= {e["name"] for e in _container()["env"]}
    for example in (K8S / "secrets").glob("*.env.example"):
        names |= set(_env_file(example))
    unknown = names - set(FIELDS)
    assert unknown == set(), f"not settings of fanout/config.py: {sorted(unknown)}"
    assert _container()["envFrom"] == [{"configMapRef": {"name": "fanout-config"}}]


def test_configmap_values_pass_the_nodes_validation() -> None:
    cm = _configmap()
    secrets = {"WS_AUTH_SECRET": "x" * 32, "NATS_USER": "fanout", "NATS_PASSWORD": "y" * 24}
    cfg = load(environ={**cm, **secrets})
    assert cfg.ws_port == _port("ws") and cfg.health_port == _port("ops")
    assert cfg.js_stream_replicas == yaml.safe_load((K8S / "nats" / "values.yaml").read_text())["config"]["cluster"]["replicas"]


def _port(name: str) -> int:
    return next(p["containerPort"] for p in _container()["ports"] if p["name"] == name)


def test_grace_period_is_longer_than_the_drain() -> None:
    cfg = load(environ=_configmap())
    pod = _one("Deployment")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    # The preStop hook waits out the window (+1 s), then SIGTERM flushes for up to the timeout.
    assert grace > cfg.ws_drain_seconds + 1 + cfg.ws_shutdown_timeout, (grace, cfg.ws_drain_seconds, cfg.ws_shutdown_timeout)
    assert cfg.ws_drain_seconds > 0
    # Readiness takes a draining node out of the endpoints before its first reconnect turn.
    ready = _container()["readinessProbe"]
    assert ready["httpGet"] == {"path": "/ready", "port": "ops"}
    assert ready["periodSeconds"] * ready["failureThreshold"] < min(3.0, 0.3 * cfg.ws_drain_seconds)
    assert _container()["livenessProbe"]["httpGet"] == {"path": "/health", "port": "ops"}
    assert parse_duration(_configmap()["WS_SHUTDOWN_TIMEOUT"]) == cfg.ws_shutdown_timeout


def test_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    pod = _one("Deployment")["spec"]["template"]["spec"]
    c = _container()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsUser"] == uid
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    vol = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert "emptyDir" in vol and vol["emptyDir"].get("sizeLimit")
    assert pod["automountServiceAccountToken"] is False
    assert _one("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_resources_follow_the_benchmarks() -> None:
    res = _container()["resources"]
    # One core requested: the HPA's 60 % of it is the plan's 60 % of the node's one-threaded loop.
    assert res["requests"]["cpu"] == "1"
    assert int(res["limits"]["cpu"]) - 1 == int(_configmap()["WS_FLUSH_THREADS"])

    def mib(q: str) -> float:
        return float(q[:-2]) * {"Mi": 1, "Gi": 1024}[q[-2:]]

    # README "Performance": ~50 MiB base + up to 8.4 KiB per connection (10 subscriptions).
    at_scale_out = 50 + 8000 * 8.4 / 1024
    at_max = 50 + int(_configmap()["WS_MAX_CONNECTIONS"]) * 8.4 / 1024
    assert mib(res["requests"]["memory"]) >= at_scale_out
    # Under the guard's brake (75 % of the limit) at WS_MAX_CONNECTIONS there is room
    # for 2,000 clients backed up to WS_CLIENT_QUEUE_BYTES (256 KiB) each.
    brake = 0.75 * mib(res["limits"]["memory"])
    assert (brake - at_max) / (load(environ={}).ws_client_queue_bytes / 2**20) >= 2000


# ------------------------------------------------------ wiring and routing
def test_selectors_and_named_ports_line_up() -> None:
    pod = _pod_labels()
    dep = _one("Deployment")
    assert _selects(dep["spec"]["selector"]["matchLabels"], pod)
    names = {p["name"] for p in _container()["ports"]}
    for svc in (_one("Service", "fanout-ws"), _one("Service", "fanout-ops")):
        assert _selects(svc["spec"]["selector"], pod)
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names
    assert _selects(_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod)
    np = _one("NetworkPolicy")
    assert _selects(np["spec"]["podSelector"]["matchLabels"], pod)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _container()[probe]["httpGet"]["port"] == "ops"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    # The HPA owns the replica count: a count in the Deployment would be reset by every apply.
    assert "replicas" not in dep["spec"]


def test_network_policy_opens_ops_only_to_prometheus() -> None:
    rules = _one("NetworkPolicy")["spec"]["ingress"]
    assert _one("NetworkPolicy")["spec"]["policyTypes"] == ["Ingress"]
    by_port = {p["port"]: r for r in rules for p in r["ports"]}
    assert set(by_port) == {"ws", "ops"}
    assert "from" not in by_port["ws"]                    # WebSocket clients come from anywhere
    (peer,) = by_port["ops"]["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


def test_service_monitor_scrapes_the_ops_port_as_job_fanout() -> None:
    sm = _one("ServiceMonitor")["spec"]
    ops = _one("Service", "fanout-ops")
    assert _selects(sm["selector"]["matchLabels"], ops["metadata"]["labels"])
    assert not _selects(sm["selector"]["matchLabels"], _one("Service", "fanout-ws")["metadata"]["labels"])
    (ep,) = sm["endpoints"]
    assert ep["port"] in {p["name"] for p in ops["spec"]["ports"]} and ep["path"] == "/metrics"
    job = ops["metadata"]["labels"][sm["jobLabel"]]
    rules = (DEPLOY / "prometheus" / "rules" / "fanout.yml").read_text()
    assert f'job="{job}"' in rules


# ------------------------------------------------------------- autoscaling
def _adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    return values["rules"]["custom"]


def test_hpa_has_the_plans_rules() -> None:
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "fanout"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    by_type = {m["type"]: m for m in hpa["metrics"]}
    cpu = by_type["Resource"]["resource"]
    assert cpu["name"] == "cpu" and cpu["target"] == {"type": "Utilization", "averageUtilization": 60}
    conns = by_type["Pods"]["pods"]
    assert conns["target"] == {"type": "AverageValue", "averageValue": "8000"}
    b = hpa["behavior"]
    assert b["scaleUp"]["stabilizationWindowSeconds"] == 120      # "for 2 min"
    assert b["scaleDown"]["stabilizationWindowSeconds"] == 600    # "for 10 min"
    # Scale down only under half the targets: connections < 4000.
    assert float(b["scaleDown"]["tolerance"]) * 8000 == 4000
    assert float(b["scaleUp"]["tolerance"]) == 0
    for direction in ("scaleUp", "scaleDown"):
        assert b[direction]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": b[direction]["policies"][0]["periodSeconds"]}]


def test_hpa_metric_is_exported_by_the_node_and_served_by_the_adapter() -> None:
    jsonschema = _jsonschema()

    name = next(m for m in _one("HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods")["pods"]["metric"]["name"]
    rules = _adapter_rules()
    for rule in rules:
        jsonschema.validate(rule, ADAPTER_RULE_SCHEMA)
    (rule,) = [r for r in rules if r["name"].get("as") == name]
    series = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
    assert re.search(rule["name"]["matches"], series)
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    # The node exports it as a gauge (fanout/metrics.py).
    text = Metrics().render().decode()
    assert f"# TYPE {series} gauge" in text


def test_adapter_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = require("promtool")
    (rule,) = [r for r in _adapter_rules() if r["name"].get("as") == "fanout_connections"]
    series = rule["seriesQuery"].split("{", 1)[0]
    expr = (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="fanout",pod=~"fanout-a|fanout-b"')
            .replace("<<.GroupBy>>", "pod"))
    path = tmp_path / "adapter_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "adapter:series", "expr": rule["seriesQuery"]},
        {"record": "adapter:metrics", "expr": expr}]}]}))
    run = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------- NATS
def test_nats_comes_from_the_official_chart_with_jetstream() -> None:
    k = yaml.safe_load((K8S / "nats" / "kustomization.yaml").read_text())
    (chart,) = k["helmCharts"]
    assert chart["name"] == "nats" and chart["repo"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert re.fullmatch(r"1\.\d+\.\d+", chart["version"]) and chart["releaseName"] == "nats"
    values = yaml.safe_load((K8S / "nats" / chart["valuesFile"]).read_text())
    js = values["config"]["jetstream"]
    assert js["enabled"] and js["fileStore"]["enabled"] and js["fileStore"]["pvc"]["enabled"]
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    # The node's NATS_URL names the chart's client Service (release name) on the chart's port.
    assert _configmap()["NATS_URL"] == f"nats://{chart['releaseName']}:4222"
    # The server's user is the one the node logs in as, read from the same Secret keys.
    nats_keys = set(_env_file(K8S / "secrets" / "nats.env.example"))
    for env in values["container"]["env"].values():
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "fanout-nats" and ref["key"] in nats_keys
    # ... and the NATS config's << $VAR >> references are exactly those env vars.
    used = set(re.findall(r"<< \$(\w+) >>", json.dumps(values["config"]["merge"])))
    assert used == set(values["container"]["env"]), used
    (account,) = [a for a in values["config"]["merge"]["accounts"].values() if a.get("jetstream") == "enabled"]
    assert len(account["users"]) == 1
    # No copy of the chart in the repo.
    assert not list((K8S / "nats").glob("templates")) and not (K8S / "nats" / "Chart.yaml").exists()


# --------------------------------------------------------- the preStop hook
def test_prestop_hook_drains_a_real_node() -> None:
    """The hook's command, as the manifest has it (``python`` = this
    interpreter), against a node started with the ConfigMap's settings
    (embedded bus instead of NATS, ephemeral ports, a 2 s drain window):
    every client gets the reconnect hint and a 1001 within the window,
    /ready answers 503 meanwhile, the hook returns once the node is empty,
    and SIGTERM then stops the node at once with status 0."""
    from websockets.asyncio.client import connect

    hook = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[0] == "python"
    env = {k: v for k, v in _configmap().items() if not k.startswith(("NATS_", "JS_"))}
    env.update(WS_HOST="127.0.0.1", HEALTH_HOST="127.0.0.1", WS_PORT="0", HEALTH_PORT="0", WS_DRAIN_SECONDS="2")
    window = 2.0

    async def scenario(node: NodeProcess) -> tuple[list[Any], float, int, str]:
        clients = [await connect(node.ws_url) for _ in range(3)]
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *hook[1:], env={**os.environ, "HEALTH_PORT": str(node.health_port)},
            stderr=asyncio.subprocess.PIPE)

        hinted = asyncio.Event()

        async def until_closed(ws: Any) -> tuple[dict[str, Any], int | None, float]:
            hint = json.loads(await asyncio.wait_for(ws.recv(), 5))
            hinted.set()
            await asyncio.wait_for(ws.wait_closed(), window + 5)
            return hint, ws.close_code, time.monotonic() - t0

        tasks = [asyncio.create_task(until_closed(ws)) for ws in clients]
        await asyncio.wait_for(hinted.wait(), 5)      # the hook's POST /drain has reached the node
        ready_status = (await asyncio.to_thread(node.http, "GET", "/ready"))[0]
        results = await asyncio.gather(*tasks)
        _, err = await asyncio.wait_for(proc.communicate(), window + 10)
        hook_s = time.monotonic() - t0
        assert proc.returncode == 0, err.decode()
        return results, hook_s, ready_status, err.decode()

    with NodeProcess(env) as node:
        results, hook_s, ready_status, _ = asyncio.run(scenario(node))
        assert ready_status == 503
        for hint, code, at in results:
            assert hint["type"] == "reconnect" and hint["reason"] == "drain" and 0 < hint["after_ms"] <= window * 1000
            assert code == 1001 and at < window + 1.5
        assert hook_s < window + 2
        health = json.loads(node.http("GET", "/health")[2])
        assert health["connections"] == 0
        t_term = time.monotonic()
        assert node.stop() == 0
        # The drain already ran: SIGTERM stops well inside WS_SHUTDOWN_TIMEOUT.
        assert time.monotonic() - t_term < 5
