"""The Agent gRPC service: an agent's sandboxes, read by the operator (`scheduler logs`).

Only reads: `<root>/<framework_id>/<task_id>/{stdout,stderr}`. Invariants:
- only those two names are served, and only for a task id that can name a directory, so
  a request cannot reach outside the sandboxes;
- a task id run by several frameworks (or run again) is answered with its newest output;
- one reply carries at most READ_LIMIT bytes from `offset`, and the file's size now, so a
  reader can follow a growing file.
"""

from __future__ import annotations

import os
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import grpc

from scheduler.offers import valid_id
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc

__all__ = ["READ_LIMIT", "AgentService"]

READ_LIMIT = 1024 * 1024


class AgentService(pb_grpc.AgentServicer):
    """Serves the sandboxes under `root` (the agent's `<work-dir>/sandboxes`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def ReadFile(self, request: pb.ReadFileRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.ReadFileResponse:
        if request.name not in ("stdout", "stderr"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"name must be stdout or stderr, not {request.name!r}")
        candidates = [p / request.name
                      for p in self.root.glob(f"*/{glob_escape(request.task_id)}")
                      if valid_id(request.task_id) and (p / request.name).is_file()]
        if not candidates:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no sandbox for task {request.task_id!r} on this agent")
        path = max(candidates, key=lambda p: p.stat().st_mtime)
        length = min(request.length or READ_LIMIT, READ_LIMIT)
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(request.offset)
            data = f.read(length)
        return pb.ReadFileResponse(data=data, size=size)
