"""A wiped data directory never votes until it has caught up and been promoted."""

from __future__ import annotations

import shutil

from scheduler.deadline import poll_for
from storage.client import Client
from storage.local import LocalCluster


def test_wiped_node_rejoins_as_learner_then_is_promoted(cluster: LocalCluster) -> None:
    with Client(cluster.endpoints, timeout=10) as client:
        for i in range(200):
            client.put(f"inc-{i}".encode(), b"v")
        cluster.stop_node("n3", grace=20)
        shutil.rmtree(cluster.node_processes["n3"].data_dir)
        cluster.start_node("n3")
        log = cluster.log_dir / "n3.stderr"
        poll_for(lambda: "joining as a learner" in log.read_text(), 30,
                 what="n3 to start as a learner")
        # It refuses every Promise until promoted, and says so.
        poll_for(lambda: "promoted: this data directory now votes" in log.read_text(), 60,
                 interval=0.2, what="the controller to promote n3 once caught up")
        cluster.wait_ready(60)
        for i in range(200):
            got = client.get(f"inc-{i}".encode())
            assert got is not None and got.value == b"v"
    controller_log = (cluster.log_dir / "controller-1.stderr").read_text()
    assert "promoted node=n3" in controller_log
