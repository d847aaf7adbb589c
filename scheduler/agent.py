"""The agent daemon (`scheduler agent`): runs the leading master's tasks on this host.

It finds the leader through ZooKeeper (scheduler.registry), attaches to it (Master.Attach,
a bidi stream), registers with its checkpointed id and tasks, heartbeats, launches and
kills tasks (scheduler.executor, from TaskInfo by scheduler.taskinfo) and reports every
state change. It serves the Agent service (scheduler.agent_service: sandbox output).
Invariants:

- status updates (scheduler.updates): each gets a uuid and is checkpointed before it is
  sent; per task only the oldest unacknowledged update is in flight, resent every
  --status-retry-interval and after every re-attach, until the master forwards the
  framework's acknowledgement. Updates may be duplicated, never lost or reordered;
- a task is checkpointed before its process is spawned and its pid/start time right
  after, so a restarted agent never launches it twice; on start the agent re-attaches to
  the tasks still alive (pid + start time), reports those that ended while it was away
  with their recorded exit status, keeps its agent id and re-registers with its tasks;
- SIGTERM stops the agent cleanly and LEAVES ITS TASKS RUNNING (as a Mesos agent does on
  restart): they stay checkpointed and a new agent on the same work dir recovers them.
  Tasks are killed only when the master says so (KillTask, ShutdownFramework).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc
from google.protobuf import json_format

from scheduler import registry
from scheduler.agent_service import AgentService
from scheduler.checkpoint import Checkpoint, TaskRecord, VolumeDirs
from scheduler.coord import CoordError, Coordinator
from scheduler.executor import Executor, Outcome, TaskSpec
from scheduler.resources import ResourceError, Resources, parse_attributes
from scheduler.taskinfo import task_spec
from scheduler.updates import Outbox, StatusUpdates
from scheduler.v1 import scheduler_pb2 as pb
from scheduler.v1 import scheduler_pb2_grpc as pb_grpc
from scheduler.wire import attributes_to_pb, resources_to_pb

__all__ = ["Agent", "AgentOptions", "command", "run_agent"]

log = logging.getLogger(__name__)

_REGISTER_TIMEOUT = 5.0
_RECONNECT_DELAY = 0.3


@dataclass(frozen=True)
class AgentOptions:
    zk: str
    cluster: str
    work_dir: Path
    resources: str = "cpus:2;mem:4096;disk:20000;ports:[31000-31999]"
    attributes: str = ""
    listen: str = "127.0.0.1:0"
    hostname: str = ""
    status_retry_interval: float = 1.0
    kill_grace: float = 3.0
    session_timeout: float = 4.0
    poll_interval: float = 0.25


def _to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class Agent:
    """One agent: see the module docstring. `start()`, then `close()` (idempotent)."""

    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.work_dir = options.work_dir.resolve()
        self.checkpoint = Checkpoint(self.work_dir / "meta")
        self.volumes = VolumeDirs(self.work_dir / "volumes")
        self.hostname = options.hostname or socket.gethostname()
        self.flag_resources = Resources.parse(options.resources)
        self.attributes = parse_attributes(options.attributes)
        self.agent_id = ""
        self.address = ""
        self.records: dict[tuple[str, str], TaskRecord] = {}
        self.executors: dict[tuple[str, str], Executor] = {}
        self.coord = Coordinator(options.zk, session_timeout=options.session_timeout,
                                 name="agent")
        self.server: grpc.aio.Server | None = None
        self.registered = asyncio.Event()
        self.updates = StatusUpdates(self.checkpoint, options.status_retry_interval,
                                     lambda: self.agent_id)
        self._leader_changed = asyncio.Event()
        self._contenders = 0  # masters in the election, as last seen
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._last_failure = ""

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self.agent_id = self.checkpoint.agent_id()
        self._sync_volumes()
        self.server = grpc.aio.server()
        pb_grpc.add_AgentServicer_to_server(AgentService(self.work_dir / "sandboxes"),
                                            self.server)
        port = self.server.add_insecure_port(self.options.listen)
        host = self.options.listen.rpartition(":")[0] or "127.0.0.1"
        self.address = f"{host}:{port}"
        await self.server.start()
        self._recover()
        await self.coord.start()
        self.coord.watch_children(registry.masters_path(self.options.cluster),
                                  self._election_changed)
        self._spawn(self._connect_loop(), "connect")
        self._spawn(self.updates.resend(self.records.values), "resend updates")
        log.info("agent started id=%s address=%s work_dir=%s tasks=%s", self.agent_id or "-",
                 self.address, self.work_dir, len(self.executors))

    async def close(self, timeout: float = 5.0) -> None:
        """Stop talking to the master and serving; leave the tasks running."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(min(timeout, 1.0))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.coord.close(), timeout)
        log.info("agent stopped id=%s (tasks left running: %s)", self.agent_id,
                 sum(1 for r in self.records.values() if not r.terminal))

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- resources and volumes ---------------------------------------------------

    def total_resources(self) -> list[pb.Resource]:
        saved = self.checkpoint.resources()
        if saved is None:
            return resources_to_pb(self.flag_resources)
        return [json_format.ParseDict(r, pb.Resource()) for r in saved]

    def volume_path(self, role: str, persistence_id: str) -> Path:
        return self.volumes.path(role, persistence_id)

    def _sync_volumes(self) -> None:
        """Make the volume directories match the checkpointed resources."""
        self.volumes.sync({(r.role, r.volume.persistence_id)
                           for r in self.total_resources() if r.HasField("volume")})

    # -- tasks ---------------------------------------------------------------------

    def sandbox(self, framework_id: str, task_id: str) -> Path:
        return self.work_dir / "sandboxes" / framework_id / task_id

    def task_spec(self, framework_id: str, task: pb.TaskInfo) -> TaskSpec:
        """Raises ValueError (ResourceError) on ids or resources that do not fit."""
        return task_spec(framework_id, task, volume_path=self.volume_path,
                         kill_grace=self.options.kill_grace)

    def _executor(self, record: TaskRecord, spec: TaskSpec) -> Executor:
        key = (record.framework_id, record.task_id)

        def before_kill(reason: str, message: str) -> None:
            record.kill_reason, record.kill_message = reason, message
            self.checkpoint.save_task(record)

        def on_health(healthy: bool) -> None:
            if not record.terminal:
                self.report(record, record.state, healthy=healthy)

        executor = Executor(spec, self.sandbox(*key), agent_id=self.agent_id,
                            before_kill=before_kill, on_health=on_health,
                            poll_interval=self.options.poll_interval)
        self.executors[key] = executor
        return executor

    def _recover(self) -> None:
        """Load the checkpointed tasks: re-attach to live ones, report the dead ones."""
        for record in self.checkpoint.tasks():
            key = (record.framework_id, record.task_id)
            self.records[key] = record
            if record.terminal:
                continue
            task = json_format.ParseDict(record.task, pb.TaskInfo(), ignore_unknown_fields=True)
            try:
                spec = self.task_spec(record.framework_id, task)
            except ValueError as exc:
                self.report(record, "TASK_FAILED", reason="REASON_INVALID", message=str(exc))
                continue
            executor = self._executor(record, spec)
            if record.pid is None and record.launching:
                # Died between the spawn and recording the pid: look for the wrapper.
                record.pid, record.start_time = executor.find_wrapper() or (None, None)
            if record.pid is None:
                self.report(record, "TASK_FAILED", reason="REASON_AGENT_RESTARTED",
                            message="the agent restarted before the task was launched")
                continue
            if executor.attach(record.pid, record.start_time or 0, record.kill_reason,
                               record.kill_message):
                log.info("recovered live task=%s/%s pid=%s", *key, record.pid)
                if record.state in ("TASK_STAGING", "TASK_STARTING"):
                    self.report(record, "TASK_RUNNING")
                self._spawn(self._watch(record, executor), f"watch {key}")
                if record.kill_reason:
                    executor.kill(0, record.kill_reason, record.kill_message)
            else:
                self._finished(record, executor.finish())

    async def _watch(self, record: TaskRecord, executor: Executor) -> None:
        self._finished(record, await executor.wait())

    def _finished(self, record: TaskRecord, outcome: Outcome) -> None:
        self.report(record, outcome.state, reason=outcome.reason, message=outcome.message,
                    exit_code=outcome.exit_code)
        self.executors.pop((record.framework_id, record.task_id), None)

    def run_task(self, framework: pb.FrameworkInfo, task: pb.TaskInfo) -> None:
        fid = framework.framework_id
        key = (fid, task.task_id)
        old = self.records.get(key)
        if old is not None and not old.terminal:
            log.warning("ignoring RunTask for a task already held task=%s/%s", *key)
            return
        record = TaskRecord(fid, task.task_id, _to_dict(framework), _to_dict(task),
                            launching=True, updates=old.updates if old else [])
        self.records[key] = record
        self.checkpoint.save_task(record)
        try:
            spec = self.task_spec(fid, task)
        except ValueError as exc:
            self.report(record, "TASK_FAILED", reason="REASON_INVALID", message=str(exc))
            return
        executor = self._executor(record, spec)
        self.report(record, "TASK_STARTING")
        try:
            record.pid, record.start_time = executor.launch()
        except (OSError, ValueError) as exc:
            self.executors.pop(key, None)
            self.report(record, "TASK_FAILED", reason="REASON_LAUNCH_FAILED", message=str(exc))
            return
        record.launching = False
        self.report(record, "TASK_RUNNING")
        self._spawn(self._watch(record, executor), f"watch {key}")

    def kill_task(self, framework_id: str, task_id: str, grace: float, reason: str) -> None:
        key = (framework_id, task_id)
        executor, record = self.executors.get(key), self.records.get(key)
        if record is None:
            record = TaskRecord(framework_id, task_id, {"framework_id": framework_id},
                                {"task_id": task_id})
            self.records[key] = record
            self.report(record, "TASK_LOST", reason=reason,
                        message="the agent does not know this task")
            return
        if executor is None or record.terminal:
            return
        executor.kill(grace or executor.spec.kill_grace, reason, "")

    # -- status updates (scheduler.updates) ---------------------------------------

    def report(self, record: TaskRecord, state: str, *, reason: str = "", message: str = "",
               exit_code: int | None = None, healthy: bool | None = None) -> None:
        self.updates.report(record, state, reason=reason, message=message,
                            exit_code=exit_code, healthy=healthy)

    def acknowledge(self, framework_id: str, task_id: str, uuid_: bytes) -> None:
        key = (framework_id, task_id)
        record = self.records.get(key)
        if record is None or not self.updates.acknowledged(record, uuid_):
            return  # a duplicate acknowledgement
        if record.terminal and not record.updates and key not in self.executors:
            del self.records[key]
            self.checkpoint.remove_task(framework_id, task_id)
        else:
            self.checkpoint.save_task(record)
            self.updates.send_head(record)

    # -- the master --------------------------------------------------------------

    def register_message(self) -> pb.AgentMessage:
        info = pb.AgentInfo(agent_id=self.agent_id, hostname=self.hostname,
                            address=self.address, resources=self.total_resources(),
                            attributes=attributes_to_pb(self.attributes))
        tasks = [
            pb.AgentTask(
                framework=json_format.ParseDict(r.framework, pb.FrameworkInfo(),
                                                ignore_unknown_fields=True),
                task=json_format.ParseDict(r.task, pb.TaskInfo(), ignore_unknown_fields=True),
                state=pb.TaskState.Value(r.state))
            for r in self.records.values() if not r.terminal]
        return pb.AgentMessage(register=pb.AgentMessage.Register(info=info, tasks=tasks))

    async def _connect_loop(self) -> None:
        while True:
            self._leader_changed.clear()
            try:
                leader = await registry.leading_master(self.coord, self.options.cluster)
            except CoordError as exc:
                log.warning("cannot read the leading master: %s", exc)
                leader = None
            if leader:
                try:
                    await self._attach(leader)
                except grpc.aio.AioRpcError as exc:
                    self._log_lost(leader, f"{exc.code().name} {exc.details()}")
                except (TimeoutError, ConnectionError, CoordError) as exc:
                    self._log_lost(leader, str(exc))
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # we are closing
                    log.info("stream to master=%s was cancelled", leader)
                except Exception:
                    log.exception("stream to master=%s failed", leader)
                finally:
                    self.registered.clear()
                    self.updates.detached()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._leader_changed.wait(), _RECONNECT_DELAY)

    def _election_changed(self, contenders: list[str]) -> None:
        self._contenders = len(contenders)
        self._leader_changed.set()

    def _log_lost(self, leader: str, why: str) -> None:
        """INFO once per distinct failure, DEBUG while it repeats (retries are frequent)."""
        level = logging.DEBUG if why == self._last_failure else logging.INFO
        self._last_failure = why
        log.log(level, "stream to master=%s ended: %s", leader, why)

    async def _attach(self, leader: str) -> None:
        outbox: Outbox = asyncio.Queue()
        outbox.put_nowait(self.register_message())

        async def messages() -> AsyncIterator[pb.AgentMessage]:
            while (message := await outbox.get()) is not None:
                yield message

        async with grpc.aio.insecure_channel(leader) as channel:
            call = pb_grpc.MasterStub(channel).Attach(messages())
            try:
                first = await asyncio.wait_for(call.read(), _REGISTER_TIMEOUT)
                if not isinstance(first, pb.MasterMessage) or not first.HasField("registered"):
                    raise ConnectionError(f"master {leader} did not register us: {first}")
                self._registered(first.registered)
                self._last_failure = ""
                self.registered.set()
                self.updates.attached(outbox, list(self.records.values()))
                interval = first.registered.heartbeat_interval_seconds or 1.0
                beats = self._spawn(self._heartbeat(outbox, interval), "heartbeat")
                try:
                    await self._read(call, leader, interval)
                finally:
                    beats.cancel()
            finally:
                outbox.put_nowait(None)
                call.cancel()

    def _registered(self, registered: pb.MasterMessage.Registered) -> None:
        if registered.agent_id != self.agent_id:
            if self.agent_id:
                log.warning("master gave a new agent id old=%s new=%s", self.agent_id,
                            registered.agent_id)
            self.agent_id = registered.agent_id
            self.checkpoint.save_agent_id(self.agent_id)
            for executor in self.executors.values():
                executor.agent_id = self.agent_id
        log.info("registered id=%s", self.agent_id)

    async def _heartbeat(self, outbox: Outbox, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            outbox.put_nowait(pb.AgentMessage(heartbeat=pb.AgentMessage.Heartbeat()))

    async def _read(self, call: Any, leader: str, interval: float) -> None:
        """Handle the master's messages until the stream ends, the master stays silent, or
        another master leads. One read is outstanding at a time and never cancelled while
        the stream is in use (cancelling a read cancels the whole call)."""
        silence = max(5 * interval, 3.0)
        loop = asyncio.get_running_loop()
        last_heard = loop.time()
        reading: asyncio.Future[Any] | None = None
        try:
            while True:
                reading = reading or asyncio.ensure_future(call.read())
                changed = asyncio.ensure_future(self._leader_changed.wait())
                done, _ = await asyncio.wait({reading, changed},
                                             timeout=last_heard + silence - loop.time(),
                                             return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if reading in done:
                    message, reading = reading.result(), None
                    if message is grpc.aio.EOF:
                        raise ConnectionError(f"master {leader} closed the stream")
                    last_heard = loop.time()
                    self._handle(message)
                elif not done:
                    raise TimeoutError(f"master {leader} silent for {silence}s")
                else:
                    self._leader_changed.clear()
                    leading = await registry.leading_master(self.coord, self.options.cluster)
                    if leading != leader:
                        log.info("the leading master changed from=%s to=%s", leader, leading)
                        self._leader_changed.set()
                        return
                    log.info("the election changed, its leader did not master=%s "
                             "contenders=%s", leader, self._contenders)
        finally:
            if reading is not None:
                reading.cancel()

    def _handle(self, message: pb.MasterMessage) -> None:
        kind = message.WhichOneof("message")
        if kind == "run_task":
            self.run_task(message.run_task.framework, message.run_task.task)
        elif kind == "kill_task":
            kill = message.kill_task
            reason = pb.StatusReason.Name(kill.reason) if kill.reason else \
                "REASON_KILLED_BY_FRAMEWORK"
            self.kill_task(kill.framework_id, kill.task_id, kill.grace_period_seconds, reason)
        elif kind == "acknowledge":
            ack = message.acknowledge
            self.acknowledge(ack.framework_id, ack.task_id, ack.uuid)
        elif kind == "checkpoint_resources":
            resources = list(message.checkpoint_resources.resources)
            self.checkpoint.save_resources([_to_dict(r) for r in resources])
            self._sync_volumes()
        elif kind == "shutdown_framework":
            framework_id = message.shutdown_framework.framework_id
            log.info("shutting down framework=%s", framework_id)
            for fid, tid in [k for k in self.executors if k[0] == framework_id]:
                self.kill_task(fid, tid, 0, "REASON_FRAMEWORK_REMOVED")
        elif kind == "registered":
            self._registered(message.registered)


async def run_agent(options: AgentOptions) -> None:
    """Run an agent until SIGTERM or SIGINT (its tasks keep running)."""
    agent = Agent(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
        await stop.wait()
    finally:
        await agent.close()


@click.command("agent")
@click.option("--zk", envvar="RINGSTORE_ZK", required=True,
              help="ZooKeeper connect string host:port[,...][/chroot].")
@click.option("--cluster", envvar="RINGSTORE_CLUSTER", default="default", show_default=True)
@click.option("--work-dir", envvar="RINGSTORE_WORK_DIR", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints, sandboxes and volumes.")
@click.option("--resources", envvar="RINGSTORE_RESOURCES", show_default=True,
              default="cpus:2;mem:4096;disk:20000;ports:[31000-31999]")
@click.option("--attributes", envvar="RINGSTORE_ATTRIBUTES", default="", help="e.g. zone:a")
@click.option("--listen", envvar="RINGSTORE_LISTEN", default="127.0.0.1:0", show_default=True,
              help="HOST:PORT of the Agent service (port 0: any free port).")
@click.option("--hostname", default="", help="Hostname to report (default: this host's).")
@click.option("--status-retry-interval", type=click.FloatRange(0.05, 60), default=1.0,
              show_default=True, help="Seconds between resends of an unacknowledged update.")
@click.option("--kill-grace", type=click.FloatRange(0, 600), default=3.0, show_default=True,
              help="Default seconds between SIGTERM and SIGKILL.")
@click.option("--session-timeout", type=click.FloatRange(1.0, 60.0), default=4.0,
              show_default=True, help="ZooKeeper session timeout in seconds.")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug.")
def command(zk: str, cluster: str, work_dir: Path, resources: str, attributes: str,
            listen: str, hostname: str, status_retry_interval: float, kill_grace: float,
            session_timeout: float, verbose: int) -> None:
    """Run an agent until SIGTERM (its tasks keep running and are recovered on restart)."""
    # Checked before anything is configured or created: a malformed flag changes nothing.
    for flag, check, value, example in (
            ("--resources", Resources.parse, resources, "cpus:2;mem:4096;ports:[31000-31999]"),
            ("--attributes", parse_attributes, attributes, "zone:a;rack:r1")):
        try:
            check(value)
        except ResourceError as exc:
            reason = " ".join(str(exc).split())
            click.echo(f"error: {flag} {value!r} is malformed: {reason}; "
                       f"write it like {example!r}", err=True)
            raise click.exceptions.Exit(2) from None
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    options = AgentOptions(zk=zk, cluster=cluster, work_dir=work_dir, resources=resources,
                           attributes=attributes, listen=listen, hostname=hostname,
                           status_retry_interval=status_retry_interval,
                           kill_grace=kill_grace, session_timeout=session_timeout)
    try:
        asyncio.run(run_agent(options))
    except CoordError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    command()
