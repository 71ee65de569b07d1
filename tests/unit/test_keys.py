"""Cache keys: stable across processes, different whenever an input differs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kiln.api import CompileSpec, DynamicBatch, InductorMode
from kiln.keys import cache_key

BASE = dict(archive_digest="a" * 64, compile_spec=CompileSpec(), target="cpu", runtime_image="kiln-runtime:1")


def test_key_is_the_same_in_another_process() -> None:
    code = (
        "from kiln.api import CompileSpec; from kiln.keys import cache_key; "
        "print(cache_key('a'*64, CompileSpec(), 'cpu', 'kiln-runtime:1'))"
    )
    other = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == cache_key(**BASE)  # type: ignore[arg-type]


def test_key_ignores_option_order() -> None:
    one = CompileSpec(options={"freezing": "true", "max_autotune": "false"})
    two = CompileSpec(options={"max_autotune": "false", "freezing": "true"})
    assert cache_key("a" * 64, one, "cpu", "i") == cache_key("a" * 64, two, "cpu", "i")


@pytest.mark.parametrize(
    "change",
    [
        {"archive_digest": "b" * 64},
        {"compile_spec": CompileSpec(inductor_mode=InductorMode.max_autotune)},
        {"compile_spec": CompileSpec(dynamic_batch=DynamicBatch(min=1, max=64))},
        {"compile_spec": CompileSpec(options={"freezing": "true"})},
        {"target": "NVIDIA-H100-80GB-HBM3"},
        {"runtime_image": "kiln-runtime:2"},
    ],
)
def test_key_changes_when_any_input_changes(change: dict[str, object]) -> None:
    assert cache_key(**{**BASE, **change}) != cache_key(**BASE)  # type: ignore[arg-type]


def test_unknown_compile_options_are_refused_with_the_allowed_list() -> None:
    with pytest.raises(ValueError, match=r"unknown compile option.*allowed"):
        CompileSpec(options={"not_an_inductor_option": "1"})
