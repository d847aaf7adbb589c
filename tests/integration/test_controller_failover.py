"""Controller failover mid-failover, and the controller's failure detector.

The active controller is SIGKILLed in the middle of a partition failover: its leader was
SIGKILLed, a majority has promised the new epoch, and the new leader is not written yet.
The standby must finish: a leader at a higher epoch than the one reserved, writes succeed,
and no acknowledged write is lost. The kill point is deterministic: the controllers run
with the failpoint `RINGSTORE_FAILPOINT_HOLD_LEADER_WRITE=<seconds>`, so the active one
logs `failpoint: holding` and waits there (storage/controller.py).

The detector's rules are unit-tested in tests/unit/test_failure_detector.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.deadline import poll_for
from storage.chaos import key_in_partition, put_succeeds
from storage.client import Client
from storage.controller import HOLD_FAILPOINT
from storage.errors import StorageError
from storage.local import LocalCluster

PARTITIONS = 16
HOLD_S = 600  # longer than the test: the held controller never gets past the failpoint


@pytest.fixture
def held_cluster(zk: str, tmp_path: Path) -> Iterator[LocalCluster]:
    """3 nodes, RF=3, two controllers, both armed to hold a failover before its end."""
    cluster = LocalCluster(tmp_path / "cluster", zk=zk, partitions=PARTITIONS, controllers=2,
                           controller_env={HOLD_FAILPOINT: str(HOLD_S)})
    try:
        cluster.start(timeout=60)
        yield cluster
    finally:
        cluster.stop()


class Writer:
    """Writes fresh keys over every partition, one at a time, and records the acknowledged."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self.acked: dict[bytes, bytes] = {}
        self.attempts = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="writer")

    def _run(self) -> None:
        with Client(self.endpoints, timeout=2) as client:
            while not self.stop.is_set() and self.attempts < 100_000:
                key = f"acked-{self.attempts}".encode()
                value = f"v{self.attempts}".encode()
                self.attempts += 1
                try:
                    client.put(key, value)
                except StorageError:
                    continue
                self.acked[key] = value

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_standby_controller_finishes_a_failover_begun_by_a_dead_one(
        held_cluster: LocalCluster) -> None:
    cluster = held_cluster
    p = cluster.partition_led_as_planned()  # no rebalancing moves it before the kill
    key = key_in_partition(p, PARTITIONS, "mid-failover-").encode()
    with Client(cluster.endpoints, timeout=10) as client, Writer(cluster.endpoints) as writer:
        client.put(key, b"before")
        poll_for(lambda: len(writer.acked) >= 50, 30, what="the writer to get going")
        old = cluster.leader_of(p)
        active = cluster.active_controller()
        assert old is not None and active is not None
        active_log = cluster.log_dir / f"controller-{active + 1}.stderr"
        standby = 1 - active
        standby_log = cluster.log_dir / f"controller-{standby + 1}.stderr"

        cluster.kill_node(old.node_id)
        holding = f"failpoint: holding before writing the leader partition={p} "
        poll_for(lambda: holding in active_log.read_text(), 20,
                 what=f"controller-{active + 1} to reach the failpoint for partition {p}")
        # Mid-failover: epoch reserved (no leader), a majority promised it, nothing written.
        reserved = cluster.assignment(p)
        assert reserved is not None and reserved["leader"] is None, reserved
        assert reserved["epoch"] > old.epoch, (reserved, old)
        cluster.kill_controller(active)
        acked_at_kill = len(writer.acked)

        def finished() -> bool:
            record = cluster.assignment(p)
            return record is not None and record["leader"] is not None

        poll_for(finished, 30, interval=0.1,
                 what=f"controller-{standby + 1} to finish partition {p}'s failover")
        record = cluster.assignment(p)
        assert record is not None
        assert record["epoch"] > reserved["epoch"], (record, reserved)
        assert record["leader"] != old.node_id, record
        chosen = f"leader chosen partition={p} epoch={record['epoch']} "
        poll_for(lambda: chosen in standby_log.read_text(), 10,  # logged after the write
                 what=f"controller-{standby + 1} to log that it chose the leader")
        assert "failpoint: holding" not in standby_log.read_text()

        poll_for(lambda: put_succeeds(client, key, b"after", timeout=2), 30, interval=0.1,
                 what=f"a put to partition {p}")
        now = cluster.leader_of(p)  # the nodes serve that map (or a newer one: the
        assert now is not None and now.epoch >= record["epoch"], (now, record)  # rebalancer)
        poll_for(lambda: len(writer.acked) >= acked_at_kill + 50, 30,
                 what="the writer to make progress under the new controller")
    assert writer.acked, "the writer acknowledged nothing"
    lost = []
    with Client(cluster.endpoints, timeout=10) as client:
        got = client.get(key)
        assert got is not None and got.value == b"after", got
        for acked_key, value in writer.acked.items():
            item = client.get(acked_key)
            if item is None or item.value != value:
                lost.append((acked_key, value, item))
    assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
    print(f"{len(writer.acked)} of {writer.attempts} writes acknowledged, none lost; "
          f"partition {p}: epoch {old.epoch} -> reserved {reserved['epoch']} "
          f"-> {record['epoch']}")
    cluster.start_node(old.node_id)
    cluster.restart_controller(active)
    cluster.wait_ready(60)
