"""scheduler.zookeeper: a real ZooKeeper server starts, answers, restarts and stops by pid."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.process import pid_alive
from scheduler.zookeeper import (
    INSTALL_HINT,
    ZooKeeperInstall,
    ZooKeeperNotInstalled,
    ZooKeeperServer,
    ZooKeeperStartError,
    find_installation,
    four_letter_word,
)


def test_server_starts_answers_and_stops(tmp_path: Path, zk_install: ZooKeeperInstall) -> None:
    server = ZooKeeperServer(tmp_path, install=zk_install)
    with server:
        assert server.address.startswith("127.0.0.1:")
        assert four_letter_word(server.address, "ruok") == "imok"
        assert "Mode: standalone" in four_letter_word(server.address, "srvr")
        conf = four_letter_word(server.address, "conf")
        assert "tickTime=500" in conf
        assert "minSessionTimeout=1000" in conf
        pid = server.pid
        assert pid_alive(pid)
    assert not pid_alive(pid)
    assert not server.alive()
    server.stop()  # idempotent
    with pytest.raises(OSError):
        four_letter_word(server.address, "ruok", timeout=1)
    # Everything it wrote is in its own directory; its log is a file, not the console.
    assert (tmp_path / "zoo.cfg").is_file()
    assert "binding to port" in (tmp_path / "zookeeper.log").read_text()
    assert (tmp_path / "zookeeper.stdout").read_text() == ""


def test_restart_keeps_the_address(tmp_path: Path, zk_install: ZooKeeperInstall) -> None:
    with ZooKeeperServer(tmp_path, install=zk_install) as server:
        address, first = server.address, server.pid
        server.process.kill()
        assert not pid_alive(first)
        server.start()
        assert server.address == address
        assert server.pid != first
        assert four_letter_word(server.address, "ruok") == "imok"
    assert not pid_alive(server.pid)


def test_port_in_use_is_refused(
    tmp_path: Path, zk_install: ZooKeeperInstall, zk_server: ZooKeeperServer
) -> None:
    other = ZooKeeperServer(tmp_path, install=zk_install, port=zk_server.port)
    with pytest.raises(ZooKeeperStartError, match="in use"):
        other.start()
    assert not other.alive()


def test_find_installation_honours_zookeeper_home(
    tmp_path: Path, zk_install: ZooKeeperInstall
) -> None:
    environ = {"ZOOKEEPER_HOME": str(tmp_path), "PATH": str(zk_install.java.parent)}
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "slf4j-api-1.7.30.jar").touch()
    with pytest.raises(ZooKeeperNotInstalled, match="ZOOKEEPER_HOME"):
        find_installation(environ)
    (tmp_path / "zookeeper-3.8.4.jar").touch()
    found = find_installation(environ)
    assert found.classpath == (
        tmp_path / "lib" / "slf4j-api-1.7.30.jar",
        tmp_path / "zookeeper-3.8.4.jar",
    )


def test_zk_fixture_gives_a_chroot_per_test(zk: str, zk_server: ZooKeeperServer) -> None:
    address, _, chroot = zk.partition("/")
    assert address == zk_server.address
    assert chroot.startswith("ringstore-test-")


def test_not_installed_messages_are_one_line_saying_what_to_do(tmp_path: Path) -> None:
    assert "\n" not in INSTALL_HINT
    assert "apt-get install zookeeper" in INSTALL_HINT and "ZOOKEEPER_HOME" in INSTALL_HINT
    with pytest.raises(ZooKeeperNotInstalled, match="apt-get install") as raised:
        find_installation({"PATH": str(tmp_path)})  # no java on this PATH (nor ZooKeeper?)
    assert "\n" not in str(raised.value)
