"""The `storage` command line: data commands (put, get, delete, cas, scan, map) over the client.

Role: parse arguments, call `storage.client.Client`, print results. Other roles add their
commands to the `main` group with `main.add_command` (node, controller, local, bench).

Invariants:
- results go to stdout, logs and errors to stderr; logging is configured only in `main`;
- a failure prints one line on stderr saying what is wrong and what to do, and exits
  2 for invalid input (usage errors, InvalidArgument) and 1 for every other failure
  (unavailable, not found, compare-and-set mismatch, deadline);
- every read command takes `-o table|json`; JSON values that are not UTF-8 are base64
  with `"encoding": "base64"` (and `"key_encoding"` for keys).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from storage.client import Client, Item
from storage.errors import (
    CasMismatch,
    DeadlineExceeded,
    InvalidArgument,
    NotLeader,
    StorageError,
    Unavailable,
    Version,
)
from storage.v1 import kv_pb2

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MISSING_ADDRESS = (
    "give --endpoints HOST:PORT[,...] or --zk HOST:PORT "
    "(or set RINGSTORE_ENDPOINTS / RINGSTORE_ZK)"
)
EXIT_FAILURE = 1
EXIT_USAGE = 2
TABLE_VALUE_CHARS = 60


def _fail(code: int, message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


@dataclass(frozen=True)
class Connection:
    """Where the cluster is, from the shared options."""

    endpoints: str | None
    zk: str | None
    cluster: str
    timeout: float

    def client(self) -> Client:
        if not (self.endpoints or "").replace(",", " ").strip() and not self.zk:
            _fail(EXIT_USAGE, MISSING_ADDRESS)
        return Client(
            self.endpoints or None, zk=self.zk, cluster=self.cluster, timeout=self.timeout,
            coalesce=False,
        )


def _explain(err: StorageError, write: bool) -> tuple[int, str]:
    """Exit code and the one line that says what is wrong and what to do."""
    if isinstance(err, InvalidArgument):
        return EXIT_USAGE, err.message
    unknown = " (the write may or may not have been applied; read the key to check)"
    suffix = unknown if write and not err.definite else ""
    if isinstance(err, DeadlineExceeded):
        return EXIT_FAILURE, f"{err.message}{suffix}; retry, or give a longer --timeout"
    if isinstance(err, Unavailable):
        return EXIT_FAILURE, (
            f"{err.message}{suffix}; check that the cluster is up (`storage map`) and the "
            "--endpoints / --zk address, then retry"
        )
    if isinstance(err, NotLeader):
        return EXIT_FAILURE, f"{err.message}; the partition's leader is changing, retry shortly"
    return EXIT_FAILURE, f"{err.message}{suffix}"


def data_command(write: bool = False) -> Callable[[F], F]:
    """Add the shared connection options; turn StorageErrors into one line and an exit code."""

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(
            *args: Any, endpoints: str | None, zk: str | None, cluster: str, timeout: float,
            **kwargs: Any,
        ) -> Any:
            conn = Connection(endpoints, zk, cluster, timeout)
            try:
                return f(*args, conn=conn, **kwargs)
            except StorageError as err:
                code, message = _explain(err, write)
                _fail(code, message)

        options = [
            click.option("--endpoints", envvar="RINGSTORE_ENDPOINTS", metavar="HOST:PORT[,...]",
                         help="Storage node addresses [env RINGSTORE_ENDPOINTS]."),
            click.option("--zk", envvar="RINGSTORE_ZK", metavar="HOST:PORT[,...][/CHROOT]",
                         help="ZooKeeper to find the nodes in [env RINGSTORE_ZK]."),
            click.option("--cluster", envvar="RINGSTORE_CLUSTER", default="default",
                         show_default=True, help="Cluster name [env RINGSTORE_CLUSTER]."),
            click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
                         show_default=True, help="Deadline of the request, in seconds."),
        ]
        decorated: Callable[..., Any] = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        return decorated  # type: ignore[return-value]

    return decorate


def output_option(f: F) -> F:
    return click.option(
        "-o", "--output", type=click.Choice(["table", "json"]), default="table",
        show_default=True, help="Output format.",
    )(f)


def consistency_option(f: F) -> F:
    return click.option(
        "--consistency", type=click.Choice(["linearizable", "lease", "follower"],
                                           case_sensitive=False),
        default="linearizable", show_default=True,
        help="linearizable: leader, confirmed by a majority; lease: leader within its lease; "
             "follower: any replica, possibly stale.",
    )(f)


def _text(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def item_json(item: Item) -> dict[str, str]:
    """{key, value, version}; non-UTF-8 bytes as base64 with an `encoding` field."""
    out: dict[str, str] = {}
    key = _text(item.key)
    if key is None:
        out["key"] = base64.b64encode(item.key).decode()
        out["key_encoding"] = "base64"
    else:
        out["key"] = key
    value = _text(item.value)
    if value is None:
        out["value"] = base64.b64encode(item.value).decode()
        out["encoding"] = "base64"
    else:
        out["value"] = value
    out["version"] = str(item.version)
    return out


def _cell(data: bytes) -> Text:
    text = _text(data)
    printable = text is not None and text.isprintable()
    shown = text if printable and text is not None else "base64:" + base64.b64encode(data).decode()
    if len(shown) > TABLE_VALUE_CHARS:
        shown = shown[: TABLE_VALUE_CHARS - 1] + "…"
    return Text(shown)


def _read_value(value: str | None, path: str | None, *, required: bool = True) -> bytes | None:
    """VALUE, or the file's bytes, or stdin's; never two sources at once."""
    if value is not None and path is not None:
        raise click.UsageError("give VALUE or --file, not both")
    if value is not None:
        return value.encode()
    if path is not None:
        with click.open_file(path, "rb") as f:
            data: bytes = f.read()
            return data
    if not required:
        return None
    stdin = sys.stdin.buffer
    if stdin.isatty():
        click.echo("reading the value from stdin (end with Ctrl-D)", err=True)
    return stdin.read()


@click.group()
@click.option("-v", "--verbose", count=True, help="-v: INFO logs, -vv: DEBUG (on stderr).")
def main(verbose: int) -> None:
    """Ringstore: put, get, delete, compare-and-set and scan keys; show the partition map."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command()
@click.argument("key")
@click.argument("value", required=False)
@click.option("--file", "path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the value (binary) from this file.")
@click.option("--ttl", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Expire the key after this many seconds.")
@data_command(write=True)
def put(key: str, value: str | None, path: str | None, ttl: float | None,
        conn: Connection) -> None:
    """Store VALUE (or --file, or stdin) under KEY; print the new version."""
    data = _read_value(value, path)
    assert data is not None
    with conn.client() as client:
        version = client.put(key, data, ttl=ttl)
    click.echo(str(version))


@main.command()
@click.argument("key")
@consistency_option
@output_option
@data_command()
def get(key: str, consistency: str, output: str, conn: Connection) -> None:
    """Print KEY's value (raw bytes; -o json for key, value and version)."""
    with conn.client() as client:
        item = client.get(key, consistency=consistency.lower())
    if item is None:
        _fail(EXIT_FAILURE, f"key {key!r} not found")
    if output == "json":
        click.echo(json.dumps(item_json(item)))
        return
    stdout = sys.stdout.buffer
    stdout.write(item.value)
    if stdout.isatty():
        stdout.write(b"\n")
    stdout.flush()


@main.command()
@click.argument("key")
@data_command(write=True)
def delete(key: str, conn: Connection) -> None:
    """Delete KEY."""
    with conn.client() as client:
        existed = client.delete(key)
    if not existed:
        _fail(EXIT_FAILURE, f"key {key!r} not found; nothing was deleted")
    click.echo("deleted")


def _parse_expect(ctx: click.Context, param: click.Parameter, text: str | None) -> Version | None:
    if text is None:
        return None
    try:
        version = Version.parse(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if version.epoch < 1 or version.index < 1:
        raise click.BadParameter(f"{text}: versions start at 1.1; use --expect-absent")
    return version


@main.command()
@click.argument("key")
@click.argument("value", required=False)
@click.option("--expect", "expected", callback=_parse_expect, metavar="E.I",
              help="Write only if KEY is at this version (as printed by put / get -o json).")
@click.option("--expect-absent", is_flag=True, help="Write only if KEY does not exist.")
@click.option("--delete", "delete_", is_flag=True, help="Delete KEY instead of writing.")
@click.option("--file", "path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the value (binary) from this file.")
@click.option("--ttl", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Expire the key after this many seconds.")
@data_command(write=True)
def cas(key: str, value: str | None, expected: Version | None, expect_absent: bool,
        delete_: bool, path: str | None, ttl: float | None, conn: Connection) -> None:
    """Compare-and-set: write VALUE (or --delete) only if KEY is at --expect / absent."""
    if (expected is None) == (not expect_absent):
        raise click.UsageError("give exactly one of --expect E.I and --expect-absent")
    if delete_ and (value is not None or path is not None or ttl is not None):
        raise click.UsageError("--delete takes no VALUE, --file or --ttl")
    data = None if delete_ else _read_value(value, path)
    with conn.client() as client:
        try:
            version = client.cas(key, data, expected=expected, delete=delete_, ttl=ttl)
        except CasMismatch as err:
            if err.current is None:
                _fail(EXIT_FAILURE, f"compare-and-set failed: key {key!r} does not exist; "
                                    "retry with --expect-absent")
            _fail(EXIT_FAILURE, f"compare-and-set failed: key {key!r} is at version "
                                f"{err.current}; read it again and retry with "
                                f"--expect {err.current}")
    click.echo(str(version))


@main.command()
@click.option("--partition", type=click.IntRange(min=0), help="Scan only this partition.")
@click.option("--start", default="", help="First key (inclusive).")
@click.option("--end", default=None, help="Last key (exclusive).")
@click.option("--limit", type=click.IntRange(min=0), default=0, show_default=True,
              help="At most this many items (0: no limit).")
@consistency_option
@output_option
@data_command()
def scan(partition: int | None, start: str, end: str | None, limit: int, consistency: str,
         output: str, conn: Connection) -> None:
    """List items: one partition, or every partition in turn (key order within each)."""
    with conn.client() as client:
        items = client.scan(partition=partition, start=start, end=end, limit=limit,
                            consistency=consistency.lower())
        if output == "json":
            for item in items:
                click.echo(json.dumps(item_json(item)))
            return
        table = Table("key", "value", "version")
        for item in items:
            table.add_row(_cell(item.key), _cell(item.value), str(item.version))
    Console().print(table)


def map_json(pmap: kv_pb2.PartitionMap) -> dict[str, Any]:
    return {
        "version": pmap.version,
        "cluster": pmap.cluster,
        "partitions": pmap.partitions,
        "replication": pmap.replication,
        "entries": [
            {"partition": e.id, "epoch": e.epoch, "leader": e.leader,
             "replicas": list(e.replicas), "learners": list(e.learners)}
            for e in pmap.entries
        ],
        "nodes": [
            {"id": n.id, "address": n.address, "domain": n.domain, "state": n.state,
             "live": n.live}
            for n in pmap.nodes
        ],
    }


@main.command(name="map")
@output_option
@data_command()
def map_(output: str, conn: Connection) -> None:
    """Show the partition map: each partition's epoch, leader, replicas and learners."""
    with conn.client() as client:
        pmap = client.get_map()
    if output == "json":
        click.echo(json.dumps(map_json(pmap)))
        return
    partitions = Table("partition", "epoch", "leader", "replicas", "learners",
                       title=f"cluster {pmap.cluster!r}, map version {pmap.version}, "
                             f"{pmap.partitions} partitions, replication {pmap.replication}")
    for e in sorted(pmap.entries, key=lambda e: e.id):
        partitions.add_row(str(e.id), str(e.epoch), Text(e.leader or "-"),
                           Text(",".join(e.replicas)), Text(",".join(e.learners)))
    nodes = Table("node", "address", "domain", "state", "live", title="nodes")
    for n in sorted(pmap.nodes, key=lambda n: n.id):
        nodes.add_row(Text(n.id), Text(n.address), Text(n.domain), Text(n.state),
                      "yes" if n.live else "no")
    console = Console()
    console.print(partitions)
    console.print(nodes)


def _add_daemon_commands() -> None:
    # Imported here, not at the top: the daemons pull in the node and controller, which
    # the data commands do not need.
    from storage.bench import bench_command
    from storage.daemons import controller_command, local_group, node_command

    for command in (node_command, controller_command, local_group, bench_command):
        main.add_command(command)


_add_daemon_commands()
