"""What a container runtime enforces on a container's process, for the node agent.

The agent runs each container on this host in its own mount namespace. Before the
command runs, the setup script written here:
- makes the host's Python installation readable by the container's user, as an image
  built from it would be (a home folder others cannot enter, such as /root at mode
  0700, is replaced in the namespace by a traversable tmpfs holding the same entries);
- bind-mounts the volumes;
- remounts every other filesystem read-only when `readOnlyRootFilesystem` is set
  (volumes, /dev, /dev/shm, /proc and /sys stay as they are);
- execs the command through `setpriv` as the effective runAsUser/runAsGroup, with
  fsGroup and supplementalGroups, capabilities dropped as the spec drops them and
  no_new_privs unless privilege escalation is allowed.
A pod whose `runAsNonRoot` cannot hold is refused, with the kubelet's message.
Seccomp profiles are not applied.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

from kiln.devcluster.volumes import Mount

# What Kiln's images set (Dockerfile): their user's home does not exist, nothing goes there.
IMAGE_ENV = {"LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
NONROOT_HOME = "/nonexistent"
# Kernel filesystems a container runtime mounts writable (or manages itself).
KERNEL_MOUNTS = ("/proc", "/sys", "/dev")


class Refused(ValueError):
    """The container cannot start as specified (the kubelet's CreateContainerConfigError)."""


@dataclass(frozen=True)
class Identity:
    """Who the container's process is and what it may do."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    read_only_root: bool
    no_new_privs: bool
    drop: tuple[str, ...]  # capability names in setpriv's spelling, or ("all",)

    @property
    def home(self) -> str:
        return "/root" if self.uid == 0 else NONROOT_HOME


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def identity(pod: client.V1Pod, container: client.V1Container) -> Identity:
    """The effective security context: the container's fields over the pod's, as the kubelet merges them.

    Unset user and group are the image's; the agent's images name none, so they are root's (0).
    """
    psc = pod.spec.security_context or client.V1PodSecurityContext()
    csc = container.security_context or client.V1SecurityContext()
    uid = int(_first(csc.run_as_user, psc.run_as_user, 0))
    gid = int(_first(csc.run_as_group, psc.run_as_group, 0))
    if _first(csc.run_as_non_root, psc.run_as_non_root) and uid == 0:
        raise Refused(
            f'container has runAsNonRoot and image will run as root (pod: "{pod.metadata.name}_'
            f'{pod.metadata.namespace}({pod.metadata.uid})", container: {container.name}): '
            "set runAsUser to a non-zero uid"
        )
    groups = [g for g in (psc.fs_group, *(psc.supplemental_groups or [])) if g is not None]
    caps = csc.capabilities.drop if csc.capabilities and csc.capabilities.drop else []
    drop = ("all",) if any(c.upper() == "ALL" for c in caps) else tuple(c.lower().removeprefix("cap_") for c in caps)
    return Identity(
        uid=uid,
        gid=gid,
        groups=tuple(dict.fromkeys(int(g) for g in groups)),
        read_only_root=bool(csc.read_only_root_filesystem),
        no_new_privs=csc.allow_privilege_escalation is False,
        drop=drop,
    )


def closed_ancestors(paths: list[Path]) -> list[Path]:
    """Folders above `paths` that others may not enter (e.g. /root at 0700), outermost first."""
    found: dict[Path, None] = {}
    for path in paths:
        for folder in reversed(path.resolve().parents):
            if folder != Path("/") and not os.stat(folder).st_mode & stat.S_IXOTH:
                found[folder] = None
                break  # the folders below it are reached through the replacement
    return list(found)


def python_paths() -> list[Path]:
    """Where the host's Python and its packages live: what the images carry."""
    return [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable)]


def open_folder_lines(folder: Path, stage: Path) -> list[str]:
    """Replace `folder` in the namespace by a traversable tmpfs that holds the same entries."""
    q, s = shlex.quote(str(folder)), shlex.quote(str(stage))
    lines = [f"mkdir -p {s}", f"mount --rbind {q} {s}", f"mount -t tmpfs -o mode=0755,size=1m tmpfs {q}"]
    for entry in sorted(os.listdir(folder)):
        src, dst = shlex.quote(str(stage / entry)), shlex.quote(str(folder / entry))
        if (folder / entry).is_symlink():
            lines.append(f"cp -P {src} {dst}")
            continue
        lines.append(f"mkdir {dst}" if (folder / entry).is_dir() else f"touch {dst}")
        lines.append(f"mount --rbind {src} {dst}")
    lines.append(f"umount -l {s}")
    return lines


def mount_lines(mounts: list[Mount]) -> list[str]:
    """Bind each volume at its mountPath; a mount that would hide another's source goes last."""

    def shadows(mount: Mount) -> bool:
        prefix = mount.path.rstrip("/") + "/"
        return any(str(m.host).startswith(prefix) for m in mounts if m is not mount)

    lines = []
    for m in sorted(mounts, key=lambda m: (shadows(m), m.path.count("/"))):
        path = shlex.quote(m.path)
        make = f"touch {path}" if m.host.is_file() else f"mkdir -p {path}"
        ro = "-o ro " if m.read_only else ""
        lines.append(f"{make} && mount --bind {ro}{shlex.quote(str(m.host))} {path}")
    return lines


def read_only_lines(mounts: list[Mount]) -> list[str]:
    """Remount every mount but the volumes and kernel filesystems read-only, in this namespace only."""
    keep = [*KERNEL_MOUNTS, *(m.path.rstrip("/") or "/" for m in mounts)]
    patterns = "|".join(f"{shlex.quote(p)}|{shlex.quote(p)}/*" for p in keep)
    return [
        "findmnt -rno TARGET | while read -r target; do",
        f'  case "$target" in {patterns}) continue ;; esac',
        '  mount -o remount,bind,ro "$target"',
        "done",
    ]


def setpriv(who: Identity) -> list[str]:
    argv = ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}"]
    argv.append(f"--groups={','.join(map(str, who.groups))}" if who.groups else "--clear-groups")
    if who.drop:
        caps = ",".join(f"-{c}" for c in who.drop)
        argv += [f"--inh-caps={caps}", f"--bounding-set={caps}"]
    if who.no_new_privs:
        argv.append("--no-new-privs")
    return [*argv, "--"]


def setup_script(who: Identity, mounts: list[Mount], stage: Path) -> str:
    """The sh script `unshare --mount` runs as root before it execs the container's command ("$@")."""
    lines = ["set -e"]
    if who.uid != 0:
        for i, folder in enumerate(closed_ancestors(python_paths())):
            lines += open_folder_lines(folder, stage / str(i))
    lines += mount_lines(mounts)
    if who.read_only_root:
        lines += read_only_lines(mounts)
    lines.append("unset PWD")  # the setup shell's, not the pod's
    lines.append(f'exec {shlex.join(setpriv(who))} "$@"')
    return "\n".join(lines) + "\n"
