"""Fixtures for operator tests: the operator running as a local process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kiln.devcluster.cluster import LocalCluster
from tests.support.kube import Operator


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, crds: None) -> Iterator[Operator]:
    op = Operator(cluster)
    op.start()
    yield op
    op.stop()
