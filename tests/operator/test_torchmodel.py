"""The operator on the real local control plane, with real kiln-compile and kiln-serve processes."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from examples import models
from kiln.devcluster.cluster import LocalCluster
from tests.support.kube import GPU_PRODUCT, Kube, Operator
from tests.support.torchmodels import compile_jobs, infer, job_pods, ready_pod_ips, status, torchmodel, wait_phase

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def flow(cluster: LocalCluster, operator: Operator) -> Iterator[Kube]:
    """One namespace for the ordered main flow, so its compiles are shared by its tests."""
    ns = f"flow-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    yield Kube(cluster, ns)
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_torchmodel_becomes_ready_and_answers_like_eager(flow: Kube, mlp_archive: Path) -> None:
    assert flow.apply(torchmodel("mlp", f"file://{mlp_archive}")).returncode == 0
    st = wait_phase(flow, "mlp", "Ready")
    conditions = {c["type"]: c for c in st["conditions"]}
    assert conditions["Ready"]["status"] == "True" and conditions["ArtifactsReady"]["status"] == "True"
    assert conditions["Ready"]["observedGeneration"] == 1
    target = st["targets"][0]
    assert target["phase"] == "Ready" and target["servingKey"] == target["key"]
    assert st["url"] == f"http://mlp-cpu.{flow.namespace}.svc.cluster.local:8080/v2/models/mlp"
    artifact = flow.get("compiledartifact", target["artifact"])["status"]
    assert artifact["phase"] == "Ready" and artifact["sizeBytes"] > 0 and len(artifact["sha256"]) == 64
    assert artifact["compileSeconds"] > 0 and artifact["usedBy"] == ["mlp"]
    inputs = models.examples("mlp", 3, seed=5)
    got = infer(ready_pod_ips(flow, "mlp")[0], "mlp", inputs)
    torch.testing.assert_close(got, models.eager("mlp", *inputs)[0], atol=1e-4, rtol=1e-3)
    # The serving pod runs the hardened template the operator wrote.
    pod = flow.get("pods", "-l", "kiln.dev/model=mlp")["items"][0]
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    cache = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "cache")
    assert cache["readOnly"] is True
    assert "Ready" in flow.run("get", "tm", "mlp").stdout


def test_second_model_with_the_same_key_reuses_the_artifact(flow: Kube, mlp_archive: Path) -> None:
    assert flow.apply(torchmodel("mlp-twin", f"file://{mlp_archive}")).returncode == 0
    st = wait_phase(flow, "mlp-twin", "Ready", timeout=120)
    assert st["targets"][0]["artifact"] == status(flow, "mlp")["targets"][0]["artifact"]
    jobs = compile_jobs(flow)
    assert len(jobs) == 1 and len(job_pods(flow, jobs[0]["metadata"]["name"])) == 1
    artifact = flow.get("compiledartifact", st["targets"][0]["artifact"])
    flow.wait_for(
        lambda: flow.get("compiledartifact", st["targets"][0]["artifact"])["status"]["usedBy"] == ["mlp", "mlp-twin"],
        20,
        message="usedBy lists both models",
    )
    assert artifact is not None


def test_a_replica_change_compiles_nothing(flow: Kube) -> None:
    flow.run("patch", "tm", "mlp", "--type=merge", "-p", '{"spec":{"targets":[{"gpu":"cpu","replicas":2}]}}')
    flow.wait_for(
        lambda: status(flow, "mlp").get("readyReplicas") == 2 and status(flow, "mlp")["phase"] == "Ready",
        120,
        message="2 ready replicas",
    )
    assert len(compile_jobs(flow)) == 1


def test_an_archive_change_recompiles_then_switches_without_failed_requests(flow: Kube, archive_dir: Path) -> None:
    new_archive = models.export("mlp", archive_dir / "mlp-v2.pt2", seed=1)
    old_key = status(flow, "mlp")["targets"][0]["key"]
    inputs = models.examples("mlp", 2, seed=9)
    results: list[str] = []
    stop = threading.Event()

    def load() -> None:  # a light, steady client that goes through "endpoints" (ready pods)
        n = 0
        while not stop.is_set():
            ips = ready_pod_ips(flow, "mlp")
            try:
                infer(ips[n % len(ips)], "mlp", inputs)
                results.append("ok")
            except urllib.error.HTTPError as exc:
                results.append(f"failed: {exc} from {ips[n % len(ips)]}: {exc.read()[:200]!r}")
            except (urllib.error.URLError, OSError, IndexError) as exc:
                results.append(f"failed: {exc}")
            n += 1
            time.sleep(0.1)

    client = threading.Thread(target=load)
    client.start()
    try:
        patch = json.dumps({"spec": {"archive": {"uri": f"file://{new_archive}"}}})
        flow.run("patch", "tm", "mlp", "--type=merge", "-p", patch)
        flow.wait_for(lambda: status(flow, "mlp").get("phase") == "Compiling", 30, message="Compiling")
        assert status(flow, "mlp")["targets"][0]["servingKey"] == old_key  # old pods keep serving meanwhile
        st = wait_phase(flow, "mlp", "Ready")
        new_key = st["targets"][0]["key"]
        assert new_key != old_key and st["targets"][0]["servingKey"] == new_key
        flow.wait_for(
            lambda: len(flow.get("pods", "-l", "kiln.dev/model=mlp")["items"]) == 2, 90, message="old pods gone"
        )
    finally:
        stop.set()
        client.join()
    failures = [r for r in results if r != "ok"]
    assert len(results) > 20 and not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:3]}"
    got = infer(ready_pod_ips(flow, "mlp")[0], "mlp", inputs)
    torch.testing.assert_close(got, models.eager("mlp", *inputs, seed=1)[0], atol=1e-4, rtol=1e-3)
    new_job = [j for j in compile_jobs(flow) if j["metadata"]["labels"]["kiln.dev/key"] == new_key[:63]]
    assert len(new_job) == 1 and len(job_pods(flow, new_job[0]["metadata"]["name"])) == 1


def test_deleting_models_removes_children_and_unused_artifacts(flow: Kube) -> None:
    flow.run("delete", "tm", "mlp", "mlp-twin")
    flow.wait_for(
        lambda: not flow.get("deployments")["items"] and not flow.get("services")["items"],
        60,
        message="children garbage-collected",
    )
    # Unused artifacts go after the grace period (5 s here), their cache folders with them.
    flow.wait_for(lambda: not flow.get("compiledartifacts")["items"], 120, message="artifacts collected")
    gc_jobs = [j for j in flow.get("jobs")["items"] if j["metadata"]["name"].startswith("cache-gc-")]
    assert gc_jobs and all(j["status"].get("succeeded") for j in gc_jobs)


def test_an_unreachable_archive_fails_with_the_reason_in_status(kube: Kube, operator: Operator) -> None:
    kube.apply(torchmodel("lost", "file:///nonexistent/model.pt2"))
    st = wait_phase(kube, "lost", "Failed", timeout=120)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "CompileFailed"
    assert "archive not found: /nonexistent/model.pt2" in ready["message"]
    assert "archive not found" in kube.run("get", "tm", "lost", "-o", "wide").stdout
    events = kube.run("get", "events", "--field-selector", "involvedObject.name=lost").stdout
    assert "ArtifactFailed" in events


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ('{"targets": [{"gpu": "cpu", "replicas": -1}]}', "spec.targets[0].replicas"),
        ('{"archive": {"uri": "ftp://host/model.pt2"}}', "spec.archive.uri"),
        ('{"compile": {"dynamicBatch": {"min": 9, "max": 4}}}', "min must not exceed max"),
        ('{"compile": {"options": {"run_shell": "true"}}}', "unknown compile option"),
        ('{"compile": {"mode": "fast"}}', 'spec.compile.mode: Unsupported value: "fast"'),
        ('{"targets": []}', "spec.targets"),
        ('{"surprise": 1}', 'unknown field "spec.surprise"'),
        ('{"archive": {"uri": "file:///m.onnx", "format": "onnx"}}', 'spec.archive.format: Unsupported value: "onnx"'),
        ('{"compile": {"mode": "jit", "jit": {"backend": "tvm"}}}', "spec.compile.jit.backend: Unsupported value"),
        (
            '{"compile": {"backend": "openvino"}, "targets": [{"gpu": "NVIDIA-H100-80GB-HBM3"}]}',
            "backend openvino builds CPU artifacts: every target must be gpu: cpu",
        ),
        ('{"compile": {"backend": "openvino", "mode": "eager"}}', "backend openvino compiles ahead of time"),
        ('{"compile": {"dynamicBatch": {"dim": 9}}}', "spec.compile.dynamicBatch.dim: Invalid value: 9"),
    ],
)
def test_an_invalid_spec_is_rejected_by_the_api_server_naming_the_field(
    kube: Kube, crds: None, patch: str, expected: str
) -> None:
    spec = {"archive": {"uri": "file:///m.pt2"}, "targets": [{"gpu": "cpu"}]} | json.loads(patch)
    manifest = json.dumps(
        {"apiVersion": "kiln.dev/v1alpha1", "kind": "TorchModel", "metadata": {"name": "bad"}, "spec": spec}
    )
    result = kube.apply(manifest)
    assert result.returncode != 0
    assert expected in result.stderr


def test_a_gpu_target_compiles_and_would_serve_only_on_that_gpu_node(
    kube: Kube, operator: Operator, mlp_archive: Path
) -> None:
    kube.apply(torchmodel("gpu", f"file://{mlp_archive}", gpu=GPU_PRODUCT))
    jobs = kube.wait_for(lambda: compile_jobs(kube), 30, message="compile job")
    pods = kube.wait_for(
        lambda: [p for p in job_pods(kube, jobs[0]["metadata"]["name"]) if p["spec"].get("nodeName")],
        30,
        message="compile pod scheduled",
    )
    assert {p["spec"]["nodeName"] for p in pods} == {"gpu-0"}
    spec = pods[0]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": GPU_PRODUCT}
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # This machine has no GPU: the compile fails honestly instead of pretending.
    st = wait_phase(kube, "gpu", "Failed", timeout=120)
    assert "no CUDA device" in st["targets"][0]["message"]


def test_a_gpu_no_node_has_is_reported_instead_of_waiting_silently(
    kube: Kube, operator: Operator, mlp_archive: Path
) -> None:
    kube.apply(torchmodel("b200", f"file://{mlp_archive}", gpu="NVIDIA-B200"))
    # The scheduler may first report the cache claim as unbound; once it binds, the node selector is the reason.
    st = kube.wait_for(
        lambda: status(kube, "b200") if "node affinity/selector" in json.dumps(status(kube, "b200")) else None,
        120,
        message="unschedulable reported with the node selector as the reason",
    )
    assert st["phase"] == "Degraded"
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "Unschedulable"
    assert "didn't match Pod's node affinity/selector" in degraded["message"]


def test_eager_mode_serves_without_a_compile_job(kube: Kube, operator: Operator, mlp_archive: Path) -> None:
    kube.apply(torchmodel("plain", f"file://{mlp_archive}", mode="eager"))
    st = wait_phase(kube, "plain", "Ready", timeout=180)
    assert st["targets"][0]["phase"] == "NotNeeded"
    assert not compile_jobs(kube) and not kube.get("compiledartifacts")["items"]
    inputs = models.examples("mlp", 2, seed=2)
    got = infer(ready_pod_ips(kube, "plain")[0], "plain", inputs)
    torch.testing.assert_close(got, models.eager("mlp", *inputs)[0], atol=1e-4, rtol=1e-3)


def test_an_operator_killed_mid_compile_finishes_with_one_compile(
    kube: Kube, operator: Operator, archive_dir: Path
) -> None:
    archive = models.export("mlp", archive_dir / "mlp-restart.pt2", seed=2)
    kube.apply(torchmodel("restart", f"file://{archive}"))
    jobs = kube.wait_for(lambda: compile_jobs(kube), 60, message="compile job")
    name = jobs[0]["metadata"]["name"]
    kube.wait_for(  # 120 s: once in a full run the Job's pod took over 60 s to start on the 2-core CI machine
        lambda: any(p["status"].get("phase") == "Running" for p in job_pods(kube, name)), 120, message="compile running"
    )
    operator.kill()
    time.sleep(2)
    operator.start()
    wait_phase(kube, "restart", "Ready")
    jobs = compile_jobs(kube)
    assert [j["metadata"]["name"] for j in jobs] == [name]
    assert len(job_pods(kube, name)) == 1


def test_with_two_operator_replicas_only_one_is_active(cluster: LocalCluster, kube: Kube, crds: None) -> None:
    """kopf peering: the lower-priority replica pauses while the higher one works."""
    cluster.kubectl(
        "apply", "-f", "-", input="apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata: {name: kiln}\n"
    )
    replicas = [
        Operator(cluster, f"operator-peer-{p}.log", KILN_STANDALONE="false", KILN_PEERING_PRIORITY=str(p))
        for p in (10, 20)
    ]
    logs = [op.log for op in replicas]
    try:
        for op in replicas:
            op.start()
        kube.wait_for(
            lambda: "Pausing operations in favour of" in logs[0].read_text(errors="replace"),
            60,
            message="the priority-10 replica pauses",
        )
        assert "Pausing operations" not in logs[1].read_text(errors="replace")
    finally:
        for op in replicas:
            op.stop()
