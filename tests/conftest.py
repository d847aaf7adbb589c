"""Shared fixtures: one real ZooKeeper per test session, a fresh chroot per test.

Invariants:
- no test runs against a mock ZooKeeper; if ZooKeeper is not installed, every test that
  needs it fails (never skips) with the one-line message saying what to install;
- each test gets its own chroot, so tests cannot see each other's nodes;
- tests under tests/unit, tests/integration and tests/chaos get the `unit`,
  `integration` and `chaos` markers from their directory (chaos is opt-in: -m chaos).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.zookeeper import (
    ZooKeeperInstall,
    ZooKeeperNotInstalled,
    ZooKeeperServer,
    find_installation,
)

log = logging.getLogger(__name__)

TESTS_DIR = Path(__file__).resolve().parent
MARKER_BY_DIRECTORY = {"unit": "unit", "integration": "integration", "chaos": "chaos"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            top = Path(item.path).resolve().relative_to(TESTS_DIR).parts[0]
        except (ValueError, IndexError):
            continue
        marker = MARKER_BY_DIRECTORY.get(top)
        if marker is not None:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def zk_install() -> ZooKeeperInstall:
    """The installed ZooKeeper; a test that needs it fails (never skips) when it is missing."""
    try:
        return find_installation()
    except ZooKeeperNotInstalled as e:
        problem = str(e)
    pytest.fail(problem, pytrace=False)  # outside the except: one line, no chained traceback


@pytest.fixture(scope="session")
def zk_server(
    tmp_path_factory: pytest.TempPathFactory, zk_install: ZooKeeperInstall
) -> Iterator[ZooKeeperServer]:
    """The session's ZooKeeper server, on 127.0.0.1 and a free port."""
    server = ZooKeeperServer(tmp_path_factory.mktemp("zookeeper"), install=zk_install)
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def zk(zk_server: ZooKeeperServer) -> str:
    """A connect string with a chroot of this test's own: "127.0.0.1:PORT/ringstore-test-…".

    The chroot node is not created here. A server that a previous (chaos) test killed is
    started again on the same port, one it froze with SIGSTOP is thawed.
    """
    if zk_server.alive():
        zk_server.process.cont()  # harmless when it was not stopped
    else:
        log.warning("zookeeper was down at test start; restarting it")
        zk_server.start(timeout=60)
    return f"{zk_server.address}/ringstore-test-{uuid.uuid4().hex}"
