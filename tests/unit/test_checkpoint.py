"""scheduler.checkpoint: the agent's on-disk checkpoint (atomic JSON files under meta/)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.checkpoint import Checkpoint, TaskRecord, VolumeDirs, write_atomically


def test_empty_checkpoint(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "meta")
    assert cp.agent_id() == ""
    assert cp.resources() is None
    assert cp.tasks() == []


def test_agent_id_and_resources_round_trip(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "meta")
    cp.save_agent_id("agent-1")
    cp.save_resources([{"name": "disk", "scalar": 100.0, "role": "db"}])
    again = Checkpoint(tmp_path / "meta")
    assert again.agent_id() == "agent-1"
    assert again.resources() == [{"name": "disk", "scalar": 100.0, "role": "db"}]
    cp.save_resources([])
    assert again.resources() == []


def test_task_records_round_trip_with_updates_in_order(tmp_path: Path) -> None:
    cp = Checkpoint(tmp_path / "meta")
    record = TaskRecord("fw/1", "task 1", {"name": "fw"}, {"taskId": "task 1"})
    record.updates = [{"uuid": "aa", "state": "TASK_STARTING"},
                      {"uuid": "bb", "state": "TASK_RUNNING"}]
    record.pid, record.start_time, record.state = 123, 456, "TASK_RUNNING"
    cp.save_task(record)
    cp.save_task(TaskRecord("fw/1", "task 2", {}, {}, state="TASK_FINISHED"))
    (loaded, finished) = cp.tasks()
    assert loaded == record
    assert [u["uuid"] for u in loaded.updates] == ["aa", "bb"]
    assert not loaded.terminal and finished.terminal
    cp.remove_task("fw/1", "task 1")
    cp.remove_task("fw/1", "task 2")
    cp.remove_task("fw/1", "never there")
    assert cp.tasks() == []


def test_unknown_fields_are_ignored(tmp_path: Path) -> None:
    record = TaskRecord.from_json({"framework_id": "f", "task_id": "t", "framework": {},
                                   "task": {}, "added_later": 1})
    assert record.task_id == "t"


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "d" / "x.json"
    write_atomically(path, b"one")
    write_atomically(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


@settings(max_examples=30, deadline=None)
@given(ids=st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8)),
                    unique=True, max_size=5))
def test_any_ids_map_to_distinct_files(ids: list[tuple[str, str]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cp = Checkpoint(Path(d) / "meta")
        for framework_id, task_id in ids:
            cp.save_task(TaskRecord(framework_id, task_id, {}, {}))
        assert sorted((r.framework_id, r.task_id) for r in cp.tasks()) == sorted(ids)


def test_volume_dirs_follow_the_checkpointed_volumes(tmp_path: Path) -> None:
    volumes = VolumeDirs(tmp_path / "volumes")
    volumes.sync({("db", "v1"), ("db", "v2")})
    (volumes.path("db", "v1") / "data").write_text("kept")
    volumes.sync({("db", "v1")})  # v2 destroyed
    assert (volumes.path("db", "v1") / "data").read_text() == "kept"
    assert not volumes.path("db", "v2").exists()
    volumes.sync(set())
    assert not volumes.path("db", "v1").exists()
