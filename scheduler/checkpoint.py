"""The agent's on-disk checkpoint under ``<work-dir>/meta``: what a restarted agent recovers.

    meta/agent.json                           {"agent_id": ...}
    meta/resources.json                       checkpointed resources (reservations, volumes)
    meta/tasks/<framework_id>/<task_id>.json  one TaskRecord per task the agent holds
    volumes/<role>/<persistence_id>/          persistent volumes (VolumeDirs)

Invariants:
- every write is atomic: the new content goes to a temporary file in the same directory,
  is fsynced, and replaces the old file by rename; a reader (or a restarted agent) sees
  the old content or the new, never a torn file;
- a status update is in its task's record (`TaskRecord.updates`, oldest first) before the
  agent sends it, and leaves it only when acknowledged: updates survive a restart, in order;
- a task record is written before the task's process is spawned, and again with its pid
  and start time right after, so a restarted agent never launches a task twice;
- this module knows nothing of protobuf: tasks, frameworks, resources and updates are
  stored as the JSON dicts the agent gives it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from scheduler.master_records import TERMINAL_STATES

__all__ = ["Checkpoint", "TaskRecord", "VolumeDirs", "write_atomically"]

log = logging.getLogger(__name__)



def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class TaskRecord:
    """Everything the agent must remember about one task across its own restarts.

    `state` is the newest state the agent decided (a TaskState name); `updates` are the
    status updates not yet acknowledged, oldest first (each a dict with a hex "uuid").
    `pid`/`start_time` name the task's wrapper process once it was spawned; `launching`
    is true from just before the spawn until the pid is recorded. `kill_reason` and
    `kill_message` are set before the agent signals the task, so the terminal state is
    known even if the agent dies while the task dies.
    """

    framework_id: str
    task_id: str
    framework: dict[str, Any]
    task: dict[str, Any]
    state: str = "TASK_STAGING"
    pid: int | None = None
    start_time: int | None = None
    launching: bool = False
    kill_reason: str = ""
    kill_message: str = ""
    updates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _name(ident: str) -> str:
    """A file name for an id: ids are opaque strings, so escape '/' and friends, and the
    dots of '.' and '..' (which would name a directory, not a file)."""
    name = quote(ident, safe="-_.")
    return name.replace(".", "%2E") if name in (".", "..") else name or "%"


class Checkpoint:
    """The checkpoint files of one agent work dir; see the module docstring."""

    def __init__(self, meta_dir: Path) -> None:
        self.meta_dir = meta_dir
        self.tasks_dir = meta_dir / "tasks"

    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None

    def _write(self, path: Path, value: Any) -> None:
        write_atomically(path, json.dumps(value, sort_keys=True).encode())

    def agent_id(self) -> str:
        """The agent id the master gave, "" before the first registration."""
        data = self._read(self.meta_dir / "agent.json")
        return str(data["agent_id"]) if data else ""

    def save_agent_id(self, agent_id: str) -> None:
        self._write(self.meta_dir / "agent.json", {"agent_id": agent_id})

    def resources(self) -> list[dict[str, Any]] | None:
        """The checkpointed total resources, None if the master never sent any."""
        data = self._read(self.meta_dir / "resources.json")
        return list(data) if data is not None else None

    def save_resources(self, resources: list[dict[str, Any]]) -> None:
        self._write(self.meta_dir / "resources.json", resources)

    def task_path(self, framework_id: str, task_id: str) -> Path:
        return self.tasks_dir / _name(framework_id) / f"{_name(task_id)}.json"

    def tasks(self) -> list[TaskRecord]:
        """Every task record, in a stable order (framework id, task id)."""
        records: list[TaskRecord] = []
        if not self.tasks_dir.is_dir():
            return records
        for path in sorted(self.tasks_dir.glob("*/*.json")):
            try:
                records.append(TaskRecord.from_json(json.loads(path.read_text())))
            except (ValueError, TypeError) as exc:  # written atomically: should not happen
                log.error("unreadable task checkpoint path=%s error=%s", path, exc)
        return sorted(records, key=lambda r: (r.framework_id, r.task_id))

    def save_task(self, record: TaskRecord) -> None:
        self._write(self.task_path(record.framework_id, record.task_id), asdict(record))

    def remove_task(self, framework_id: str, task_id: str) -> None:
        path = self.task_path(framework_id, task_id)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass  # other tasks of the framework remain



class VolumeDirs:
    """The persistent volumes' directories: exactly those of the checkpointed resources.

    A volume directory is created when its volume is checkpointed and deleted (with its
    files) only when a checkpoint no longer holds it (DESTROY); tasks come and go.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, role: str, persistence_id: str) -> Path:
        return self.root / role / persistence_id

    def sync(self, wanted: set[tuple[str, str]]) -> None:
        paths = {self.path(role, pid) for role, pid in wanted}
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
        for path in self.root.glob("*/*") if self.root.is_dir() else ():
            if path not in paths:
                log.info("destroying volume path=%s", path)
                shutil.rmtree(path, ignore_errors=True)
