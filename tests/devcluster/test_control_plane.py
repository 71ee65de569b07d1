"""The local control plane is real Kubernetes: Jobs, Deployments, GC, CRD validation, scheduling."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.kube import GPU_PRODUCT, Kube

pytestmark = pytest.mark.cluster


def pod_of(kube: Kube, selector: str) -> dict[str, Any] | None:
    pods = kube.get("pods", "-l", selector)
    return pods["items"][0] if pods and pods["items"] else None


def terminated(kube: Kube, selector: str) -> dict[str, Any] | None:
    pod = pod_of(kube, selector)
    if not pod:
        return None
    for status in pod["status"].get("containerStatuses", []):
        if "terminated" in status["state"]:
            return status["state"]["terminated"]
    return None


def test_job_runs_to_completion_and_its_exit_code_shows(kube: Kube) -> None:
    kube.apply("""
apiVersion: batch/v1
kind: Job
metadata: {name: ok}
spec:
  template:
    metadata: {labels: {app: ok}}
    spec:
      restartPolicy: Never
      containers: [{name: main, image: busybox, command: [sh, -c, "echo done"]}]
""")
    kube.wait_for(lambda: (kube.get("job", "ok") or {}).get("status", {}).get("succeeded") == 1, 60, message="job")
    state = terminated(kube, "app=ok")
    assert state is not None and state["exitCode"] == 0 and state["reason"] == "Completed"


def test_failed_pod_shows_its_termination_message(kube: Kube) -> None:
    kube.apply("""
apiVersion: v1
kind: Pod
metadata: {name: fails, labels: {app: fails}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "echo 'archive digest mismatch' > /dev/termination-log; exit 1"]
""")
    state = kube.wait_for(lambda: terminated(kube, "app=fails"), 30, message="termination")
    assert state["exitCode"] == 1
    assert state["message"] == "archive digest mismatch"
    assert kube.get("pod", "fails")["status"]["phase"] == "Failed"


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: python
        command: [python3, -m, http.server, "8000", --bind, "$(POD_IP)"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{containerPort: 8000, name: http}]
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
"""


def test_deployment_scales_to_three_ready_pods_and_gc_removes_children(kube: Kube) -> None:
    kube.apply(DEPLOYMENT)
    kube.wait_for(
        lambda: (kube.get("deployment", "web") or {}).get("status", {}).get("readyReplicas") == 3,
        60,
        message="3 ready replicas",
    )
    replicasets = kube.get("replicasets", "-l", "app=web")["items"]
    assert len(replicasets) == 1
    assert replicasets[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    ips = {p["status"]["podIP"] for p in kube.get("pods", "-l", "app=web")["items"]}
    assert len(ips) == 3  # each pod has its own address

    kube.run("delete", "deployment", "web", "--cascade=background")
    kube.wait_for(
        lambda: (
            not kube.get("replicasets", "-l", "app=web")["items"] and not kube.get("pods", "-l", "app=web")["items"]
        ),
        60,
        message="garbage collection",
    )


def test_crd_schema_rejects_an_invalid_object_with_the_api_servers_message(kube: Kube) -> None:
    kube.cluster.kubectl(
        "apply",
        "-f",
        "-",
        input="""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.test.kiln.dev}
spec:
  group: test.kiln.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
""",
    )
    kube.wait_for(lambda: kube.run("get", "widgets", check=False).returncode == 0, 30, message="CRD served")
    bad = kube.apply("apiVersion: test.kiln.dev/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: 50}\n")
    assert bad.returncode != 0
    assert "spec.size" in bad.stderr and "should be less than or equal to 10" in bad.stderr
    good = kube.apply("apiVersion: test.kiln.dev/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: 5}\n")
    assert good.returncode == 0, good.stderr


def test_pod_with_gpu_node_selector_lands_only_on_the_gpu_node(kube: Kube) -> None:
    pods = "".join(
        f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: gpu-{i}, labels: {{app: gpu}}}}
spec:
  restartPolicy: Never
  nodeSelector: {{nvidia.com/gpu.product: {GPU_PRODUCT}}}
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "true"]
"""
        for i in range(3)
    )
    assert kube.apply(pods).returncode == 0
    placed = kube.wait_for(
        lambda: [
            p["spec"].get("nodeName") for p in kube.get("pods", "-l", "app=gpu")["items"] if p["spec"].get("nodeName")
        ],
        30,
        message="scheduling",
    )
    kube.wait_for(
        lambda: len([p for p in kube.get("pods", "-l", "app=gpu")["items"] if p["spec"].get("nodeName")]) == 3,
        30,
        message="all scheduled",
    )
    placed = [p["spec"]["nodeName"] for p in kube.get("pods", "-l", "app=gpu")["items"]]
    assert placed == ["gpu-0"] * 3


def test_pod_asking_for_a_gpu_no_node_has_stays_unschedulable(kube: Kube) -> None:
    kube.apply("""
apiVersion: v1
kind: Pod
metadata: {name: nowhere}
spec:
  nodeSelector: {nvidia.com/gpu.product: NVIDIA-B200}
  containers: [{name: main, image: busybox, command: [sleep, "60"]}]
""")

    def unschedulable() -> bool:
        conds = (kube.get("pod", "nowhere") or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    kube.wait_for(unschedulable, 30, message="Unschedulable condition")


def test_claim_is_shared_between_pods_and_read_only_mounts_refuse_writes(kube: Kube) -> None:
    kube.apply("""
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {accessModes: [ReadWriteMany], resources: {requests: {storage: 1Gi}}}
---
apiVersion: v1
kind: Pod
metadata: {name: writer, labels: {app: writer}}
spec:
  restartPolicy: Never
  volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "echo hello > /data/file"]
    volumeMounts: [{name: data, mountPath: /data}]
""")
    state = kube.wait_for(lambda: terminated(kube, "app=writer"), 60, message="writer")
    assert state["exitCode"] == 0
    kube.apply("""
apiVersion: v1
kind: Pod
metadata: {name: reader, labels: {app: reader}}
spec:
  restartPolicy: Never
  volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
  containers:
  - name: main
    image: busybox
    command: [sh, -c, "cat /data/file > /dev/termination-log; echo x > /data/other"]
    volumeMounts: [{name: data, mountPath: /data, readOnly: true}]
""")
    state = kube.wait_for(lambda: terminated(kube, "app=reader"), 30, message="reader")
    assert state["message"].strip() == "hello"
    assert state["exitCode"] != 0  # the write to the read-only mount failed


CONFINED = """
apiVersion: v1
kind: Pod
metadata: {name: confined, labels: {app: confined}}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532, fsGroup: 65533}
  volumes: [{name: scratch, emptyDir: {}}]
  containers:
  - name: main
    image: python
    command: [python3, -c, "$(PROBE)"]
    env: [{name: PROBE, value: %s}]
    volumeMounts: [{name: scratch, mountPath: /scratch}]
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
"""

# Runs in the pod: who it is, what it may write, what it sees; the answer goes to the termination log.
PROBE = """
import json, os
def writes(path):
    try:
        open(path, 'w').close()
        return True
    except OSError:
        return False
status = dict(line.split(':', 1) for line in open('/proc/self/status'))
answer = {
    'uid': os.getuid(), 'gid': os.getgid(), 'groups': sorted(os.getgroups()), 'env': sorted(os.environ),
    'home': os.environ.get('HOME'), 'root': writes('/confined-probe'), 'scratch': writes('/scratch/f'),
    'var_tmp': writes('/var/tmp/confined-probe'), 'caps': status['CapEff'].strip(),
    'bounding': status['CapBnd'].strip(), 'no_new_privs': status['NoNewPrivs'].strip(),
    'python_readable': os.access(os.__file__, os.R_OK),
}
open('/dev/termination-log', 'w').write(json.dumps(answer))
"""


def test_a_pod_runs_as_its_user_on_a_read_only_root_with_only_its_environment(kube: Kube) -> None:
    kube.apply(CONFINED % json.dumps(PROBE))
    state = kube.wait_for(lambda: terminated(kube, "app=confined"), 60, message="confined pod")
    assert state["exitCode"] == 0, state
    got = json.loads(state["message"])
    assert (got["uid"], got["gid"], got["groups"]) == (65532, 65532, [65533])
    assert got["home"] == "/nonexistent"  # what the image sets for its user; nothing can be written there
    assert got["root"] is False and got["var_tmp"] is False  # the root filesystem is read-only...
    assert got["scratch"] is True  # ...and volumes are not
    assert got["caps"] == got["bounding"] == "0000000000000000"
    assert got["no_new_privs"] == "1"
    assert got["python_readable"] is True  # the image's Python, although /root is 0700 on this host
    image = {"PATH", "HOME", "HOSTNAME", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "LD_PRELOAD"}
    service = {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
    assert set(got["env"]) - image - service == {"PROBE"}  # nothing of the agent's own environment


def test_run_as_non_root_without_a_user_is_refused_as_the_kubelet_refuses_it(kube: Kube) -> None:
    kube.apply("""
apiVersion: v1
kind: Pod
metadata: {name: rootful, labels: {app: rootful}}
spec:
  securityContext: {runAsNonRoot: true}
  containers: [{name: main, image: busybox, command: [sh, -c, "sleep 60"]}]
""")

    def refused() -> dict[str, Any] | None:
        pod = pod_of(kube, "app=rootful")
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
        waiting = statuses[0].get("state", {}).get("waiting", {})
        return waiting if waiting.get("reason") == "CreateContainerConfigError" else None

    waiting = kube.wait_for(refused, 30, message="CreateContainerConfigError")
    assert "container has runAsNonRoot and image will run as root" in waiting["message"]
    assert "set runAsUser" in waiting["message"]
