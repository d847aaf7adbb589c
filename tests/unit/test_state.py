"""The master's state machine, fed events at explicit times; its actions are asserted."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as hs

from scheduler import state as st
from scheduler.resources import Resource, Resources, Volume

R = Resources.parse
AGENT = "cpus:4;mem:4096;disk:1000;ports:[31000-31009]"
CONFIG = st.StateConfig(agent_timeout=5, agent_reregister_timeout=30, offer_timeout=60,
                        id_prefix="t")


def machine() -> st.MasterState:
    return st.MasterState(CONFIG)


def add_agent(s: st.MasterState, conn: int = 1, total: str = AGENT, now: float = 0,
              agent_id: str = "", reports: tuple[st.AgentTaskReport, ...] = ()
              ) -> tuple[str, list[st.Action]]:
    actions = s.register_agent(conn, agent_id, f"host{conn}", f"127.0.0.1:{conn}", R(total),
                               {"zone": "a"}, list(reports), now)
    registered = [a for a in actions if isinstance(a, st.ToAgent)
                  and isinstance(a.message, st.Registered)]
    assert len(registered) == 1
    return registered[0].agent_id, actions


def add_framework(s: st.MasterState, conn: int = 100, framework_id: str = "",
                  role: str = "web", now: float = 0, failover: float = 10
                  ) -> tuple[str, str]:
    actions = s.subscribe(conn, framework_id, "fw", role, "", failover, b"info", now)
    subscribed = [a.event for a in actions if isinstance(a, st.ToFramework)
                  and isinstance(a.event, st.Subscribed)]
    assert len(subscribed) == 1
    return subscribed[0].framework_id, subscribed[0].stream_id


def offers(actions: list[st.Action], framework_id: str | None = None) -> list[st.Offer]:
    return [o for a in actions if isinstance(a, st.ToFramework)
            and isinstance(a.event, st.Offers)
            and (framework_id is None or a.framework_id == framework_id)
            for o in a.event.offers]


def updates(actions: list[st.Action], task_id: str | None = None) -> list[st.Status]:
    return [a.event.status for a in actions if isinstance(a, st.ToFramework)
            and isinstance(a.event, st.Update)
            and (task_id is None or a.event.status.task_id == task_id)]


def to_agent(actions: list[st.Action], kind: type[Any]) -> list[Any]:
    return [a.message for a in actions if isinstance(a, st.ToAgent)
            and isinstance(a.message, kind)]


def launch(*tasks: tuple[str, str]) -> st.Launch:
    return st.Launch(tuple(st.TaskSpec(t, "", R(r), t.encode()) for t, r in tasks))


def snapshot(s: st.MasterState) -> Any:
    return (sorted(s.offers), {a.agent_id: (str(a.total), str(a.used), str(a.offered))
                               for a in s.agents.values()},
            sorted((k, t.state) for k, t in s.tasks.items()),
            {f.framework_id: (str(f.used), str(f.offered)) for f in s.frameworks.values()})


def running(s: st.MasterState, agent_id: str, fid: str, task_id: str, now: float = 1
            ) -> list[st.Action]:
    return s.agent_update(agent_id, st.Status(task_id, fid, agent_id, "TASK_RUNNING",
                                              source="SOURCE_AGENT", uuid=b"u1"), now)


@pytest.fixture
def launched() -> tuple[st.MasterState, str, str, str]:
    """One agent, one framework, task t1 (cpus:1;mem:512) RUNNING."""
    s = machine()
    agent_id, _ = add_agent(s)
    fid, sid = add_framework(s)
    offer = offers(s.allocate(0), fid)[0]
    s.accept(fid, sid, [offer.offer_id], [launch(("t1", "cpus:1;mem:512"))], 0, 0)
    running(s, agent_id, fid, "t1")
    return s, agent_id, fid, sid


def test_admission_assigns_an_id_and_writes_the_registry() -> None:
    s = machine()
    agent_id, actions = add_agent(s)
    assert agent_id and s.agents[agent_id].connected
    writes = [a for a in actions if isinstance(a, st.WriteAgent)]
    assert writes == [st.WriteAgent(agent_id, {
        "hostname": "host1", "address": "127.0.0.1:1", "attributes": {"zone": "a"},
        "registered_at": 0, "tasks": [], "doomed": []})]
    other, _ = add_agent(s, conn=2)
    assert other != agent_id


def test_offers_free_resources_once_and_launch_charges_them() -> None:
    s = machine()
    agent_id, _ = add_agent(s)
    fid, sid = add_framework(s)
    [offer] = offers(s.allocate(0), fid)
    assert offer.resources == R(AGENT) and offer.agent_id == agent_id
    assert offers(s.allocate(0.1)) == []  # everything is offered already
    actions = s.accept(fid, sid, [offer.offer_id],
                       [launch(("t1", "cpus:1;mem:512;ports:[31000-31000]"))], 5, 1)
    [run] = to_agent(actions, st.RunTask)
    assert (run.task_id, run.framework_id, run.task_info) == ("t1", fid, b"t1")
    assert s.tasks[(fid, "t1")].state == "TASK_STAGING"
    agent = s.agents[agent_id]
    assert agent.used == R("cpus:1;mem:512;ports:[31000-31000]")
    assert agent.offered == R("")
    write = next(a for a in actions if isinstance(a, st.WriteAgent))
    assert write.data is not None and write.data["tasks"] == [
        {"framework_id": fid, "task_id": "t1"}]
    # The leftovers are filtered for 5 s, then offered again.
    assert offers(s.allocate(3)) == []
    [again] = offers(s.allocate(6.5), fid)
    assert again.resources == R(AGENT) - agent.used


@pytest.mark.parametrize(("offer_ids", "operation", "error", "words"), [
    (None, launch(("big", "cpus:5")), st.InvalidArgument, "big"),
    (None, launch(("a", "cpus:3"), ("b", "cpus:2")), st.InvalidArgument, "b asks"),
    (None, launch(("p", "cpus:1;ports:[40000-40000]")), st.InvalidArgument, "ports"),
    (None, launch(("t1", "cpus:1")), st.InvalidArgument, "already used"),
    (None, launch(("d", "cpus:1"), ("d", "cpus:1")), st.InvalidArgument, "already used"),
    (["nope"], launch(("x", "cpus:1")), st.NotFound, "unknown offer"),
    (None, st.Launch((st.TaskSpec("x", "ghost", R("cpus:1"), b""),)), st.NotFound,
     "unknown agent"),
    (None, st.Reserve(R("cpus:1", role="other")), st.InvalidArgument, "role"),
    (None, st.Unreserve(R("cpus:1", role="web")), st.InvalidArgument, "unreserve"),
])
def test_a_bad_accept_changes_nothing(launched: tuple[st.MasterState, str, str, str],
                                      offer_ids: list[str] | None, operation: st.Operation,
                                      error: type[st.CallError], words: str) -> None:
    s, _, fid, sid = launched
    [offer] = offers(s.allocate(10), fid)
    before = snapshot(s)
    with pytest.raises(error) as caught:
        s.accept(fid, sid, offer_ids or [offer.offer_id], [operation], 0, 11)
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert snapshot(s) == before
    # The offer is still good.
    actions = s.accept(fid, sid, [offer.offer_id], [launch(("ok", "cpus:1"))], 0, 12)
    assert [m.task_id for m in to_agent(actions, st.RunTask)] == ["ok"]


def test_offers_of_another_framework_or_two_agents_are_refused() -> None:
    s = machine()
    add_agent(s, conn=1)
    add_agent(s, conn=2)
    a, asid = add_framework(s, conn=100)
    b, _ = add_framework(s, conn=101)
    made = offers(s.allocate(0))
    mine = [o.offer_id for o in made if o.framework_id == a]
    theirs = [o.offer_id for o in made if o.framework_id == b]
    assert mine and theirs
    with pytest.raises(st.InvalidArgument, match="another framework"):
        s.accept(a, asid, theirs, [], 0, 1)
    s.suppress(b, s.frameworks[b].stream_id)
    s.decline(b, s.frameworks[b].stream_id, theirs, 0, 1)
    made = offers(s.allocate(2), a)
    assert len(made) + len(mine) == 2
    with pytest.raises(st.InvalidArgument, match="more than one agent"):
        s.accept(a, asid, mine + [o.offer_id for o in made], [], 0, 3)


def test_terminal_update_frees_resources_and_is_forwarded(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, _ = launched
    actions = s.agent_update(agent_id, st.Status(
        "t1", fid, agent_id, "TASK_FAILED", source="SOURCE_AGENT",
        reason="REASON_COMMAND_EXITED", uuid=b"u2", exit_code=3), 2)
    [status] = updates(actions, "t1")
    assert status.exit_code == 3 and status.uuid == b"u2"
    assert (fid, "t1") not in s.tasks and s.completed[(fid, "t1")].state == "TASK_FAILED"
    assert s.agents[agent_id].used == R("")
    assert s.frameworks[fid].used == R("")


def test_a_task_id_is_not_reused_after_its_task_ended(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, sid = launched
    s.agent_update(agent_id, st.Status("t1", fid, agent_id, "TASK_FAILED", uuid=b"u2"), 2)
    [offer] = offers(s.allocate(10), fid)
    before = snapshot(s)
    with pytest.raises(st.InvalidArgument, match="not reused") as caught:
        s.accept(fid, sid, [offer.offer_id], [launch(("t1", "cpus:1"))], 0, 11)
    assert "\n" not in str(caught.value)
    assert snapshot(s) == before and s.completed[(fid, "t1")].state == "TASK_FAILED"
    # The agent resends the old FAILED: it still names the old task, and changes nothing.
    s.agent_update(agent_id, st.Status("t1", fid, agent_id, "TASK_FAILED", uuid=b"u2"), 12)
    assert snapshot(s) == before


@pytest.mark.parametrize("task_id", ["..", ".", "a/b", "x" * 256, "nul\0"])
def test_a_task_id_that_cannot_name_a_sandbox_is_refused(
        launched: tuple[st.MasterState, str, str, str], task_id: str) -> None:
    s, _, fid, sid = launched
    [offer] = offers(s.allocate(10), fid)
    before = snapshot(s)
    with pytest.raises(st.InvalidArgument, match="cannot name a sandbox") as caught:
        s.accept(fid, sid, [offer.offer_id], [launch((task_id, "cpus:1"))], 0, 11)
    assert "\n" not in str(caught.value)
    assert snapshot(s) == before


def test_update_for_a_departed_framework_is_acknowledged_by_the_master() -> None:
    s = machine()
    agent_id, _ = add_agent(s)
    actions = s.agent_update(agent_id, st.Status("t", "gone", agent_id, "TASK_RUNNING",
                                                 uuid=b"u"), 1)
    assert to_agent(actions, st.Acknowledge) == [st.Acknowledge("gone", "t", b"u")]


def test_acknowledge_is_forwarded(launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, sid = launched
    actions = s.acknowledge(fid, sid, agent_id, "t1", b"u1")
    assert actions == [st.ToAgent(agent_id, st.Acknowledge(fid, "t1", b"u1"))]


def test_agent_unreachable_then_back_reports_running_without_relaunch(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, _ = launched
    [offer] = offers(s.allocate(10), fid)
    actions = s.agent_disconnected(1, 11)
    [status] = updates(actions, "t1")
    assert (status.state, status.source, status.uuid) == ("TASK_UNREACHABLE", "SOURCE_MASTER",
                                                          b"")
    assert [a for a in actions if isinstance(a, st.ToFramework)
            and isinstance(a.event, st.Rescind)] == [
        st.ToFramework(fid, st.Rescind(offer.offer_id))]
    assert offers(s.allocate(12)) == []
    report = st.AgentTaskReport(fid, b"info", "web", "t1", b"t1", R("cpus:1;mem:512"),
                                "TASK_RUNNING")
    again, actions = add_agent(s, conn=2, agent_id=agent_id, now=20, reports=(report,))
    assert again == agent_id
    assert to_agent(actions, st.RunTask) == []
    [status] = updates(actions, "t1")
    assert (status.state, status.source) == ("TASK_RUNNING", "SOURCE_MASTER")
    assert s.agents[agent_id].used == R("cpus:1;mem:512")
    assert s.tick(24) == []  # nothing expires: it is back


def test_agent_silent_then_removed_reports_lost_and_failure(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, _ = launched
    s.agent_heartbeat(agent_id, 4)
    assert s.tick(8.9) == []
    actions = s.tick(9.5)
    assert st.CloseAgentConn(1) in actions
    assert [u.state for u in updates(actions)] == ["TASK_UNREACHABLE"]
    assert s.tick(39) == []
    actions = s.tick(40)
    [lost] = updates(actions, "t1")
    assert (lost.state, lost.reason) == ("TASK_LOST", "REASON_AGENT_REMOVED")
    assert st.ToFramework(fid, st.Failure(agent_id)) in actions
    assert st.WriteAgent(agent_id, st.tombstone(40)) in actions
    assert agent_id not in s.agents
    # It comes back after all: a new id, and its tasks are killed.
    report = st.AgentTaskReport(fid, b"", "web", "t1", b"", R("cpus:1"), "TASK_RUNNING")
    new_id, actions = add_agent(s, conn=3, agent_id=agent_id, now=50, reports=(report,))
    assert new_id != agent_id
    assert [m.task_id for m in to_agent(actions, st.KillTask)] == ["t1"]
    # Until the agent says it ended, the doomed task's resources are not offered.
    [offer] = offers(s.allocate(51), fid)
    assert offer.resources == R(AGENT) - R("cpus:1")
    killed = st.Status("t1", fid, new_id, "TASK_KILLED", source="SOURCE_AGENT", uuid=b"k")
    actions = s.agent_update(new_id, killed, 52)
    assert actions == [st.ToAgent(new_id, st.Acknowledge(fid, "t1", b"k"))]  # not forwarded
    assert s.agents[new_id].used == R("") and (fid, "t1") not in s.tasks


def test_a_newer_stream_of_the_same_agent_replaces_the_old(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, _ = launched
    report = st.AgentTaskReport(fid, b"", "web", "t1", b"", R(""), "TASK_RUNNING")
    _, actions = add_agent(s, conn=2, agent_id=agent_id, now=2, reports=(report,))
    assert st.CloseAgentConn(1) in actions
    assert updates(actions) == []  # nothing changed for the framework
    assert s.agent_disconnected(1, 3) == []  # the old stream ending is no news
    assert s.agents[agent_id].used == R("cpus:1;mem:512")


def test_task_the_agent_does_not_have_is_lost_after_an_agent_timeout(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, _, _ = launched
    _, actions = add_agent(s, conn=2, agent_id=agent_id, now=2)
    assert updates(actions) == []
    s.agent_heartbeat(agent_id, 6.5)
    assert s.tick(6.9) == []
    [status] = updates(s.tick(7.1), "t1")
    assert (status.state, status.reason) == ("TASK_LOST", "REASON_AGENT_RESTARTED")
    assert s.agents[agent_id].used == R("")


def test_task_that_ended_while_apart_is_reported_by_the_agent_not_lost(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, _ = launched
    add_agent(s, conn=2, agent_id=agent_id, now=2)
    s.agent_update(agent_id, st.Status("t1", fid, agent_id, "TASK_FINISHED", uuid=b"u9"), 3)
    s.agent_heartbeat(agent_id, 9)
    assert s.tick(10) == []
    assert s.completed[(fid, "t1")].state == "TASK_FINISHED"


def test_framework_failover_and_stale_stream(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, _, fid, sid = launched
    actions = s.subscribe(200, fid, "fw", "web", "", 10, b"info", 5)
    assert any(isinstance(a, st.CloseFrameworkConn) and a.conn == 100 for a in actions)
    new_sid = s.frameworks[fid].stream_id
    assert new_sid != sid
    with pytest.raises(st.FailedPrecondition):
        s.suppress(fid, sid)
    assert s.framework_disconnected(100, 6) == []  # the old stream's end is no news
    assert s.frameworks[fid].connected
    assert s.frameworks[fid].used == R("cpus:1;mem:512")


def test_failover_timeout_tears_the_framework_down(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, _ = launched
    s.framework_disconnected(100, 10)
    assert not s.frameworks[fid].connected
    s.agent_heartbeat(agent_id, 19)
    assert s.tick(20) == []
    actions = s.tick(20.5)
    assert st.ToAgent(agent_id, st.ShutdownFramework(fid)) in actions
    assert st.WriteFramework(fid, st.tombstone(20.5)) in actions
    assert fid not in s.frameworks and (fid, "t1") not in s.tasks
    # Its task's resources stay taken until the agent has killed it.
    assert s.agents[agent_id].used == R("cpus:1;mem:512")
    actions = s.agent_update(agent_id, st.Status("t1", fid, agent_id, "TASK_KILLED",
                                                 uuid=b"k"), 21)
    assert actions == [st.ToAgent(agent_id, st.Acknowledge(fid, "t1", b"k"))]
    assert s.agents[agent_id].used == R("")
    with pytest.raises(st.FailedPrecondition, match="removed"):
        s.subscribe(300, fid, "fw", "web", "", 10, b"", 21)


def test_teardown_closes_the_stream(launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, sid = launched
    actions = s.teardown(fid, sid, 3)
    assert st.CloseFrameworkConn(100, "framework torn down") in actions
    assert st.ToAgent(agent_id, st.ShutdownFramework(fid)) in actions
    assert not s.tasks


def test_offer_timeout_rescinds() -> None:
    s = machine()
    add_agent(s)
    fid, _ = add_framework(s)
    [offer] = offers(s.allocate(0), fid)
    s.agent_heartbeat(offer.agent_id, 58)
    assert s.tick(59) == []
    assert s.tick(61) == [st.ToFramework(fid, st.Rescind(offer.offer_id))]
    assert s.agents[offer.agent_id].offered == R("")


def test_suppress_and_revive() -> None:
    s = machine()
    add_agent(s)
    fid, sid = add_framework(s)
    s.suppress(fid, sid)
    assert offers(s.allocate(0)) == []
    s.revive(fid, sid)
    assert len(offers(s.allocate(1), fid)) == 1


def test_decline_filters_until_refuse_seconds() -> None:
    s = machine()
    add_agent(s)
    fid, sid = add_framework(s)
    [offer] = offers(s.allocate(0), fid)
    s.decline(fid, sid, [offer.offer_id, "already-gone"], 2, 0)
    assert offers(s.allocate(1.9)) == []
    assert len(offers(s.allocate(2.1), fid)) == 1


def test_kill_and_reconcile(launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, sid = launched
    with pytest.raises(st.NotFound):
        s.kill(fid, sid, "ghost", "", 0, 1)
    actions = s.kill(fid, sid, "t1", agent_id, 2, 1)
    assert actions == [st.ToAgent(agent_id, st.KillTask(fid, "t1", 2))]
    implicit = updates(s.reconcile(fid, sid, [], 2))
    assert [(u.task_id, u.state, u.reason) for u in implicit] == [
        ("t1", "TASK_RUNNING", "REASON_RECONCILIATION")]
    explicit = updates(s.reconcile(fid, sid, [("t1", agent_id), ("ghost", "")], 2))
    assert [(u.task_id, u.state) for u in explicit] == [
        ("t1", "TASK_RUNNING"), ("ghost", "TASK_UNKNOWN")]


def test_recovery_from_the_registry(launched: tuple[st.MasterState, str, str, str]) -> None:
    old, agent_id, fid, _ = launched
    agents = {a.agent_id: w.data for a in old.agents.values()
              for w in [old._agent_entry(a)] if w.data is not None}
    frameworks = {f.framework_id: w.data for f in old.frameworks.values()
                  for w in [old._framework_entry(f)] if w.data is not None}
    s = machine()
    s.recover(agents, frameworks, 100)
    assert s.frameworks[fid].info == b"info" and not s.frameworks[fid].connected
    assert s.agents[agent_id].recovering
    # The framework comes back with its id; tasks of a missing agent get no answer yet.
    _, new_sid = add_framework(s, conn=7, framework_id=fid, now=101)
    assert updates(s.reconcile(fid, new_sid, [("t1", agent_id)], 101)) == []
    report = st.AgentTaskReport(fid, b"info", "web", "t1", b"t1", R("cpus:1;mem:512"),
                                "TASK_RUNNING")
    _, actions = add_agent(s, conn=8, agent_id=agent_id, now=102, reports=(report,))
    assert updates(actions) == [] and to_agent(actions, st.RunTask) == []
    assert s.agents[agent_id].used == R("cpus:1;mem:512")
    assert s.frameworks[fid].used == R("cpus:1;mem:512")
    assert [u.state for u in updates(s.reconcile(fid, new_sid, [], 103))] == ["TASK_RUNNING"]


def test_recovered_agent_that_never_returns_is_lost() -> None:
    s = machine()
    s.recover({"a1": {"hostname": "h", "tasks": [{"framework_id": "f", "task_id": "t"}]}},
              {"f": {"name": "fw", "role": "web", "failover_timeout": 1000}}, 0)
    s.subscribe(1, "f", "fw", "web", "", 1000, b"", 1)
    actions = s.tick(31)
    assert [(u.task_id, u.state) for u in updates(actions)] == [("t", "TASK_LOST")]
    assert st.WriteAgent("a1", st.tombstone(31)) in actions


def test_reserve_and_create_change_the_agent_total() -> None:
    s = machine()
    agent_id, _ = add_agent(s)
    fid, sid = add_framework(s, role="db")
    [offer] = offers(s.allocate(0), fid)
    volume = Resources.of([Resource("disk", 100, (), "db", "", Volume("v1", "data"))])
    actions = s.accept(fid, sid, [offer.offer_id], [
        st.Reserve(R("cpus:1;mem:256;disk:100", role="db")),
        st.Create(volume),
        launch(("t1", "cpus:1;mem:256")),
    ], 0, 1)
    [checkpoint] = to_agent(actions, st.CheckpointResources)
    total = s.agents[agent_id].total
    assert checkpoint.resources == total
    assert total.reserved("db").contains(volume)
    assert total.unreserved() == R(AGENT) - R("cpus:1;mem:256;disk:100")
    # The volume and the rest of the reservation are offered to the role again.
    [again] = offers(s.allocate(1), fid)
    assert again.resources.contains(volume)
    actions = s.accept(fid, sid, [again.offer_id], [st.Destroy(volume)], 0, 2)
    assert not to_agent(actions, st.CheckpointResources)[0].resources.volumes()


# ------------------------------------------------------------------ properties

Key = tuple[str, str]


class World:
    """A master (replaced at each failover, from the registry its predecessor wrote), two
    agents and two frameworks. The agents run what the master's messages say: a task is
    held from its RunTask until it finishes or a KillTask is carried out, and updates made
    while an agent is away are sent when it is back."""

    def __init__(self) -> None:
        self.s = machine()
        self.registry = Registry()
        self.terms = 0
        self.conn = 0
        self.held: list[dict[Key, Resources]] = [{}, {}]
        self.ids = ["", ""]
        self.conns: list[int | None] = [None, None]
        self.killing: list[set[Key]] = [set(), set()]
        self.outbox: list[list[st.Status]] = [[], []]
        self.frameworks: list[tuple[str, str]] = []
        self.ended: set[Key] = set()  # tasks a framework was told are over
        for i in range(2):
            self.register(i, 0)
        for _ in range(2):
            self.frameworks.append(self.subscribe("", 0))

    def next_conn(self) -> int:
        self.conn += 1
        return self.conn

    def subscribe(self, framework_id: str, now: float) -> tuple[str, str]:
        try:
            actions = self.s.subscribe(self.next_conn(), framework_id, "fw", "web", "", 10,
                                       b"info", now)
        except st.FailedPrecondition:  # removed: a new framework takes its place
            actions = self.s.subscribe(self.next_conn(), "", "fw", "web", "", 10, b"", now)
        [subscribed] = [a.event for a in actions if isinstance(a, st.ToFramework)
                        and isinstance(a.event, st.Subscribed)]
        self.apply(actions)
        return subscribed.framework_id, subscribed.stream_id

    def connected(self, i: int) -> st.Agent | None:
        agent = self.s.agents.get(self.ids[i])
        if agent is None or self.conns[i] is None or agent.conn != self.conns[i]:
            return None
        return agent

    def apply(self, actions: list[st.Action]) -> None:
        """Carry out the master's actions as the daemon and the agents would."""
        self.registry.apply(actions)
        for action in actions:
            if isinstance(action, st.ToFramework) and isinstance(action.event, st.Update) \
                    and action.event.status.state in st.TERMINAL_STATES:
                self.ended.add((action.framework_id, action.event.status.task_id))
            if not isinstance(action, st.ToAgent):
                continue
            i = next((i for i in range(2) if self.ids[i] == action.agent_id), None)
            if i is None or self.connected(i) is None:
                continue  # no stream: dropped
            message = action.message
            key = (getattr(message, "framework_id", ""), getattr(message, "task_id", ""))
            if isinstance(message, st.RunTask):
                self.held[i][key] = self.s.tasks[key].resources
            elif isinstance(message, st.KillTask) and key in self.held[i]:
                self.killing[i].add(key)
            elif isinstance(message, st.ShutdownFramework):
                self.killing[i] |= {k for k in self.held[i] if k[0] == message.framework_id}

    def register(self, i: int, now: float) -> list[st.Action]:
        reports = [st.AgentTaskReport(k[0], b"", "web", k[1], b"", r, "TASK_RUNNING")
                   for k, r in sorted(self.held[i].items())]
        self.conns[i] = self.next_conn()
        actions = self.s.register_agent(self.conns[i], self.ids[i], f"h{i}", "", R(AGENT_TOTAL),
                                        {}, reports, now)
        [registered] = to_agent(actions, st.Registered)
        self.ids[i] = registered.agent_id
        self.apply(actions)
        for status in self.outbox[i]:
            self.apply(self.s.agent_update(self.ids[i], status, now))
        self.outbox[i] = []
        return actions

    def end(self, i: int, key: Key, state: str, now: float) -> None:
        """Task `key` on agent `i` ends: its update goes now, or when the agent is back."""
        del self.held[i][key]
        self.killing[i].discard(key)
        status = st.Status(key[1], key[0], self.ids[i], state, source="SOURCE_AGENT",
                           uuid=f"{key}{state}".encode())
        if self.connected(i) is not None:
            self.apply(self.s.agent_update(self.ids[i], status, now))
        else:
            self.outbox[i].append(status)

    def failover(self, now: float) -> None:
        self.terms += 1
        self.s, actions = self.registry.successor(now, prefix=f"n{self.terms}")
        self.apply(actions)
        self.frameworks = [self.subscribe(fid, now) for fid, _ in self.frameworks]
        for i in range(2):
            if self.conns[i] is not None:  # its stream ended with the old master
                self.register(i, now)

    def check(self) -> None:
        s = self.s
        for agent in s.agents.values():
            assert agent.total.contains(agent.used + agent.offered), (agent.used, agent.offered)
            assert agent.used == _sum([*(s.tasks[k].resources for k in agent.task_keys),
                                       *agent.doomed.values()])
            assert agent.offered == _sum(o.resources for o in s.offers.values()
                                         if o.agent_id == agent.agent_id)
        for framework in s.frameworks.values():
            mine_used = _sum(t.resources for t in s.tasks.values()
                             if t.framework_id == framework.framework_id)
            assert framework.used == _scalars(mine_used)
            assert framework.offered == _scalars(_sum(
                o.resources for o in s.offers.values()
                if o.framework_id == framework.framework_id))
        # A task the framework was told is over never comes back to life.
        assert not self.ended & set(s.tasks), self.ended & set(s.tasks)
        for i in range(2):
            agent = self.connected(i)
            if agent is not None:
                # Every process an agent runs is counted on it: its framework's task there,
                # or doomed (being killed). Nothing runs unseen, nothing is counted twice.
                assert set(self.held[i]) == agent.task_keys | set(agent.doomed)
                assert agent.used == _sum(self.held[i].values()), (agent.used, self.held[i])


AGENT_TOTAL = "cpus:4;mem:4096;ports:[31000-31003]"
EVENTS = hs.lists(hs.tuples(
    hs.sampled_from(["allocate", "accept", "finish", "kill", "reap", "decline", "drop",
                     "back", "tick", "bad", "reuse", "suppress", "revive", "failover",
                     "teardown"]),
    hs.integers(0, 2), hs.floats(0.1, 3.0), hs.integers(0, 3)), min_size=20, max_size=60)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENTS)
# The review's scenarios, always run: a KILL while the agent is away; an agent removed,
# then a failover, then its return; a task id reused after its task ended; a teardown
# while a task runs, then a failover while it is being killed.
@example([("accept", 0, 1.0, 0), ("drop", 0, 1.0, 0), ("kill", 0, 1.0, 0),
          ("back", 0, 1.0, 0), ("reap", 0, 1.0, 0)])
@example([("accept", 0, 1.0, 0), ("drop", 0, 1.0, 0), ("tick", 0, 3.0, 0),
          ("tick", 0, 3.0, 0), ("failover", 0, 1.0, 0), ("back", 0, 1.0, 0),
          ("reap", 0, 1.0, 0)])
@example([("accept", 0, 1.0, 0), ("finish", 0, 1.0, 0), ("reuse", 0, 1.0, 0)])
@example([("accept", 0, 1.0, 0), ("teardown", 0, 1.0, 0), ("failover", 0, 1.0, 0),
          ("reap", 0, 1.0, 0)])
def test_the_master_counts_what_the_agents_run_and_failures_change_nothing(
        events: list[tuple[str, int, float, int]]) -> None:
    world = World()
    now, counter = 0.0, 0
    for kind, who, size, port in events:
        now += 1.0
        s = world.s
        fid, sid = world.frameworks[who % 2]
        mine = sorted((o for o in s.offers.values() if o.framework_id == fid),
                      key=lambda o: o.offer_id)
        i = who % 2
        if kind == "allocate":
            world.apply(s.allocate(now))
        elif kind in ("accept", "bad", "reuse"):
            if not mine:
                world.apply(s.allocate(now))
                mine = sorted((o for o in s.offers.values() if o.framework_id == fid),
                              key=lambda o: o.offer_id)
                if not mine:
                    continue
            counter += 1
            task_id = f"t{counter}"
            if kind == "reuse":
                used = sorted(k[1] for k in [*s.tasks, *s.completed] if k[0] == fid)
                task_id = used[port % len(used)] if used else task_id
            spec = f"cpus:{size};mem:{int(size * 700)};ports:[{31000 + port}-{31000 + port}]"
            tasks = [(task_id, spec)]
            if kind == "bad":
                tasks.append((task_id, "cpus:0.1"))  # a duplicate id: all refused
            before = snapshot(s)
            try:
                world.apply(s.accept(fid, sid, [mine[0].offer_id], [launch(*tasks)], 0, now))
                assert kind == "accept" or (kind == "reuse" and task_id == f"t{counter}")
            except st.CallError as exc:
                assert snapshot(s) == before
                if kind == "reuse" and task_id != f"t{counter}":
                    assert isinstance(exc, st.InvalidArgument) and "reused" in str(exc)
        elif kind == "finish":
            live = sorted((j, k) for j in range(2) for k in world.held[j])
            if live:
                j, key = live[port % len(live)]
                world.end(j, key, "TASK_FINISHED", now)
        elif kind == "kill":
            # Also for tasks whose agent is away: the KILL must reach it when it is back.
            live = sorted(s.tasks)
            away = [k for k in live if (a := s.agents.get(s.tasks[k].agent_id)) is None
                    or not a.connected]
            live = away if away and port % 2 == 0 else live
            if live:
                key = live[port % len(live)]
                world.apply(s.kill(key[0], s.frameworks[key[0]].stream_id, key[1], "", 0, now))
        elif kind == "reap":
            for j in range(2):
                for key in sorted(world.killing[j]):
                    world.end(j, key, "TASK_KILLED", now)
        elif kind == "decline" and mine:
            world.apply(s.decline(fid, sid, [mine[0].offer_id], 0, now))
        elif kind == "drop" and world.connected(i) is not None:
            conn, world.conns[i] = world.conns[i], None
            world.apply(s.agent_disconnected(conn or 0, now))
        elif kind == "back":
            for j in range(2):
                if world.connected(j) is None:
                    asked = {k for k in world.held[j] if (t := s.tasks.get(k)) is not None
                             and t.kill is not None and t.agent_id == world.ids[j]}
                    actions = world.register(j, now)
                    assert asked <= {(m.framework_id, m.task_id)
                                     for m in to_agent(actions, st.KillTask)}
        elif kind == "suppress":
            s.suppress(fid, sid)
        elif kind == "revive":
            s.revive(fid, sid)
        elif kind == "tick":
            now += 10 * size  # up to 30 s: agents away that long are removed
            for j in range(2):
                if world.connected(j) is not None:
                    s.agent_heartbeat(world.ids[j], now)
            world.apply(s.tick(now))
        elif kind == "failover":
            world.failover(now)
        elif kind == "teardown":
            world.apply(s.teardown(fid, sid, now))
            world.frameworks[who % 2] = world.subscribe("", now)
        world.check()


def _scalars(resources: Resources) -> Resources:
    return Resources.of(r for r in resources if not r.ranges)


def _sum(items: Any) -> Resources:
    total = Resources()
    for item in items:
        total = total + item
    return total


def test_reservations_the_agent_missed_are_checkpointed_again() -> None:
    s = machine()
    agent_id, _ = add_agent(s)
    fid, sid = add_framework(s, role="db")
    [offer] = offers(s.allocate(0), fid)
    s.accept(fid, sid, [offer.offer_id], [st.Reserve(R("cpus:1;disk:100", role="db"))], 0, 1)
    ours = s.agents[agent_id].total
    # The agent comes back without the reservation (the message was lost on the way).
    _, actions = add_agent(s, conn=2, agent_id=agent_id, now=2)
    assert to_agent(actions, st.CheckpointResources) == [st.CheckpointResources(ours)]
    assert s.agents[agent_id].total == ours
    # With it, nothing is resent.
    _, actions = add_agent(s, conn=3, agent_id=agent_id, now=3, total=str(ours))
    assert to_agent(actions, st.CheckpointResources) == []
    # A bigger machine keeps the reservation and gains capacity.
    bigger = str(R("cpus:8;mem:4096;disk:1000;ports:[31000-31009]"))
    _, actions = add_agent(s, conn=4, agent_id=agent_id, now=4, total=bigger)
    [checkpoint] = to_agent(actions, st.CheckpointResources)
    assert checkpoint.resources.reserved("db") == R("cpus:1;disk:100", role="db")
    assert checkpoint.resources.scalar("cpus") == 8


# ------------------------------------------------------------------ registry and failover


class Registry:
    """The registry as the master's writes leave it (what a new leader reads)."""

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.frameworks: dict[str, dict[str, Any]] = {}

    def apply(self, actions: list[st.Action]) -> list[st.Action]:
        for action in actions:
            if isinstance(action, st.WriteAgent | st.WriteFramework):
                entries = self.agents if isinstance(action, st.WriteAgent) else self.frameworks
                name = (action.agent_id if isinstance(action, st.WriteAgent)
                        else action.framework_id)
                if action.data is None:
                    entries.pop(name, None)
                else:
                    entries[name] = action.data
        return actions

    def successor(self, now: float, prefix: str = "n") -> tuple[st.MasterState, list[st.Action]]:
        s = st.MasterState(st.StateConfig(agent_timeout=5, agent_reregister_timeout=30,
                                          offer_timeout=60, id_prefix=prefix))
        return s, self.apply(s.recover(dict(self.agents), dict(self.frameworks), now))


def test_a_removed_agent_stays_removed_across_a_master_failover() -> None:
    registry = Registry()
    s = machine()
    agent_id, actions = add_agent(s)
    registry.apply(actions)
    registry.apply(s.subscribe(100, "", "fw", "web", "", 1000, b"info", 0))
    fid, sid = next(iter(s.frameworks)), next(iter(s.frameworks.values())).stream_id
    [offer] = offers(s.allocate(0), fid)
    registry.apply(s.accept(fid, sid, [offer.offer_id], [launch(("t1", "cpus:1"))], 0, 0))
    registry.apply(s.tick(6))  # silent: unreachable
    actions = registry.apply(s.tick(37))  # gone for good: t1 LOST
    assert [u.state for u in updates(actions, "t1")] == ["TASK_LOST"]
    assert registry.agents[agent_id] == st.tombstone(37)

    s, actions = registry.successor(40)
    assert actions == [] and agent_id in s.removed_agents and agent_id not in s.agents
    _, new_sid = add_framework(s, conn=101, framework_id=fid, now=41)
    # The agent returns with its old id and the task the framework was told is LOST.
    report = st.AgentTaskReport(fid, b"info", "web", "t1", b"t1", R("cpus:1"), "TASK_RUNNING")
    new_id, actions = add_agent(s, conn=2, agent_id=agent_id, now=42, reports=(report,))
    assert new_id != agent_id
    assert to_agent(actions, st.KillTask) == [
        st.KillTask(fid, "t1", reason="REASON_AGENT_REMOVED")]
    assert updates(actions) == [] and (fid, "t1") not in s.tasks
    assert updates(s.reconcile(fid, new_sid, [], 43)) == []
    assert s.agents[new_id].used == R("cpus:1")  # held until the kill is reported
    # It reconnects before the kill ended: told again, still counted.
    s.agent_disconnected(2, 44)
    _, actions = add_agent(s, conn=3, agent_id=new_id, now=45, reports=(report,))
    assert [m.task_id for m in to_agent(actions, st.KillTask)] == ["t1"]
    assert s.agents[new_id].used == R("cpus:1") and (fid, "t1") not in s.tasks
    s.agent_update(new_id, st.Status("t1", fid, new_id, "TASK_KILLED", uuid=b"k"), 46)
    assert s.agents[new_id].used == R("")


def test_a_removed_framework_stays_removed_and_old_tombstones_go() -> None:
    registry = Registry()
    s = machine()
    fid, _ = add_framework(s)
    registry.apply(s.subscribe(100, fid, "fw", "web", "", 10, b"info", 0))
    registry.apply(s.teardown(fid, s.frameworks[fid].stream_id, 1))
    assert registry.frameworks[fid] == st.tombstone(1)
    s, _ = registry.successor(2)
    with pytest.raises(st.FailedPrecondition, match="removed"):
        s.subscribe(7, fid, "fw", "web", "", 10, b"", 3)
    # A task of the removed framework an agent still holds is killed, not adopted.
    report = st.AgentTaskReport(fid, b"", "web", "t", b"", R("cpus:1"), "TASK_RUNNING")
    agent_id, actions = add_agent(s, conn=8, agent_id="a-old", now=4, reports=(report,))
    assert to_agent(actions, st.KillTask) == [
        st.KillTask(fid, "t", reason="REASON_FRAMEWORK_REMOVED")]
    assert fid not in s.frameworks and not s.tasks and s.agents[agent_id].used == R("cpus:1")
    # Two weeks on, the next leader deletes the tombstone.
    later, actions = registry.successor(1 + CONFIG.removed_kept + 1)
    assert actions == [st.WriteFramework(fid, None)] and fid not in registry.frameworks
    assert fid not in later.removed_frameworks


def test_a_kill_while_the_agent_is_away_reaches_it_when_it_returns(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, sid = launched
    s.agent_disconnected(1, 2)
    actions = s.kill(fid, sid, "t1", agent_id, 3, 3)  # dropped by the daemon: no stream
    assert actions == [st.ToAgent(agent_id, st.KillTask(fid, "t1", 3))]
    report = st.AgentTaskReport(fid, b"info", "web", "t1", b"t1", R("cpus:1;mem:512"),
                                "TASK_RUNNING")
    _, actions = add_agent(s, conn=2, agent_id=agent_id, now=4, reports=(report,))
    assert to_agent(actions, st.KillTask) == [st.KillTask(fid, "t1", 3)]
    actions = s.agent_update(agent_id, st.Status("t1", fid, agent_id, "TASK_KILLED",
                                                 source="SOURCE_AGENT", uuid=b"k"), 5)
    assert [u.state for u in updates(actions, "t1")] == ["TASK_KILLED"]
    assert s.agents[agent_id].used == R("")


def test_a_kill_of_a_recovering_task_reaches_its_agent_when_it_returns(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    old, agent_id, fid, _ = launched
    registry = Registry()
    registry.apply([old._agent_entry(a) for a in old.agents.values()])
    registry.apply([old._framework_entry(f) for f in old.frameworks.values()])
    s, _ = registry.successor(10)
    _, sid = add_framework(s, conn=7, framework_id=fid, now=11)
    assert s.kill(fid, sid, "t1", agent_id, 0, 12) == [
        st.ToAgent(agent_id, st.KillTask(fid, "t1"))]
    report = st.AgentTaskReport(fid, b"info", "web", "t1", b"t1", R("cpus:1;mem:512"),
                                "TASK_RUNNING")
    _, actions = add_agent(s, conn=8, agent_id=agent_id, now=13, reports=(report,))
    assert to_agent(actions, st.KillTask) == [st.KillTask(fid, "t1")]


def test_recovered_tasks_of_a_framework_with_no_entry_do_not_break_registration() -> None:
    # The agent's entry was written, its framework's was not (the write failed, then the
    # leader died): every Register of that agent must still be taken.
    s = machine()
    s.recover({"a1": {"hostname": "h", "tasks": [{"framework_id": "ghost", "task_id": "t"},
                                                 {"framework_id": "ghost", "task_id": "u"}]}},
              {}, 0)
    report = st.AgentTaskReport("ghost", b"", "web", "u", b"", R("cpus:1"), "TASK_RUNNING")
    agent_id, _ = add_agent(s, conn=1, agent_id="a1", now=1, reports=(report,))
    assert agent_id == "a1" and s.agents["a1"].connected
    assert s.tasks[("ghost", "u")].state == "TASK_RUNNING"
    # Without a report either.
    s = machine()
    s.recover({"a1": {"hostname": "h", "tasks": [{"framework_id": "ghost", "task_id": "t"}]}},
              {}, 0)
    add_agent(s, conn=1, agent_id="a1", now=1)
    s.agent_heartbeat("a1", 6.5)
    assert [u.state for u in updates(s.tick(7))] == ["TASK_LOST"]


def test_a_second_copy_of_a_task_held_elsewhere_is_killed_and_counted_until_it_ends(
        launched: tuple[st.MasterState, str, str, str]) -> None:
    s, agent_id, fid, _ = launched
    other, _ = add_agent(s, conn=2)
    s.agent_disconnected(2, 2)
    copy = st.AgentTaskReport(fid, b"", "web", "t1", b"", R("cpus:1;mem:512"), "TASK_RUNNING")
    _, actions = add_agent(s, conn=3, agent_id=other, now=3, reports=(copy,))
    assert to_agent(actions, st.KillTask) == [
        st.KillTask(fid, "t1", reason="REASON_INVALID")]
    assert s.tasks[(fid, "t1")].agent_id == agent_id and updates(actions) == []
    assert s.agents[other].used == R("cpus:1;mem:512")
    actions = s.agent_update(other, st.Status("t1", fid, other, "TASK_KILLED", uuid=b"k"), 4)
    assert updates(actions) == [] and s.agents[other].used == R("")
    assert s.tasks[(fid, "t1")].state == "TASK_RUNNING"
