"""deploy/: Kubernetes manifests valid against the Kubernetes schemas (offline,
from the schemas kubernetes-validate ships), and alerts and a dashboard that
use only metrics tokensvc exports, all of which the README lists."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tokensvc import metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes still commonly run, and the newest schemas shipped.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
METRIC_NAME = re.compile(r"\b(?:tokensvc|rpc_server)_[a-z0-9_]+")


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    kinds = [doc["kind"] for doc in documents()]
    assert sorted(set(kinds)) == [
        "Deployment",
        "Job",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "StatefulSet",
    ]
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)
    # ... and the validator does refuse what is wrong.
    broken = copy.deepcopy(of_kind("Deployment")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def pod(workload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def test_the_postgresql_deployment_runs_several_hardened_replicas_with_secrets_and_probes() -> None:
    (deployment,) = of_kind("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    spec, container = pod(deployment)
    env = {e["name"]: e for e in container["env"]}
    for name, secret in (
        ("TOKENSVC_DATABASE_URL", "tokensvc-database"),
        ("TOKENSVC_KEYS", "tokensvc-keys"),
    ):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == secret
    assert {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v} == {"tokensvc-tls"}
    assert env["TOKENSVC_TLS_CERT"]["value"].startswith("/tls/")
    assert container["livenessProbe"]["exec"]["command"][-2:] == ["tokensvc.healthcheck", "--alive"]
    assert container["readinessProbe"]["exec"]["command"][-1] == "tokensvc.healthcheck"
    assert container["resources"]["requests"]
    assert_hardened(spec, container)
    (budget,) = of_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


def test_the_sqlite_variant_is_one_replica_with_its_data_on_a_volume() -> None:
    (stateful,) = of_kind("StatefulSet")
    assert stateful["spec"]["replicas"] == 1
    spec, container = pod(stateful)
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert_hardened(spec, container)


def assert_hardened(spec: dict[str, Any], container: dict[str, Any]) -> None:
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The image's listen addresses (its ENV), named as the Service uses them.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"TOKENSVC_LISTEN=0.0.0.0:{ports['grpc']}" in dockerfile
    assert f"TOKENSVC_METRICS_LISTEN=0.0.0.0:{ports['metrics']}" in dockerfile


def test_the_network_policies_admit_brokers_and_prometheus_only() -> None:
    for policy in of_kind("NetworkPolicy"):
        ports = sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"])
        assert ports == [9464, 50051]
        assert all(rule["from"] for rule in policy["spec"]["ingress"])


def exported() -> set[str]:
    """Every sample name tokensvc's metrics can have."""
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
        if METRIC_NAME.fullmatch(family.name + suffix)
    }


def used_in_alerts() -> set[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    (group,) = rules["groups"]
    names = set()
    for rule in group["rules"]:
        assert rule["alert"].startswith("Tokensvc") and rule["expr"] and rule["labels"]["severity"]
        names |= set(METRIC_NAME.findall(rule["expr"]))
    return names


def used_in_dashboard() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana/tokensvc.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def test_the_alerts_and_the_dashboard_use_only_metrics_tokensvc_exports() -> None:
    names = exported()
    assert "tokensvc_token_expiry_timestamp_seconds" in names  # the parse found them
    assert used_in_alerts() <= names, used_in_alerts() - names
    assert used_in_dashboard() <= names, used_in_dashboard() - names
    # The dashboard shows every metric.
    families = {re.sub(r"_(total|bucket|count|sum|info)$", "", n) for n in names}
    shown = {re.sub(r"_(total|bucket|count|sum|info)$", "", n) for n in used_in_dashboard()}
    assert families <= shown, families - shown


def test_the_readme_lists_every_metric_and_a_runbook_for_every_alert() -> None:
    readme = (ROOT / "README.md").read_text()
    for family in metrics.REGISTRY.collect():
        if METRIC_NAME.match(family.name):
            name = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
            assert f"`{name}`" in readme, name
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    for rule in rules["groups"][0]["rules"]:
        assert f"**{rule['alert']}**" in readme, rule["alert"]
