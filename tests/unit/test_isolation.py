"""The node agent's container confinement, as pure logic: the merged security context and the setup script.

tests/devcluster runs the script for real (a pod's process as uid 65532 on a read-only root).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kiln.devcluster import isolation
from kiln.devcluster.volumes import Mount


def pod(psc: client.V1PodSecurityContext | None = None) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", namespace="ns", uid="u1"),
        spec=client.V1PodSpec(containers=[], security_context=psc),
    )


def container(csc: client.V1SecurityContext | None = None) -> client.V1Container:
    return client.V1Container(name="main", security_context=csc)


LOCKED = client.V1SecurityContext(
    read_only_root_filesystem=True,
    allow_privilege_escalation=False,
    capabilities=client.V1Capabilities(drop=["ALL"]),
)


def test_the_containers_fields_win_over_the_pods_and_groups_come_from_the_pod() -> None:
    psc = client.V1PodSecurityContext(
        run_as_user=1000, run_as_group=1000, fs_group=2000, supplemental_groups=[3000, 2000]
    )
    who = isolation.identity(pod(psc), container(client.V1SecurityContext(run_as_user=65532, run_as_group=65532)))
    assert (who.uid, who.gid, who.groups) == (65532, 65532, (2000, 3000))
    assert who.home == isolation.NONROOT_HOME
    assert not who.read_only_root and not who.no_new_privs and who.drop == ()


def test_an_unset_group_is_the_images_root_group_as_a_runtime_gives_it() -> None:
    who = isolation.identity(pod(client.V1PodSecurityContext(run_as_user=65532)), container())
    assert (who.uid, who.gid, who.groups) == (65532, 0, ())


def test_run_as_non_root_refuses_root_with_the_kubelets_words() -> None:
    with pytest.raises(isolation.Refused, match="container has runAsNonRoot and image will run as root"):
        isolation.identity(pod(client.V1PodSecurityContext(run_as_non_root=True)), container())
    with pytest.raises(isolation.Refused, match="set runAsUser"):
        isolation.identity(pod(), container(client.V1SecurityContext(run_as_non_root=True, run_as_user=0)))
    # The container may lift the pod's demand, or name a user that satisfies it.
    demands = pod(client.V1PodSecurityContext(run_as_non_root=True))
    assert isolation.identity(demands, container(client.V1SecurityContext(run_as_non_root=False))).uid == 0
    assert isolation.identity(demands, container(client.V1SecurityContext(run_as_user=7))).uid == 7


def test_dropped_capabilities_and_no_new_privs_reach_setpriv() -> None:
    who = isolation.identity(pod(client.V1PodSecurityContext(run_as_user=65532, run_as_group=65532)), container(LOCKED))
    argv = isolation.setpriv(who)
    assert argv == [
        "setpriv",
        "--reuid=65532",
        "--regid=65532",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    some = container(client.V1SecurityContext(capabilities=client.V1Capabilities(drop=["NET_RAW", "CAP_SYS_ADMIN"])))
    assert "--bounding-set=-net_raw,-sys_admin" in isolation.setpriv(isolation.identity(pod(), some))


def test_a_read_only_root_spares_the_volumes_and_kernel_filesystems_only() -> None:
    who = isolation.identity(pod(client.V1PodSecurityContext(run_as_user=65532)), container(LOCKED))
    mounts = [Mount(Path("/agent/v/tmp"), "/tmp", False), Mount(Path("/agent/v/cache"), "/cache dir", True)]
    script = isolation.setup_script(who, mounts, Path("/agent/stage"))
    assert "mount --bind /agent/v/tmp /tmp" in script
    assert "mount --bind -o ro /agent/v/cache '/cache dir'" in script
    assert "/proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/tmp|/tmp/*|'/cache dir'|'/cache dir'/*) continue" in script
    assert script.index("mount --bind -o ro") < script.index("remount,bind,ro")  # volumes first: binds inherit ro
    assert script.rstrip().endswith('--no-new-privs -- "$@"')


def test_a_root_container_on_a_writable_root_gets_no_remount_and_no_home_rewrite() -> None:
    script = isolation.setup_script(isolation.identity(pod(), container()), [], Path("/agent/stage"))
    assert "remount" not in script and "tmpfs" not in script
    assert isolation.identity(pod(), container()).home == "/root"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder everyone may enter (pytest's own tmp_path sits under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_folders_others_cannot_enter_are_found_outermost_first(open_dir: Path) -> None:
    tmp_path = open_dir
    closed = tmp_path / "home"
    (closed / "a" / "b").mkdir(parents=True)
    closed.chmod(0o700)
    (closed / "a").chmod(0o700)
    assert isolation.closed_ancestors([closed / "a" / "b" / "python"]) == [closed]
    open_ = tmp_path / "open"
    (open_ / "lib").mkdir(parents=True)
    assert isolation.closed_ancestors([open_ / "lib" / "python"]) == []
