"""The `scheduler` command line: the daemons, the operator's read commands, `local`.

- `scheduler master` and `scheduler agent` are the daemons' own click commands
  (`scheduler.master.command`, `scheduler.agent.command`), imported only when invoked,
  so the other commands work without them;
- `scheduler status|agents|tasks` read the leading master's GetState; `scheduler logs`
  reads a task's sandbox output from its agent (Agent.ReadFile);
- `scheduler local up|down|status` run a whole substrate on this machine (scheduler.local).

Invariants: results go to stdout, logs and errors to stderr; logging is configured only in
`main`; every read command takes `-o table|json`; a failure prints one line on stderr and
exits 1 (2 for usage errors).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from scheduler import status as st

log = logging.getLogger(__name__)

EXIT_FAILURE = 1
DEFAULT_WORK_DIR = Path(".ringstore-substrate")
# Daemon commands provided by other modules: name -> (module, attribute).
LAZY_COMMANDS = {
    "master": ("scheduler.master", "command"),
    "agent": ("scheduler.agent", "command"),
}


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


class SchedulerGroup(click.Group):
    """A group whose daemon commands are imported when they are used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = LAZY_COMMANDS[cmd_name]
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            return _missing(cmd_name, f"{module_name}.{attribute} is not available: {exc}")
        if not isinstance(command, click.Command):
            return _missing(cmd_name, f"{module_name}.{attribute} is not a click command")
        return command


def _missing(name: str, why: str) -> click.Command:
    def fail() -> None:
        _fail(why)

    return click.Command(name, callback=fail, help=f"(unavailable: {why})",
                         context_settings={"ignore_unknown_options": True,
                                           "allow_extra_args": True})


@click.group(cls=SchedulerGroup)
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug (logs on stderr).")
def main(verbose: int) -> None:
    """The Ringstore substrate: masters, agents, and what runs on them."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kazoo logs every refused connection; a failing command says it once, in one line.
    logging.getLogger("kazoo").setLevel(logging.WARNING if verbose > 1 else logging.CRITICAL)


zk_option = click.option("--zk", envvar="RINGSTORE_ZK", required=True,
                         help="ZooKeeper connect string host:port[,...][/chroot] "
                              "(env RINGSTORE_ZK).")
cluster_option = click.option("--cluster", envvar="RINGSTORE_CLUSTER", default="default",
                              show_default=True, help="Cluster name (env RINGSTORE_CLUSTER).")
output_option = click.option("-o", "--output", type=click.Choice(["table", "json"]),
                             default="table", show_default=True)
timeout_option = click.option("--timeout", type=click.FloatRange(0.1, 120.0), default=5.0,
                              show_default=True, help="Seconds for each call.")


def _state(zk: str, cluster: str, timeout: float) -> Any:
    try:
        return st.cluster_state(zk, cluster, timeout=timeout)
    except st.StatusError as exc:
        _fail(str(exc))


def _read_command(name: str, summary: str, as_json: Callable[[Any], Any],
                  as_table: Callable[[Any, Console], None]) -> click.Command:
    """`scheduler NAME`: GetState from the leading master, shown as JSON or tables."""

    @main.command(name, help=summary)
    @zk_option
    @cluster_option
    @output_option
    @timeout_option
    def read(zk: str, cluster: str, output: str, timeout: float) -> None:
        state = _state(zk, cluster, timeout)
        if output == "json":
            click.echo(json.dumps(as_json(state), indent=2))
        else:
            as_table(state, Console())

    return read


status_command = _read_command(
    "status", "The leading master, agents with free/used resources, frameworks, tasks.",
    st.state_dict, st.print_status)
agents_command = _read_command(
    "agents", "Agents with their total, used and offered resources.",
    lambda state: [st.agent_dict(a) for a in state.agents],
    lambda state, console: console.print(st.agents_table(state)))
tasks_command = _read_command(
    "tasks", "Every task the leading master knows, with its state and agent.",
    lambda state: [st.task_dict(t) for t in state.tasks],
    lambda state, console: console.print(st.tasks_table(state)))


@main.command("logs")
@click.argument("task_id")
@click.option("--stderr", "stream", flag_value="stderr", help="Show stderr.")
@click.option("--stdout", "stream", flag_value="stdout", default=True,
              help="Show stdout (the default).")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new output until the task ends (or Ctrl-C).")
@zk_option
@cluster_option
@timeout_option
def logs_command(task_id: str, stream: str, follow: bool, zk: str, cluster: str,
                 timeout: float) -> None:
    """Print a task's sandbox output (stdout, or stderr), read from its agent."""
    try:
        view = st.find_task(_state(zk, cluster, timeout), task_id)
        if not view.agent_address:
            _fail(f"task {task_id} has no agent address (state "
                  f"{st.state_name(view.state)}); it may never have run")
        offset = 0
        out = sys.stdout.buffer
        last_check = time.monotonic()
        while True:
            data, size = st.read_file(view.agent_address, task_id, stream, offset,
                                      timeout=timeout)
            if data:
                out.write(data)
                out.flush()
                offset += len(data)
            if offset < size and data:
                continue
            if not follow:
                return
            if time.monotonic() - last_check > 2.0:
                last_check = time.monotonic()
                view = st.find_task(_state(zk, cluster, timeout), task_id)
                if view.state in st.TERMINAL_STATES:
                    follow = False  # one last read, then stop
                    continue
            time.sleep(0.5)  # the poll interval of --follow
    except st.StatusError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return


# -- local -------------------------------------------------------------------------------


@main.group("local")
def local_group() -> None:
    """A whole substrate on this machine: ZooKeeper, masters and agents."""


work_dir_option = click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
                               default=DEFAULT_WORK_DIR, show_default=True,
                               help="Where logs, work dirs and the state file go.")


@local_group.command("up")
@click.option("--agents", type=click.IntRange(1, 16), default=3, show_default=True)
@click.option("--masters", type=click.Choice(["1", "3"]), default="1", show_default=True)
@work_dir_option
@click.option("--cluster", default="default", show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for every agent to register.")
def local_up(agents: int, masters: str, work_dir: Path, cluster: str, timeout: float) -> None:
    """Start ZooKeeper, masters and agents; print where everything is."""
    from scheduler.local import LocalSubstrate, SubstrateError, running_pids
    from scheduler.zookeeper import ZooKeeperNotInstalled

    work_dir = work_dir.resolve()
    if running_pids(work_dir):
        _fail(f"a local substrate is already running from {work_dir}; "
              f"stop it with 'scheduler local down --work-dir {work_dir}'")
    substrate = LocalSubstrate(work_dir, agents=agents, masters=int(masters), cluster=cluster)
    try:
        substrate.start(timeout=timeout)
    except ZooKeeperNotInstalled as exc:
        _fail(str(exc))
    except (SubstrateError, TimeoutError, OSError) as exc:
        substrate.stop()
        _fail(f"the substrate did not come up: {exc}; logs are in {substrate.log_dir}")
    for line in substrate.describe():
        click.echo(line)


@local_group.command("down")
@work_dir_option
def local_down(work_dir: Path) -> None:
    """Stop exactly the processes `scheduler local up` started (by PID)."""
    from scheduler.local import stop_recorded

    work_dir = work_dir.resolve()
    stopped = stop_recorded(work_dir)
    if not stopped:
        click.echo(f"no running local substrate recorded in {work_dir}")
        return
    click.echo(f"stopped {len(stopped)} processes: {' '.join(map(str, stopped))}")


@local_group.command("status")
@work_dir_option
@output_option
def local_status(work_dir: Path, output: str) -> None:
    """The processes of the local substrate and whether they are alive."""
    from scheduler.local import process_rows, read_state

    work_dir = work_dir.resolve()
    state = read_state(work_dir)
    if state is None:
        _fail(f"no local substrate recorded in {work_dir}; start one with "
              f"'scheduler local up --work-dir {work_dir}'")
    rows = process_rows(state)
    if output == "json":
        click.echo(json.dumps({"zk": state["zk"], "cluster": state["cluster"],
                               "processes": rows}, indent=2))
        return
    from rich.table import Table

    table = Table("process", "pid", "alive", "address", "log",
                  title=f"zk {state['zk']}  cluster {state['cluster']}")
    for row in rows:
        table.add_row(row["name"], str(row["pid"]), "yes" if row["alive"] else "NO",
                      row.get("address", ""), row.get("log", ""))
    Console().print(table)


if __name__ == "__main__":
    main(prog_name="scheduler")
