"""The pure reconcile: desired children and status from observed state (no cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kiln.api import ArtifactPhase, CompiledArtifact, CompiledArtifactStatus, TorchModel
from kiln.operator import naming
from kiln.operator.reconcile import (
    ObservedTarget,
    corruption_report,
    plan_targets,
    reconcile_artifact,
    reconcile_model,
)
from kiln.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(runtime_image="kiln-runtime:1")
NOW = "2026-11-23T00:00:00Z"


def model(**spec: Any) -> TorchModel:
    base = {"archive": {"uri": "file:///m.pt2", "sha256": "a" * 64}, "targets": [{"gpu": "cpu", "replicas": 2}]}
    return TorchModel(metadata={"name": "m", "namespace": "ns", "generation": 3}, spec=base | spec)


def deployment(key: str, ready: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": "m-cpu", "generation": 1, "annotations": {naming.KEY_ANNOTATION: key}},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": 1,
            "replicas": 2,
            "readyReplicas": ready,
            "updatedReplicas": 2,
            "availableReplicas": ready,
        },
    }


def test_the_same_spec_gives_the_same_keys_and_a_changed_archive_a_new_one() -> None:
    one, two = plan_targets(model(), SETTINGS), plan_targets(model(), SETTINGS)
    assert one == two
    changed = plan_targets(model(archive={"uri": "file:///m.pt2", "sha256": "b" * 64}), SETTINGS)
    assert changed[0].key != one[0].key


def test_nothing_is_deployed_before_the_first_artifact_is_ready() -> None:
    result = reconcile_model(model(), {"cpu": ObservedTarget()}, "uid", SETTINGS, NOW)
    assert len(result.artifacts) == 1 and not result.deployments
    assert result.status.phase == "Compiling"


def test_old_pods_keep_serving_while_a_new_key_compiles() -> None:
    key = plan_targets(model(), SETTINGS)[0].key
    observed = ObservedTarget(
        artifact=CompiledArtifactStatus(phase=ArtifactPhase.compiling), deployment=deployment("old-key")
    )
    result = reconcile_model(model(), {"cpu": observed}, "uid", SETTINGS, NOW)
    dep = result.deployments[0]
    assert dep["metadata"]["annotations"][naming.KEY_ANNOTATION] == "old-key" != key
    assert "--artifact=/cache/old-key" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert result.status.phase == "Compiling"


def test_ready_artifact_and_replicas_make_the_model_ready_and_running_twice_changes_nothing() -> None:
    key = plan_targets(model(), SETTINGS)[0].key
    assert key is not None
    observed = {
        "cpu": ObservedTarget(artifact=CompiledArtifactStatus(phase=ArtifactPhase.ready), deployment=deployment(key))
    }
    first = reconcile_model(model(), observed, "uid", SETTINGS, NOW)
    assert first.status.phase == "Ready" and first.status.ready_replicas == 2
    again = reconcile_model(
        model().model_copy(update={"status": first.status}), observed, "uid", SETTINGS, "2026-11-23T01:00:00Z"
    )
    assert again.deployments == first.deployments and again.status == first.status
    assert not again.events


def test_gpu_targets_pin_pods_to_the_product_and_ask_for_a_gpu() -> None:
    m = model(targets=[{"gpu": "NVIDIA-H100-80GB-HBM3", "replicas": 1}])
    result = reconcile_model(m, {}, "uid", SETTINGS, NOW)
    art = CompiledArtifact(metadata={"name": "a", "namespace": "ns"}, spec=result.artifacts[0]["spec"])
    job = reconcile_artifact(art, None, [], ["m"], "uid", SETTINGS, NOW).job
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert "--device=cuda" in pod["containers"][0]["args"]


def test_a_failed_compile_job_reports_the_pods_termination_message() -> None:
    m = model()
    art_body = reconcile_model(m, {}, "uid", SETTINGS, NOW).artifacts[0]
    art = CompiledArtifact(metadata={"name": "a", "namespace": "ns"}, spec=art_body["spec"])
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}
    pods = [
        {
            "status": {
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 1, "message": "DigestMismatch: sha256 mismatch"}}}
                ]
            }
        }
    ]
    result = reconcile_artifact(art, job, pods, ["m"], "uid", SETTINGS, NOW)
    assert result.status.phase == ArtifactPhase.failed
    assert result.status.message == "DigestMismatch: sha256 mismatch"
    assert result.event == ("Warning", "Failed", "DigestMismatch: sha256 mismatch")
    assert result.status.used_by == ["m"] and result.status.unused_since is None


def test_one_at_a_time_rollout_needs_no_extra_gpu() -> None:
    m = model(serving={"rollout": "OneAtATime"})
    key = plan_targets(m, SETTINGS)[0].key
    assert key is not None
    observed = {"cpu": ObservedTarget(artifact=CompiledArtifactStatus(phase=ArtifactPhase.ready))}
    dep = reconcile_model(m, observed, "uid", SETTINGS, NOW).deployments[0]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_archives_that_run_user_code_get_a_compile_job_even_for_eager_and_jit() -> None:
    """model.py runs only in the compile Job: jit and eager pods load the program it prepared."""
    plain_eager = model(compile={"mode": "eager"})
    assert plain_eager.spec.archive.format.value == "exported-program"
    assert plain_eager.spec.targets and plain_eager.spec.compile.mode.value == "eager"
    assert plan_targets(plain_eager, SETTINGS)[0].key is None
    bundle = model(
        archive={"uri": "file:///m.tar.gz", "sha256": "a" * 64, "format": "module-and-weights"},
        compile={"mode": "jit", "jit": {"backend": "aot_eager", "fullgraph": True}},
    )
    key = plan_targets(bundle, SETTINGS)[0].key
    assert key is not None
    result = reconcile_model(bundle, {}, "uid", SETTINGS, NOW)
    assert result.artifacts and not result.deployments  # nothing serves before the program is prepared
    art = CompiledArtifact(metadata={"name": "a", "namespace": "ns"}, spec=result.artifacts[0]["spec"])
    job = reconcile_artifact(art, None, [], ["m"], "uid", SETTINGS, NOW).job
    assert job is not None
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--format=module-and-weights" in args and "--mode=jit" in args
    observed = {"cpu": ObservedTarget(artifact=CompiledArtifactStatus(phase=ArtifactPhase.ready))}
    pod_args = reconcile_model(bundle, observed, "uid", SETTINGS, NOW).deployments[0]["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert f"--artifact=/cache/{key}" in pod_args and "--jit-backend=aot_eager" in pod_args
    assert "--jit-fullgraph=true" in pod_args and not any(a.startswith("--archive=") for a in pod_args)


def test_jit_arguments_roll_pods_but_never_change_the_artifact() -> None:
    one = model(compile={"mode": "aot"})
    two = model(compile={"mode": "aot", "jit": {"fullgraph": True}})
    assert plan_targets(one, SETTINGS)[0].key == plan_targets(two, SETTINGS)[0].key
    changed = model(compile={"backend": "openvino"})
    assert plan_targets(changed, SETTINGS)[0].key != plan_targets(one, SETTINGS)[0].key


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"compile": {"backend": "openvino"}, "targets": [{"gpu": "NVIDIA-H100-80GB-HBM3"}]}, "every target must be"),
        ({"compile": {"backend": "openvino", "mode": "jit"}}, "it needs mode aot"),
        ({"compile": {"mode": "jit", "jit": {"backend": "tvm"}}}, "Input should be 'inductor'"),
    ],
)
def test_backends_are_validated_with_a_clear_message(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model(**spec)


def test_serving_pods_read_their_cpu_limit_through_the_downward_api() -> None:
    observed = {"cpu": ObservedTarget(artifact=CompiledArtifactStatus(phase=ArtifactPhase.ready))}
    m = model(serving={"batching": {"batchable": False}})
    container = reconcile_model(m, observed, "uid", SETTINGS, NOW).deployments[0]["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["KILN_CPU_LIMIT"] == {
        "resourceFieldRef": {"containerName": "serve", "resource": "limits.cpu", "divisor": "1"}
    }
    assert "--batchable=false" in container["args"]


def test_a_corrupt_report_newer_than_the_artifact_compiles_it_again_under_a_new_job_name() -> None:
    art_body = reconcile_model(model(), {}, "uid", SETTINGS, NOW).artifacts[0]
    ready = CompiledArtifactStatus(phase=ArtifactPhase.ready, ready_at="2026-11-23T00:00:05Z", job="compile-x")
    art = CompiledArtifact(metadata={"name": "a", "namespace": "ns"}, spec=art_body["spec"], status=ready)
    key = art.spec.key
    served = {
        "status": {
            "containerStatuses": [
                {
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "finishedAt": "2026-11-23T00:01:00Z",
                            "message": "ArtifactCorrupt: /cache/k/runner/model.so does not match the sha256",
                        }
                    },
                }
            ]
        }
    }
    report = corruption_report(served)
    assert report == ("2026-11-23T00:01:00Z", "ArtifactCorrupt: /cache/k/runner/model.so does not match the sha256")
    old_job = {"status": {"succeeded": 1}}
    first = reconcile_artifact(art, old_job, [], ["m"], "uid", SETTINGS, NOW, report)
    assert first.status.phase == ArtifactPhase.compiling and first.status.rebuilds == 1
    assert first.status.message == "compile job created (rebuild 1: a serving pod found the cached artifact corrupt)"
    assert first.job is not None and first.job["metadata"]["name"] == naming.compile_job_name(key, 1)
    assert first.job["metadata"]["name"] == f"compile-{key[:16]}-r1"
    # Running it again from the status it wrote changes nothing: same Job, no second rebuild.
    again = art.model_copy(update={"status": first.status})
    second = reconcile_artifact(again, None, [], ["m"], "uid", SETTINGS, NOW, report)
    assert second.status.rebuilds == 1 and second.job == first.job
    # Once rebuilt, the same (older) report no longer counts.
    rebuilt = first.status.model_copy(update={"phase": ArtifactPhase.ready, "ready_at": "2026-11-23T00:02:00Z"})
    third = reconcile_artifact(
        art.model_copy(update={"status": rebuilt}), None, [], ["m"], "uid", SETTINGS, NOW, report
    )
    assert third.status.phase == ArtifactPhase.ready and third.job is None


def test_an_artifact_corrupt_after_every_rebuild_fails_instead_of_looping() -> None:
    art_body = reconcile_model(model(), {}, "uid", SETTINGS, NOW).artifacts[0]
    worn = CompiledArtifactStatus(phase=ArtifactPhase.ready, ready_at="2026-11-23T00:00:05Z", rebuilds=3)
    art = CompiledArtifact(metadata={"name": "a", "namespace": "ns"}, spec=art_body["spec"], status=worn)
    result = reconcile_artifact(
        art, None, [], ["m"], "uid", SETTINGS, NOW, ("2026-11-23T00:09:00Z", "ArtifactCorrupt: x")
    )
    assert result.status.phase == ArtifactPhase.failed and result.job is None
    assert "corrupt again after 3 rebuilds, check the cache volume" in result.status.message
