"""Storage cluster fixtures: real ZooKeeper, real node and controller processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.zookeeper import ZooKeeperServer
from storage.local import LocalCluster


def start_cluster(work_dir: Path, zk: str, **kwargs: object) -> LocalCluster:
    cluster = LocalCluster(work_dir, zk=zk, partitions=16, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start(timeout=60)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def shared_cluster(zk_server: ZooKeeperServer,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One 3-node RF=3 cluster shared by a module's tests that do not break it."""
    zk = f"{zk_server.address}/ringstore-test-{uuid.uuid4().hex}"
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"), zk)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(zk: str, tmp_path: Path) -> Iterator[LocalCluster]:
    """A 3-node RF=3 cluster of this test's own (for tests that stop or kill nodes)."""
    cluster = start_cluster(tmp_path / "cluster", zk)
    try:
        yield cluster
    finally:
        cluster.stop()
