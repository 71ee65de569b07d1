"""The Helm chart with the real helm CLI: lint, render, server-side validation, install, uninstall."""

from __future__ import annotations

import filecmp
import json
import urllib.request
from pathlib import Path

import pytest

from tests.support.kube import CHART, REPO, Kube, helm


def test_chart_crds_are_the_generated_ones() -> None:
    names = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert names == sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    _match, mismatch, errors = filecmp.cmpfiles(REPO / "crds", CHART / "crds", names, shallow=False)
    assert not mismatch and not errors, f"helm/kiln/crds differs from crds/: {mismatch + errors}"


def test_helm_lint_passes() -> None:
    result = helm("lint", str(CHART), "--strict")
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_values_schema_refuses_unknown_keys() -> None:
    result = helm("template", "t", str(CHART), "--set", "replicas=2", check=False)
    assert result.returncode != 0
    assert "additional properties 'replicas' not allowed" in result.stderr


@pytest.mark.cluster
@pytest.mark.parametrize(
    "values",
    [[], ["--set", "watchNamespaces={ns-a,ns-b}", "--set", "replicaCount=2", "--set", "cache.storageClass=fast"]],
    ids=["defaults", "namespaced-ha"],
)
def test_rendered_manifests_pass_the_api_servers_validation(kube: Kube, crds: None, values: list[str]) -> None:
    for ns in ("ns-a", "ns-b"):
        kube.cluster.kubectl("create", "namespace", ns, check=False)
    rendered = helm("template", "kiln", str(CHART), "--namespace", kube.namespace, *values).stdout
    result = kube.cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered, check=False)
    assert result.returncode == 0, result.stderr
    kinds = {line.split()[0] for line in result.stdout.splitlines()}
    assert {
        "serviceaccount/kiln",
        "deployment.apps/kiln",
        "clusterrole.rbac.authorization.k8s.io/kiln-cluster",
    } <= kinds


@pytest.mark.cluster
def test_helm_install_runs_an_operator_that_reconciles_and_uninstall_cleans_up(
    kube: Kube, crds: None, mlp_archive: Path
) -> None:
    ns = kube.namespace
    release = helm(
        "install",
        "kiln",
        str(CHART),
        "--namespace",
        ns,
        "--set",
        f"watchNamespaces={{{ns}}}",
        "--set",
        "runtimeImage=kiln-runtime:helm",
        "--set",
        "artifactGcGraceSeconds=5",
        "--wait",
        "--timeout=120s",
        cluster=kube.cluster,
        check=False,
    )
    assert release.returncode == 0, release.stderr
    assert "kubectl get torchmodels" in release.stdout  # NOTES.txt
    pod = kube.get("pods", "-l", "app.kubernetes.io/name=kiln")["items"][0]
    health = f"http://{pod['status']['podIP']}:8081/healthz"
    assert urllib.request.urlopen(health, timeout=5).status == 200
    kube.apply(f"""
apiVersion: kiln.dev/v1alpha1
kind: TorchModel
metadata: {{name: helm-mlp}}
spec:
  archive: {{uri: "file://{mlp_archive}"}}
  compile: {{dynamicBatch: {{max: 4}}}}
  targets: [{{gpu: cpu}}]
""")
    kube.wait_for(
        lambda: ((kube.get("tm", "helm-mlp") or {}).get("status") or {}).get("phase") == "Ready",
        420,
        every=1,
        message="TorchModel Ready under the Helm-installed operator",
    )
    artifact = kube.get("compiledartifacts")["items"][0]
    assert artifact["spec"]["runtimeImage"] == "kiln-runtime:helm"  # the chart's setting reached the operator

    kube.run("delete", "tm", "helm-mlp")
    kube.wait_for(lambda: not kube.get("compiledartifacts")["items"], 120, message="artifact collected")
    uninstall = helm("uninstall", "kiln", "--namespace", ns, "--wait", cluster=kube.cluster, check=False)
    assert uninstall.returncode == 0, uninstall.stderr
    left = kube.run("get", "deployments,serviceaccounts,roles,rolebindings,services", "-o", "json").stdout
    names = [i["metadata"]["name"] for i in json.loads(left)["items"]]
    assert [n for n in names if n.startswith("kiln")] == []
    cluster_left = kube.cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").stdout
    assert "kiln-cluster" not in cluster_left
    assert kube.cluster.kubectl("get", "crd", "torchmodels.kiln.dev", check=False).returncode == 0  # CRDs stay
