"""The repo's layout: its root on sys.path never shadows the standard library (operator/ has no __init__.py)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def interpreters() -> dict[str, str]:
    """Each Python 3.11-3.13 found here (PATH, pyenv), by version; always the one running the tests."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [sys.executable, *(shutil.which(f"python3.{m}") or "" for m in (11, 12, 13))]
    candidates += sorted(glob.glob(f"{pyenv}/versions/3.1[123].*/bin/python3"))
    found: dict[str, str] = {}
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True)
        version = probe.stdout.decode().strip()
        if probe.returncode == 0 and version in ("3.11", "3.12", "3.13"):
            found.setdefault(version, exe)
    return found


def test_the_repo_root_on_sys_path_does_not_shadow_the_standard_library() -> None:
    found = interpreters()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in found
    for version, exe in found.items():
        # `-c` puts the working folder first on sys.path, as `python -m pytest` from the root does
        proc = subprocess.run(
            [exe, "-c", "import operator, collections, functools; print(operator.eq.__module__)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "_operator", (version, proc.stderr)
    assert not (ROOT / "operator" / "__init__.py").exists()
