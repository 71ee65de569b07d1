"""Faults on a real control plane: operator, compile pods, serving pods and nodes die; nothing is lost.

Each test injects a fault a number of times (quick in CI, `KILN_LONG=1` for the long run),
asserts what must hold, and records a row for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from examples import models
from kiln.devcluster.cluster import LocalCluster
from kiln.manifest import Manifest, corrupt_files
from kiln.operator import naming
from tests.support.kube import Kube, Operator, trials
from tests.support.torchmodels import (
    cache_folder,
    compile_jobs,
    infer,
    job_pods,
    status,
    steady_model,
    torchmodel,
    wait_phase,
)

pytestmark = pytest.mark.cluster


def kill_group(pattern: str) -> int:
    """SIGKILL the process group of every process whose command line matches: a container killed."""
    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    groups = {os.getpgid(int(p)) for p in pids if int(p) != os.getpid()}
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    return len(groups)


def pods_of(kube: Kube, model: str) -> list[dict[str, Any]]:
    return (kube.get("pods", "-l", f"kiln.dev/model={model}") or {"items": []})["items"]


def is_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def ready_pods(kube: Kube, model: str) -> list[dict[str, Any]]:
    return [p for p in pods_of(kube, model) if is_ready(p) and not p["metadata"].get("deletionTimestamp")]


def artifacts(kube: Kube) -> list[dict[str, Any]]:
    return (kube.get("compiledartifacts") or {"items": []})["items"]


def answers_like_eager(kube: Kube, model: str, seed: int) -> None:
    inputs = models.examples("mlp", 2, seed=4)
    for pod in ready_pods(kube, model):
        got = infer(pod["status"]["podIP"], model, inputs)
        torch.testing.assert_close(got, models.eager("mlp", *inputs, seed=seed)[0], atol=1e-4, rtol=1e-3)


def test_operator_killed_at_random_points_compiles_each_key_once_and_readies_every_model(
    fkube: Kube, fault_operator: Operator, seeded_archive: Any, rng: random.Random, record: Any
) -> None:
    flows, keys = trials(8, 30), trials(3, 6)
    serving = set(range(keys))  # one serving replica per key; the rest run with replicas 0 (no process each)
    kills = 0
    stop = threading.Event()

    def chaos() -> None:
        nonlocal kills
        while not stop.wait(rng.uniform(0.5, 4.0)):
            fault_operator.kill()
            kills += 1
            time.sleep(rng.uniform(0.0, 1.5))
            fault_operator.start()

    monkey = threading.Thread(target=chaos)
    monkey.start()
    try:
        for i in range(flows):
            uri = f"file://{seeded_archive(i % keys)}"
            assert fkube.apply(torchmodel(f"m{i}", uri, replicas=1 if i in serving else 0)).returncode == 0
            time.sleep(rng.uniform(0.0, 1.0))
        fkube.wait_for(
            lambda: all(status(fkube, f"m{i}").get("phase") == "Ready" for i in range(flows)),
            900,
            every=2,
            message=f"all {flows} TorchModels Ready",
        )
    finally:
        stop.set()
        monkey.join()
        if fault_operator.proc is None or fault_operator.proc.poll() is not None:
            fault_operator.start()
    jobs = compile_jobs(fkube)
    pods_per_job = {j["metadata"]["name"]: len(job_pods(fkube, j["metadata"]["name"])) for j in jobs}
    assert len(jobs) == keys, f"{len(jobs)} compile Jobs for {keys} keys: {sorted(pods_per_job)}"
    assert set(pods_per_job.values()) == {1}, f"a compile ran twice: {pods_per_job}"
    arts = artifacts(fkube)
    assert len(arts) == keys and all(a["status"]["phase"] == "Ready" for a in arts)
    assert sorted(len(a["status"]["usedBy"]) for a in arts) == sorted(
        len([i for i in range(flows) if i % keys == k]) for k in range(keys)
    )
    for i in serving:
        answers_like_eager(fkube, f"m{i}", seed=i % keys)
    assert kills >= 3, f"only {kills} operator kills: the test injected too little"
    record(
        f"SIGKILL of the operator at random times (every 0.5-4 s) while {flows} TorchModels over {keys} keys "
        "are applied, compiled and rolled out",
        flows,
        "nothing: every model Ready, one compile Job with one pod per key",
        operator_kills=kills,
        compile_jobs=len(jobs),
    )


def compile_log(cluster: LocalCluster, kube: Kube, pod: str) -> str:
    logs = list((cluster.agent_root / "pods").glob(f"{kube.namespace}_{pod}_*/compile.log"))
    return logs[0].read_text(errors="replace") if logs else ""


# Progress lines of kiln-compile (see runtime/compile.py): the kill lands after one of them.
KILL_POINTS = ["fetched", "import torch ...", "read the exported-program", "AOTInductor compile", "validate in a child"]


def test_a_compile_pod_killed_mid_compile_is_retried_and_its_artifact_is_whole(
    fkube: Kube, fault_cluster: LocalCluster, seeded_archive: Any, rng: random.Random, record: Any
) -> None:
    n = trials(1, 5)
    points = [KILL_POINTS[t % len(KILL_POINTS)] if n > 1 else rng.choice(KILL_POINTS[2:]) for t in range(n)]
    for t, point in enumerate(points):
        name, seed = f"ck{t}", 100 + t
        fkube.apply(torchmodel(name, f"file://{seeded_archive(seed)}"))
        key = fkube.wait_for(
            lambda name=name: (status(fkube, name).get("targets") or [{}])[0].get("key"), 60, message="cache key"
        )
        job_name = naming.compile_job_name(key)
        pod = fkube.wait_for(lambda job_name=job_name: job_pods(fkube, job_name), 60, message="compile pod")[0]
        pod_name = pod["metadata"]["name"]
        fkube.wait_for(
            lambda pod_name=pod_name, point=point: point in compile_log(fault_cluster, fkube, pod_name),
            300,
            every=0.1,
            message=f"compile reaches {point!r}",
        )
        assert kill_group(f"kiln-compile.*--key={key}") >= 1
        wait_phase(fkube, name, "Ready", timeout=600)
        pods = job_pods(fkube, job_name)
        exits = sorted(
            (c.get("state", {}).get("terminated") or {}).get("exitCode")
            for p in pods
            for c in p["status"].get("containerStatuses", [])
        )
        assert exits == [0, 137], f"expected the killed pod (137) and one retry (0): {exits}"
        folder = cache_folder(fkube) / key
        manifest = Manifest.read(folder)
        assert manifest.key == key and not corrupt_files(folder, manifest.checked_files())
        answers_like_eager(fkube, name, seed)
        fkube.run("delete", "tm", name, "--wait=false")
    record(
        f"SIGKILL of a compile pod's processes after a random compile step ({', '.join(sorted(set(points)))})",
        n,
        "nothing: the Job's retry published a whole artifact (manifest + sha256 of every file checked)",
    )


def test_serving_pods_killed_under_load_fail_requests_only_while_no_replica_is_ready(
    fkube: Kube, seeded_archive: Any, rng: random.Random, record: Any
) -> None:
    rounds = trials(2, 10)
    outages: list[tuple[float, float]] = []
    with steady_model(fkube, "steady", seeded_archive(21), 21) as load:
        time.sleep(2)
        for r in range(rounds + 1):
            everyone = r == rounds  # the last round kills every replica: an outage that must be counted
            victims = ready_pods(fkube, "steady") if everyone else [rng.choice(ready_pods(fkube, "steady"))]
            killed_at = time.monotonic()
            for pod in victims:
                assert kill_group(f"kiln-serve.*--host={pod['status']['podIP']} ") == 1
            # The API shows a death a moment after it happens: wait to see it before waiting for the cure.
            left = 2 - len(victims)
            fkube.wait_for(
                lambda left=left: len(ready_pods(fkube, "steady")) <= left, 30, every=0.1, message="kill seen"
            )
            if everyone:  # the outage lasts from the kill until the API shows a replica Ready again
                fkube.wait_for(lambda: ready_pods(fkube, "steady"), 120, every=0.1, message="a replica back")
                outages.append((killed_at, time.monotonic()))
            fkube.wait_for(lambda: len(ready_pods(fkube, "steady")) == 2, 120, message="both replicas back")
            time.sleep(rng.uniform(0.5, 2.0))
    failures = load.failures
    outside = [f for f in failures if not any(start <= f.at <= end + 1.0 for start, end in outages)]
    assert len(load.outcomes) > 50
    assert not outside, f"{len(outside)} requests failed while a replica was ready: {outside[:3]}"
    outage_s = sum(end - start for start, end in outages)
    retried = sum(o.retried for o in load.outcomes)
    record(
        f"SIGKILL of one serving pod's process ({rounds} rounds), then of both, under 20 req/s",
        rounds + 1,
        f"{len(failures)} of {len(load.outcomes)} requests, all during the {outage_s:.1f} s with no replica ready",
        requests=len(load.outcomes),
        failed=len(failures),
        retried_on_connection_failure=retried,
        outage_seconds=round(outage_s, 1),
    )


def test_a_rolling_update_under_load_fails_no_request(
    fkube: Kube, seeded_archive: Any, rng: random.Random, record: Any
) -> None:
    updates = trials(1, 3)
    with steady_model(fkube, "roll", seeded_archive(31), 31) as load:
        for u in range(updates):
            seed = 32 + u
            load.accept(seed)  # either version is a correct answer while both serve
            patch = json.dumps({"spec": {"archive": {"uri": f"file://{seeded_archive(seed)}"}}})
            fkube.run("patch", "tm", "roll", "--type=merge", "-p", patch)
            fkube.wait_for(lambda: status(fkube, "roll").get("phase") != "Ready", 30, message="update seen")
            wait_phase(fkube, "roll", "Ready", timeout=600)
            fkube.wait_for(lambda: len(pods_of(fkube, "roll")) == 2, 120, message="old pods gone")
            load.accepted = load.accepted[-1:]  # once the old pods are gone, only the new weights
            time.sleep(rng.uniform(1.0, 3.0))
    failures = load.failures
    assert len(load.outcomes) > 100
    assert not failures, f"{len(failures)} of {len(load.outcomes)} requests failed: {failures[:3]}"
    record(
        "archive changed under 20 req/s: compile, surge rollout, SIGTERM drain of the old pods",
        updates,
        f"nothing: 0 of {len(load.outcomes)} requests failed",
        requests=len(load.outcomes),
        retried_on_connection_failure=sum(o.retried for o in load.outcomes),
    )


def test_a_node_that_stops_reporting_has_its_pods_replaced_on_another_node(
    fkube: Kube, fault_cluster: LocalCluster, seeded_archive: Any, record: Any
) -> None:
    fkube.apply(torchmodel("lost", f"file://{seeded_archive(41)}", replicas=1))
    wait_phase(fkube, "lost", "Ready")
    first = ready_pods(fkube, "lost")[0]
    node = first["spec"]["nodeName"]
    stopped_at = time.monotonic()
    fault_cluster.stop_node(node)
    try:
        seen_down = fkube.wait_for(
            lambda: status(fkube, "lost").get("readyReplicas") == 0 and status(fkube, "lost")["phase"] != "Ready",
            120,
            every=0.5,
            message="status shows the lost replica",
        )
        replaced = fkube.wait_for(
            lambda: [p for p in ready_pods(fkube, "lost") if p["spec"]["nodeName"] != node],
            180,
            every=0.5,
            message="a replica Ready on another node",
        )
        replaced_s = time.monotonic() - stopped_at
        wait_phase(fkube, "lost", "Ready")
        answers_like_eager(fkube, "lost", 41)
        node_obj = fkube.get("node", node)
        taints = {t["key"] for t in node_obj["spec"].get("taints", [])}
        assert "node.kubernetes.io/unreachable" in taints
        old = fkube.get("pod", first["metadata"]["name"])
        assert old is None or old["metadata"].get("deletionTimestamp"), "the lost pod was not evicted"
    finally:
        fault_cluster.stop_node(node, stopped=False)
    assert seen_down
    record(
        f"node {node} stops reporting (node agent heartbeat and its pods stop)",
        1,
        "nothing: the replica was evicted by the unreachable taint and replaced on the other node",
        seconds_to_ready_elsewhere=round(replaced_s, 1),
        node_monitor_grace_seconds=fault_cluster.node_monitor_grace_seconds,
        node_lost_seconds=5,
        replacement_node=replaced[0]["spec"]["nodeName"],
    )


def flip_bit(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return at


def test_a_corrupted_artifact_is_refused_by_pods_and_compiled_again(
    fkube: Kube, seeded_archive: Any, rng: random.Random, record: Any
) -> None:
    fkube.apply(torchmodel("rot", f"file://{seeded_archive(51)}", replicas=1))
    st = wait_phase(fkube, "rot", "Ready")
    key = st["targets"][0]["key"]
    folder = cache_folder(fkube) / key
    manifest = Manifest.read(folder)
    offset = flip_bit(folder / str(manifest.runner_so), rng)
    pod = ready_pods(fkube, "rot")[0]
    fkube.run("delete", "pod", pod["metadata"]["name"], "--wait=false")  # the next replica loads the rotten copy
    refused = fkube.wait_for(
        lambda: next(
            (
                c["lastState"]["terminated"]["message"]
                for p in pods_of(fkube, "rot")
                for c in p["status"].get("containerStatuses", [])
                if "ArtifactCorrupt" in ((c.get("lastState") or {}).get("terminated") or {}).get("message", "")
            ),
            None,
        ),
        120,
        every=0.5,
        message="a pod refuses the corrupt artifact",
    )
    rebuilt = fkube.wait_for(
        lambda: [j for j in compile_jobs(fkube) if j["metadata"]["name"] == naming.compile_job_name(key, 1)],
        60,
        message="the rebuild Job",
    )
    wait_phase(fkube, "rot", "Ready", timeout=600)
    art = artifacts(fkube)[0]
    assert art["status"]["rebuilds"] == 1 and art["status"]["phase"] == "Ready"
    assert len(compile_jobs(fkube)) == 2 and len(job_pods(fkube, rebuilt[0]["metadata"]["name"])) == 1
    fresh = Manifest.read(folder)
    assert not corrupt_files(folder, fresh.checked_files())
    answers_like_eager(fkube, "rot", 51)
    record(
        f"one bit flipped in the cached AOTInductor library (byte {offset}), then a replica restarted",
        1,
        "nothing: the pod refused it (sha256), the operator compiled the key again, the model is Ready",
        pod_said=refused.split(":")[0],
    )
