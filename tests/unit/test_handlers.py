"""The kopf glue (no cluster): handlers read kopf's indexes, write through the Writer, patch status.

The cluster is a recording Writer here, as the unit lane allows; tests/operator runs the same
handlers against a real API server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
import pytest

from kiln.contracts import CompileSummary
from kiln.operator import handlers, naming
from kiln.operator.k8s import NamespaceTerminating, contains, plain
from kiln.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(runtime_image="kiln-runtime:1")
NS = "ns"


class Recorder:
    """A Writer that keeps what was created and applied, deciding 'changed' as the real one does."""

    def __init__(self, terminating: bool = False) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.terminating = terminating

    def create_if_missing(self, obj: dict[str, Any]) -> bool:
        if self.terminating:
            raise NamespaceTerminating(NS)
        ref = (obj["kind"], obj["metadata"]["name"])
        if ref in self.objects:
            return False
        self.objects[ref] = obj
        self.writes.append(("create", *ref))
        return True

    def apply(self, obj: dict[str, Any], current: Mapping[str, Any] | None) -> bool:
        if current is not None and contains(plain(current), obj):
            return False
        self.objects[(obj["kind"], obj["metadata"]["name"])] = obj
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return True

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.writes.append(("delete", kind, name))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for (k, _), o in self.objects.items() if k == kind]


def kiln(cluster: Recorder) -> tuple[handlers.Kiln, list[tuple[str, str, str]]]:
    events: list[tuple[str, str, str]] = []
    memo = handlers.Kiln(SETTINGS, cluster, post_event=lambda _, kind, reason, msg: events.append((kind, reason, msg)))
    return memo, events


def torchmodel(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TorchModel",
        "metadata": {"name": "m", "namespace": NS, "uid": "u1", "generation": 1},
        "spec": {"archive": {"uri": "file:///m.pt2", "sha256": "a" * 64}, "targets": [{"gpu": "cpu"}]} | spec,
    }


def index(pairs: list[tuple[str, Mapping[str, Any]]], indexer: Any, **kwargs: Any) -> dict[Any, list[Any]]:
    """What kopf's index would hold for these bodies: indexer results, grouped by key."""
    out: dict[Any, list[Any]] = {}
    for name, body in pairs:
        meta = body.get("metadata", {})
        found = indexer(
            namespace=NS,
            name=name,
            body=kopf.Body(dict(body)),
            labels=meta.get("labels", {}),
            annotations=meta.get("annotations", {}),
            **kwargs,
        )
        for key, value in found.items():
            out.setdefault(key, []).append(value)
    return out


def run_model(body: dict[str, Any], memo: handlers.Kiln, **indexes: dict[Any, list[Any]]) -> kopf.Patch:
    patch = kopf.Patch()
    views = {"artifacts": {}, "deployments": {}, "services": {}, "pods": {}} | indexes
    handlers.reconcile_torchmodel(
        body=kopf.Body(body), namespace=NS, uid=body["metadata"]["uid"], patch=patch, memo=memo, **views
    )
    return patch


def test_a_new_torchmodel_gets_its_claim_and_artifact_once_however_often_it_runs() -> None:
    cluster = Recorder()
    memo, events = kiln(cluster)
    body = torchmodel()
    patch = run_model(body, memo)
    assert [w[:2] for w in cluster.writes] == [("create", "PersistentVolumeClaim"), ("create", "CompiledArtifact")]
    assert patch.status["phase"] == "Compiling" and events
    # the watch now shows the artifact and the status kopf patched: the next run writes nothing
    art = cluster.of("CompiledArtifact")[0]
    artifacts = index([(art["metadata"]["name"], art)], handlers.index_artifacts)
    again = run_model(body | {"status": dict(patch.status)}, memo, artifacts=artifacts)
    assert len(cluster.writes) == 2 and not again.status


def test_a_ready_artifact_rolls_out_serving_pods_and_a_service_then_nothing_changes() -> None:
    cluster = Recorder()
    memo, _ = kiln(cluster)
    body = torchmodel()
    run_model(body, memo)
    art = cluster.of("CompiledArtifact")[0]
    ready = art | {"status": {"phase": "Ready", "job": "compile-x"}}
    artifacts = index([(art["metadata"]["name"], ready)], handlers.index_artifacts)
    run_model(body, memo, artifacts=artifacts)
    dep, svc = cluster.of("Deployment")[0], cluster.of("Service")[0]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    pod = dep["spec"]["template"]["spec"]["containers"][0]
    # HTTP and the Open Inference Protocol's gRPC, by name; probes stay on HTTP
    assert [(p["name"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("http", "http"), ("grpc", "grpc")]
    assert {p["name"]: p["containerPort"] for p in pod["ports"]} == {"http": 8080, "grpc": 8081}
    assert "--grpc-port=8081" in pod["args"] and pod["readinessProbe"]["httpGet"]["port"] == "http"
    writes = len(cluster.writes)
    run_model(
        body,
        memo,
        artifacts=artifacts,
        deployments=index([(dep["metadata"]["name"], dep)], handlers.index_by_name),
        services=index([(svc["metadata"]["name"], svc)], handlers.index_by_name),
    )
    assert len(cluster.writes) == writes  # level-triggered: what is already so is not written again


def test_serving_pods_are_filed_where_the_torchmodel_looks_for_them() -> None:
    """A pod of the Deployment the operator wrote is found by reconcile_torchmodel's lookup key."""
    cluster = Recorder()
    memo, _ = kiln(cluster)
    body = torchmodel(targets=[{"gpu": "NVIDIA-H100-80GB-HBM3"}])
    run_model(body, memo)
    art = cluster.of("CompiledArtifact")[0]
    artifacts = index([(art["metadata"]["name"], art | {"status": {"phase": "Ready"}})], handlers.index_artifacts)
    run_model(body, memo, artifacts=artifacts)
    template = cluster.of("Deployment")[0]["spec"]["template"]
    unschedulable = {
        "metadata": template["metadata"],
        "status": {
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
            ]
        },
    }
    pods = index([("pod-1", unschedulable)], handlers.index_pods)
    assert list(pods) == [(NS, naming.serving_owner("m", "NVIDIA-H100-80GB-HBM3"))]
    patch = run_model(body, memo, artifacts=artifacts, pods=pods)
    assert "0/3 nodes" in str(patch.status)


def test_a_spec_the_models_refuse_is_failed_with_the_field_named() -> None:
    memo, events = kiln(Recorder())
    body = torchmodel(compile={"backend": "openvino"}, targets=[{"gpu": "NVIDIA-H100-80GB-HBM3"}])
    with pytest.raises(kopf.PermanentError, match="every target must be"):
        run_model(body, memo)
    assert events and events[0][:2] == ("Warning", "InvalidSpec")


def artifact_body() -> dict[str, Any]:
    cluster = Recorder()
    run_model(torchmodel(), kiln(cluster)[0])
    art = cluster.of("CompiledArtifact")[0]
    return art | {"metadata": art["metadata"] | {"uid": "a1"}}


def run_artifact(body: dict[str, Any], memo: handlers.Kiln, **indexes: dict[Any, list[Any]]) -> kopf.Patch:
    patch = kopf.Patch()
    views = {"jobs": {}, "pods": {}, "users": {}, "corrupt": {}} | indexes
    name = body["metadata"]["name"]
    handlers.reconcile_compiledartifact(
        body=kopf.Body(body), namespace=NS, name=name, uid="a1", patch=patch, memo=memo, **views
    )
    return patch


def test_an_artifact_gets_one_compile_job_and_its_summary_becomes_ready() -> None:
    cluster = Recorder()
    memo, events = kiln(cluster)
    art = artifact_body()
    users = index([("m", torchmodel())], handlers.index_users, memo=memo)
    run_artifact(art, memo, users=users)
    job = cluster.of("Job")[0]
    assert job["metadata"]["name"] == naming.compile_job_name(art["spec"]["key"])
    jobs = index([(job["metadata"]["name"], job | {"status": {"succeeded": 1}})], handlers.index_by_name)
    summary = CompileSummary(
        key=art["spec"]["key"],
        path="/cache/k",
        size_bytes=1,
        sha256="b" * 64,
        compile_seconds=2.0,
        torch_version="2.11.0",
        engine="aotinductor",
        dims="batch=1..32",
    )
    pod = {
        "metadata": {"labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": job["metadata"]["name"]}},
        "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 0, "message": summary.to_json()}}}]},
    }
    patch = run_artifact(art, memo, users=users, jobs=jobs, pods=index([("p", pod)], handlers.index_pods))
    assert patch.status["phase"] == "Ready" and patch.status["usedBy"] == ["m"]
    assert patch.status["sizeBytes"] == 1 and ("Normal", "Ready", "compiled") in events
    assert [w[1] for w in cluster.writes] == ["PersistentVolumeClaim", "Job"]  # no second Job


def test_the_finalizer_waits_for_users_then_removes_the_cache_folder() -> None:
    cluster = Recorder()
    memo, _ = kiln(cluster)
    art = artifact_body()
    name = art["metadata"]["name"]
    call = {"body": kopf.Body(art), "namespace": NS, "name": name, "memo": memo}
    with pytest.raises(kopf.TemporaryError, match="still used by TorchModel"):
        handlers.remove_artifact(**call, users={(NS, name): ["m"]}, jobs={})
    with pytest.raises(kopf.TemporaryError, match="removing the cache folder"):
        handlers.remove_artifact(**call, users={}, jobs={})
    gc = cluster.of("Job")[0]
    assert gc["metadata"]["name"] == naming.gc_job_name(art["spec"]["key"])
    done = {(NS, gc["metadata"]["name"]): [gc | {"status": {"succeeded": 1}}]}
    handlers.remove_artifact(**call, users={}, jobs=done)  # returns: the finalizer is released
    gone = {"body": kopf.Body(art), "namespace": NS, "name": name, "memo": kiln(Recorder(terminating=True))[0]}
    handlers.remove_artifact(**gone, users={}, jobs={})  # the namespace takes the claim with it


def test_kiln_operator_help_lists_every_setting_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.operator import main

    with pytest.raises(SystemExit) as exited:
        main.parse_args(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for name in [*(f"KILN_{field.upper()}" for field in OperatorSettings.model_fields), *main.RUN_ENV]:
        assert f"  {name}: " in out
