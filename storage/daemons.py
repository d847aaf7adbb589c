"""Entry points of the storage daemons: `storage node` and `storage controller`.

Flags override `RINGSTORE_*` environment variables, which override defaults. Only these
entry points configure logging (stderr, `key=value` context in the messages).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

from storage.controller import ControllerOptions, run_controller
from storage.node import NodeError, NodeOptions, run_node
from storage.partition import DEFAULT_PARTITIONS, DEFAULT_REPLICATION
from storage.snapshot import DEFAULT_RETAIN_BYTES, DEFAULT_RETAIN_ENTRIES

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("kazoo").setLevel(logging.WARNING)


zk_option = click.option("--zk", envvar="RINGSTORE_ZK", required=True,
                         help="ZooKeeper connect string host:port[,...][/chroot] "
                              "(default chroot /ringstore).")
cluster_option = click.option("--cluster", envvar="RINGSTORE_CLUSTER", default="default",
                              show_default=True, help="Cluster name.")
session_option = click.option("--session-timeout", type=click.FloatRange(1.0, 60.0),
                              default=4.0, show_default=True,
                              help="ZooKeeper session timeout in seconds.")
verbose_option = click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")


@click.command("node")
@click.option("--node-id", envvar="RINGSTORE_NODE_ID", required=True, help="Stable node id.")
@click.option("--listen", envvar="RINGSTORE_LISTEN", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT for gRPC (port 0: any free port).")
@click.option("--advertise", envvar="RINGSTORE_ADVERTISE", default="",
              help="HOST:PORT other processes reach this node at (default: the listen address).")
@click.option("--data-dir", envvar="RINGSTORE_DATA_DIR", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Data directory.")
@zk_option
@cluster_option
@click.option("--domain", envvar="RINGSTORE_DOMAIN", default="",
              help="Failure domain (zone or host); defaults to the node id.")
@click.option("--sync", type=click.Choice(["always", "never"]), default="never",
              show_default=True,
              help="always: fsync before acknowledging (survives power loss); never: the "
                   "WAL is written, not fsynced (survives a process kill).")
@click.option("--log-retain-entries", envvar="RINGSTORE_LOG_RETAIN_ENTRIES",
              type=click.IntRange(min=1), default=DEFAULT_RETAIN_ENTRIES, show_default=True,
              help="Log entries kept per partition; a follower further behind gets a snapshot.")
@click.option("--log-retain-bytes", envvar="RINGSTORE_LOG_RETAIN_BYTES",
              type=click.IntRange(min=1), default=DEFAULT_RETAIN_BYTES, show_default=True,
              help="About this many bytes of log kept per partition.")
@session_option
@verbose_option
def node_command(node_id: str, listen: str, advertise: str, data_dir: Path, zk: str,
                 cluster: str, domain: str, sync: str, log_retain_entries: int,
                 log_retain_bytes: int, session_timeout: float, verbose: int) -> None:
    """Run a storage node until SIGTERM."""
    configure_logging(max(verbose, 1))
    options = NodeOptions(node_id=node_id, listen=listen, data_dir=data_dir, zk=zk,
                          cluster=cluster, domain=domain, sync=sync == "always",
                          session_timeout=session_timeout, advertise=advertise,
                          retain_entries=log_retain_entries, retain_bytes=log_retain_bytes)
    try:
        asyncio.run(run_node(options))
    except NodeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@click.command("controller")
@zk_option
@cluster_option
@click.option("--partitions", type=int, default=DEFAULT_PARTITIONS, show_default=True,
              help="Partitions Q (a power of two up to 4096), fixed when the cluster is created.")
@click.option("--replication", type=click.IntRange(1, 9), default=DEFAULT_REPLICATION,
              show_default=True, help="Replicas per partition, fixed at creation.")
@click.option("--expect-nodes", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Live nodes needed before the first placement.")
@click.option("--id", "controller_id", default="", help="Controller id (default: by pid).")
@click.option("--suspect-after", type=click.FloatRange(0.5, 60.0), default=2.0,
              show_default=True,
              help="Seconds of unanswered health probes before a node's leaderships fail "
                   "over (a refused connection fails them over at once).")
@session_option
@verbose_option
def controller_command(zk: str, cluster: str, partitions: int, replication: int,
                       expect_nodes: int, controller_id: str, suspect_after: float,
                       session_timeout: float, verbose: int) -> None:
    """Run the ring controller (leader-elected) until SIGTERM."""
    configure_logging(max(verbose, 1))
    try:
        options = ControllerOptions(zk=zk, cluster=cluster, partitions=partitions,
                                    replication=replication, expect_nodes=expect_nodes,
                                    controller_id=controller_id,
                                    suspect_after=suspect_after,
                                    session_timeout=session_timeout)
        asyncio.run(run_controller(options))
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


DEFAULT_WORK_DIR = Path(".ringstore/local")


@click.group("local")
def local_group() -> None:
    """Run a whole cluster on this machine (ZooKeeper, controller, storage nodes)."""


@local_group.command("up")
@click.option("--nodes", type=click.IntRange(1, 32), default=3, show_default=True)
@click.option("--partitions", type=int, default=DEFAULT_PARTITIONS, show_default=True)
@click.option("--replication", type=click.IntRange(1, 9), default=DEFAULT_REPLICATION,
              show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_WORK_DIR, show_default=True,
              help="Where data, logs and the state file go.")
@click.option("--cluster", default="default", show_default=True)
@click.option("--sync", type=click.Choice(["always", "never"]), default="never",
              show_default=True)
@click.option("--timeout", type=float, default=90.0, show_default=True,
              help="Seconds to wait for every partition to have a leader.")
def local_up(nodes: int, partitions: int, replication: int, work_dir: Path, cluster: str,
             sync: str, timeout: float) -> None:
    """Start ZooKeeper, a controller and N storage nodes; print where everything is."""
    from scheduler.process import pid_alive
    from scheduler.zookeeper import ZooKeeperNotInstalled
    from storage.local import LocalCluster, read_state, recorded_pids

    work_dir = work_dir.resolve()
    state = read_state(work_dir)
    if state is not None and any(pid_alive(pid) for pid in recorded_pids(state)):
        click.echo(f"error: a local cluster is already running from {work_dir}; "
                   f"stop it with 'storage local down --work-dir {work_dir}'", err=True)
        sys.exit(1)
    if replication > nodes:
        click.echo(f"error: replication {replication} needs at least {replication} nodes; "
                   f"got --nodes {nodes}", err=True)
        sys.exit(2)
    cluster_ = LocalCluster(work_dir, nodes=nodes, cluster=cluster, partitions=partitions,
                            replication=replication, sync=sync == "always")
    try:
        cluster_.start(timeout=timeout)
    except ZooKeeperNotInstalled as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        cluster_.stop()
        click.echo(f"error: the cluster did not become ready: {exc}; logs are in "
                   f"{cluster_.log_dir}", err=True)
        sys.exit(1)
    endpoints = ",".join(cluster_.endpoints)
    click.echo(f"Ringstore cluster {cluster!r} is up ({nodes} nodes, {partitions} partitions, "
               f"RF {replication}).")
    zk_pid = cluster_.zookeeper.pid if cluster_.zookeeper else "-"
    click.echo(f"  zookeeper  {cluster_.zk}  (pid {zk_pid})")
    for p in cluster_.controller_processes:
        click.echo(f"  controller pid {p.pid}")
    for node in cluster_.node_processes.values():
        pid = node.process.pid if node.process else "-"
        click.echo(f"  node {node.node_id:<4} {node.address}  pid {pid}  data {node.data_dir}")
    click.echo(f"  logs       {cluster_.log_dir}")
    click.echo(f"  endpoints  export RINGSTORE_ENDPOINTS={endpoints}")
    click.echo(f"Stop it all with: storage local down --work-dir {work_dir}")


@local_group.command("down")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_WORK_DIR, show_default=True)
def local_down(work_dir: Path) -> None:
    """Stop exactly the processes `storage local up` started (by PID)."""
    from storage.local import stop_recorded

    work_dir = work_dir.resolve()
    stopped = stop_recorded(work_dir)
    if not stopped:
        click.echo(f"no running local cluster recorded in {work_dir}")
        return
    click.echo(f"stopped {len(stopped)} processes: {' '.join(map(str, stopped))}")


@local_group.command("status")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_WORK_DIR, show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def local_status(work_dir: Path, output: str) -> None:
    """Show the processes of the local cluster and whether they are alive."""
    import json

    from scheduler.process import pid_alive
    from storage.local import read_state

    state = read_state(work_dir.resolve())
    if state is None:
        click.echo(f"no local cluster recorded in {work_dir.resolve()}", err=True)
        sys.exit(1)
    rows = []
    if state.get("zookeeper_pid"):
        rows.append(("zookeeper", state["zk"], state["zookeeper_pid"]))
    rows += [("controller", "", pid) for pid in state.get("controllers", [])]
    rows += [(f"node {n}", d["address"], d["pid"]) for n, d in state.get("nodes", {}).items()]
    if output == "json":
        click.echo(json.dumps([{"process": r[0], "address": r[1], "pid": r[2],
                                "alive": pid_alive(int(r[2]))} for r in rows]))
        return
    for name, address, pid in rows:
        alive = "alive" if pid_alive(int(pid)) else "DEAD"
        click.echo(f"{name:<12} {address:<22} pid {pid:<8} {alive}")
