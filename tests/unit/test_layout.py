"""The house rules about layout, checked by reading the source (no imports are executed).

- `scheduler` never imports `storage` (DESIGN §3);
- the pure modules, and every project module they pull in, import no I/O library;
- one owner per external system: subprocess, kazoo, rocksdict, and generated ``*_pb2``
  modules are imported only where the allow-lists below say;
- the committed generated code under ``*/v1/`` is what ``proto/generate.py`` produces now.

The allow-lists are constants so that the lead can edit them in one place.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from scheduler.process import run

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("storage", "scheduler")
GENERATED_DIRS = ("storage/v1", "scheduler/v1")

# Pure modules: events in, decisions out, no I/O. Checked when they exist.
PURE_MODULES = (
    "storage/partition.py",
    "storage/checker.py",
    "storage/replication.py",
    "storage/keyspace.py",
    "storage/errors.py",
    "storage/limits.py",
    "storage/routing.py",
    "storage/coalescing.py",
    "storage/failure_detector.py",
    "scheduler/state.py",
    "scheduler/master_books.py",
    "scheduler/framework_calls.py",
    "scheduler/offers.py",
    "scheduler/master_records.py",
    "scheduler/allocator.py",
    "scheduler/resources.py",
)
IO_LIBRARIES = ("asyncio", "grpc", "kazoo", "rocksdict", "subprocess", "socket", "threading")

# The one owner of each external system.
OWNERS: dict[str, frozenset[str]] = {
    "subprocess": frozenset({"scheduler/process.py"}),
    "multiprocessing": frozenset({"scheduler/process.py"}),
    "pty": frozenset({"scheduler/process.py"}),
    "kazoo": frozenset({"scheduler/coord.py"}),
    "rocksdict": frozenset({"storage/engine.py"}),
}
# Starting processes without importing subprocess still makes a module a subprocess user.
ASYNCIO_PROCESS_STARTERS = frozenset(
    {"create_subprocess_exec", "create_subprocess_shell", "subprocess_exec", "subprocess_shell"}
)
OS_PROCESS_STARTERS = frozenset(
    {"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"}
    | {"spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"}
    | {"execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe"}
)

# Generated protobuf/gRPC modules (*_pb2, *_pb2_grpc) are imported only by the servicers,
# the clients and the entry points: everything else works with domain types.
GENERATED_CODE_USERS = frozenset(
    {
        "storage/service.py",
        "storage/client.py",
        "storage/sync_client.py",
        "storage/discovery.py",
        "storage/batcher.py",
        "storage/wire_errors.py",
        "storage/replica.py",
        "storage/apply.py",
        "storage/sender.py",
        "storage/catchup.py",
        "storage/node.py",
        "storage/controller.py",
        "storage/peers.py",
        "storage/bench.py",
        "storage/cli.py",
        "storage/local.py",
        "scheduler/master.py",
        "scheduler/agent.py",
        "scheduler/framework.py",
        "scheduler/health.py",
        "scheduler/taskinfo.py",
        "scheduler/updates.py",
        "scheduler/agent_service.py",
        "scheduler/framework_events.py",
        "scheduler/service.py",
        "scheduler/client.py",
        "scheduler/cli.py",
        "scheduler/wire.py",
        "scheduler/local.py",
        "scheduler/status.py",
        "scheduler/simulated.py",
        "scheduler/master_messages.py",
        "scheduler/master_service.py",
    }
)


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def source_files() -> Iterator[Path]:
    """Every hand-written .py file of the packages (generated code excluded)."""
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if not any(rel(path).startswith(g + "/") for g in GENERATED_DIRS):
                yield path


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def imported_names(path: Path) -> frozenset[str]:
    """Absolute dotted names `path` imports; ``from a import b`` yields both a and a.b."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return frozenset(names)


def within(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


def project_files_of(name: str) -> list[Path]:
    """The project files that importing `name` executes: its packages' __init__s and itself."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return []
    found = []
    for i in range(1, len(parts) + 1):
        base = REPO.joinpath(*parts[:i])
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                found.append(candidate)
    return found


def closure(start: Path) -> list[Path]:
    """`start` and every project file it imports, directly or not."""
    seen: dict[Path, None] = {}
    todo = [start, *project_files_of(module_name(start))]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for name in imported_names(path):
            todo.extend(project_files_of(name))
    return list(seen)


def process_starts(path: Path) -> Iterator[tuple[int, str]]:
    """Where `path` starts a process by other means than subprocess (asyncio, os)."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Attribute) and (
            node.attr in ASYNCIO_PROCESS_STARTERS
            or (
                node.attr in OS_PROCESS_STARTERS
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            )
        ):
            yield node.lineno, node.attr
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "asyncio"):
            starters = OS_PROCESS_STARTERS if node.module == "os" else ASYNCIO_PROCESS_STARTERS
            for alias in node.names:
                if alias.name in starters:
                    yield node.lineno, f"{node.module}.{alias.name}"


def test_scheduler_never_imports_storage() -> None:
    offenders = [
        f"{rel(path)} imports {name}"
        for path in source_files()
        if rel(path).startswith("scheduler/")
        for name in sorted(imported_names(path))
        if within(name, "storage")
    ]
    assert not offenders, "scheduler must not depend on storage:\n" + "\n".join(offenders)


def test_pure_modules_do_no_io() -> None:
    checked = [REPO / m for m in PURE_MODULES if (REPO / m).is_file()]
    assert checked, f"none of the pure modules exist: {PURE_MODULES}"
    offenders = sorted(
        {
            f"{rel(pure)}: {rel(path)} imports {name}"
            for pure in checked
            for path in closure(pure)
            for name in imported_names(path)
            if any(within(name, lib) for lib in IO_LIBRARIES)
        }
    )
    assert not offenders, "pure modules must not do I/O:\n" + "\n".join(offenders)


def test_each_external_system_has_one_owner() -> None:
    offenders = []
    for path in source_files():
        names = imported_names(path)
        for library, owners in OWNERS.items():
            if rel(path) not in owners:
                offenders += [f"{rel(path)} imports {n}" for n in names if within(n, library)]
        if rel(path) not in OWNERS["subprocess"]:
            offenders += [
                f"{rel(path)}:{line} starts a process ({what})"
                for line, what in process_starts(path)
            ]
    assert not offenders, "one owner per external system:\n" + "\n".join(offenders)


def test_generated_code_is_imported_only_by_servicers_and_clients() -> None:
    offenders = [
        f"{rel(path)} imports {name}"
        for path in source_files()
        if rel(path) not in GENERATED_CODE_USERS
        for name in sorted(imported_names(path))
        if any(part.endswith(("_pb2", "_pb2_grpc")) for part in name.split("."))
    ]
    assert not offenders, (
        "generated *_pb2 modules belong to servicers and clients "
        "(edit GENERATED_CODE_USERS to allow another):\n" + "\n".join(offenders)
    )


def generated_files(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for directory in GENERATED_DIRS:
        for path in sorted((root / directory).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    done = run([sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], 120)
    assert done.ok, f"proto/generate.py failed:\n{done.stdout}{done.stderr}"
    fresh, committed = generated_files(tmp_path), generated_files(REPO)
    assert fresh, "proto/generate.py produced nothing"
    stale = sorted(
        [
            f"{name} (differs)"
            for name in fresh
            if name in committed and fresh[name] != committed[name]
        ]
        + [f"{name} (not committed)" for name in fresh if name not in committed]
        + [f"{name} (no longer generated)" for name in committed if name not in fresh]
    )
    assert not stale, "stale generated code: run proto/generate.py\n" + "\n".join(stale)
