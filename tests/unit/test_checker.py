"""storage.checker: linearizability, lost writes, fail-but-applied, windows and budgets.

Pure: histories are built in memory (by hand, or by a sequential model run against random
real-time intervals); a brute-force oracle that tries every order decides small histories
independently of the checker's search. The only clock is a fake one where budgets matter.
"""

from __future__ import annotations

import ast
import itertools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import checker
from storage.checker import Op, check, parse

Record = dict[str, Any]


def rec(
    client: int,
    op: str,
    value: Any = None,
    call: int = 0,
    ret: int | None = None,
    status: str = "ok",
    key: str = "k",
    **extra: Any,
) -> Record:
    record: Record = {"client": client, "key": key, "op": op, "call": call, "status": status}
    record["return"] = ret
    if op != "delete":
        record["value"] = value
    record.update(extra)
    return record


def indexes(ops: Sequence[Op]) -> list[int]:
    return [op.index for op in ops]


# --- a sequential model run against real time ---------------------------------------------


def simulate(
    rng: random.Random,
    n_ops: int,
    n_keys: int,
    n_clients: int,
    p_info: float = 0.05,
    p_fail: float = 0.05,
) -> list[Record]:
    """A history that is linearizable by construction: every op that takes effect gets a
    linearization point within [call, return] (later for info ops), and the points, in
    order, are applied to a dict to decide what reads return and whether a cas wins."""
    clock = [0] * n_clients
    planned: list[tuple[float, int, Record]] = []
    history: list[Record] = []
    for i in range(n_ops):
        client = rng.randrange(n_clients)
        call = clock[client] + rng.randrange(0, 50)
        ret = call + rng.randrange(0, 200)
        clock[client] = ret
        kind = rng.choices(["read", "write", "cas", "delete"], [45, 35, 15, 5])[0]
        roll = rng.random()
        status = "info" if roll < p_info else "fail" if roll < p_info + p_fail else "ok"
        r = rec(client, kind, call=call, ret=ret, status=status, key=f"k{rng.randrange(n_keys)}")
        if kind in ("write", "cas"):
            r["value"] = f"v{i}"
        if kind == "cas":
            r["expect"] = None
        if status == "info":
            r["return"] = rng.choice([None, ret])
            if kind != "read" and rng.random() < 0.5:  # it took effect, maybe late
                planned.append((call + rng.random() * (ret - call + 400), i, r))
        elif status == "ok":
            planned.append((call + rng.random() * (ret - call), i, r))
        history.append(r)
    state: dict[str, str | None] = {}
    written: dict[str, list[str | None]] = {}
    for _, _, r in sorted(planned, key=lambda p: (p[0], p[1])):
        key, current = r["key"], state.get(r["key"])
        if r["op"] == "read":
            r["value"] = current
        elif r["op"] == "delete":
            state[key] = None
        elif r["op"] == "write":
            state[key] = r["value"]
        else:
            wins = r["status"] == "info" or rng.random() < 0.6
            others = [v for v in [None, *written.get(key, [])] if v != current]
            if wins or not others:
                r["expect"], state[key], r["cas_ok"] = current, r["value"], True
            else:
                r["expect"], r["cas_ok"] = rng.choice(others), False
        written.setdefault(key, []).append(state.get(key))
    for r in history:
        if r["op"] == "cas" and r["status"] != "ok":
            r.pop("cas_ok", None)
    return history


def brute_force(records: Sequence[Record]) -> bool:
    """Linearizable by the definition: some subset of the info ops and some order of it
    and the ok ops respects real time and the register semantics, key by key."""
    for key in {r["key"] for r in records}:
        ops = [
            r
            for r in records
            if r["key"] == key
            and r["status"] != "fail"
            and (r["op"] != "read" or r["status"] == "ok")
        ]
        must = [r for r in ops if r["status"] == "ok"]
        maybe = [r for r in ops if r["status"] == "info"]
        if not any(
            legal(order)
            for size in range(len(maybe) + 1)
            for extra in itertools.combinations(maybe, size)
            for order in itertools.permutations(must + list(extra))
        ):
            return False
    return True


def legal(order: Sequence[Record]) -> bool:
    def ret(r: Record) -> float:
        return float("inf") if r["status"] == "info" else float(r["return"])

    if any(ret(b) < a["call"] for a, b in itertools.combinations(order, 2)):
        return False
    current = None
    for r in order:
        if r["op"] == "read" and r["value"] != current:
            return False
        if r["op"] == "write":
            current = r["value"]
        elif r["op"] == "delete":
            current = None
        elif r["op"] == "cas" and (r["status"] == "info" or r["cas_ok"]):
            if current != r["expect"]:
                return False
            current = r["value"]
        elif r["op"] == "cas" and current == r["expect"]:
            return False
    return True


@st.composite
def small_histories(draw: st.DrawFn) -> list[Record]:
    """Few ops on one key with arbitrary outcomes: linearizable or not."""
    history: list[Record] = []
    values: list[Any] = [None, "never"]
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["read", "write", "cas", "delete"]))
        status = draw(st.sampled_from(["ok", "ok", "ok", "info", "fail"]))
        call = draw(st.integers(0, 8))
        ret = call + draw(st.integers(0, 6))
        r = rec(draw(st.integers(0, 3)), kind, call=call, ret=ret, status=status)
        if kind == "read":
            r["value"] = draw(st.sampled_from(values))
        elif kind in ("write", "cas"):
            r["value"] = f"v{i}" if kind == "write" or draw(st.booleans()) else None
            if r["value"] is not None:
                values.append(r["value"])
        if kind == "cas":
            r["expect"] = draw(st.sampled_from(values))
            if status == "ok":
                r["cas_ok"] = draw(st.booleans())
        if status == "info" and draw(st.booleans()):
            r["return"] = None
        history.append(r)
    return history


# --- linearizable by hand -------------------------------------------------------------------


def assert_valid(history: list[Record]) -> None:
    report = check(history)
    assert report.valid is True, report.summary()
    assert report.keys["k"].window == []
    assert report.lost_writes == [] and report.fail_but_applied == []


def test_sequential_history_is_linearizable() -> None:
    assert_valid(
        [
            rec(1, "read", None, 0, 5),
            rec(1, "write", "a", 10, 20),
            rec(2, "read", "a", 30, 40),
            rec(1, "write", "b", 50, 60),
            rec(2, "read", "b", 70, 80),
        ]
    )


@pytest.mark.parametrize("first, second", [("a", "b"), ("b", "a")])
def test_concurrent_writes_may_be_read_in_either_order(first: str, second: str) -> None:
    assert_valid(
        [
            rec(1, "write", "a", 0, 100),
            rec(2, "write", "b", 10, 90),
            rec(3, "read", first, 20, 30),
            rec(3, "read", second, 40, 50),
            rec(3, "read", second, 110, 120),
        ]
    )


def test_cas_success_and_mismatch() -> None:
    assert_valid(
        [
            rec(1, "write", "a", 0, 10),
            rec(2, "cas", "b", 20, 30, expect="a", cas_ok=True),
            rec(3, "cas", "c", 40, 50, expect="a", cas_ok=False),
            rec(1, "read", "b", 60, 70),
            rec(2, "cas", "d", 80, 90, expect=None, cas_ok=False),
        ]
    )


def test_cas_on_absent_and_delete() -> None:
    assert_valid(
        [
            rec(1, "cas", "a", 0, 10, expect=None, cas_ok=True),
            rec(1, "delete", None, 20, 30),
            rec(2, "read", None, 40, 50),
            rec(1, "cas", "b", 60, 70, expect=None, cas_ok=True),
            rec(2, "read", "b", 80, 90),
        ]
    )


def test_info_write_that_took_effect_late() -> None:
    assert_valid(
        [
            rec(1, "write", "a", 0, 10),
            rec(2, "write", "b", 20, None, status="info"),
            rec(3, "read", "a", 30, 40),
            rec(3, "read", "b", 1000, 1010),  # long after the client gave up
        ]
    )


def test_info_write_that_never_took_effect() -> None:
    assert_valid(
        [
            rec(1, "write", "a", 0, 10),
            rec(2, "write", "b", 20, 25, status="info"),
            rec(2, "cas", "c", 30, 35, status="info", expect="a"),
            rec(3, "read", "a", 40, 50),
            rec(3, "read", "a", 60, 70),
        ]
    )


@pytest.mark.parametrize(
    "info",
    [
        rec(2, "write", "b", 20, None, status="info"),
        rec(2, "delete", None, 20, None, status="info"),
        rec(2, "cas", "x", 20, 25, status="info", expect="a"),
    ],
)
def test_an_info_write_may_explain_a_mismatch(info: Record) -> None:
    explained = [
        rec(1, "write", "a", 0, 10),
        info,
        rec(3, "cas", "c", 30, 40, expect="a", cas_ok=False),
        rec(3, "read", "a", 50, 60),
    ]
    assert check(explained[:3]).valid is True
    assert check([explained[0], explained[2]]).valid is False  # without it: a still there
    assert check(explained).valid is False  # and nothing writes a again
    late = {**info, "call": 45, "return": None}
    assert check([explained[0], late, explained[2]]).valid is False  # called too late


def test_failed_ops_and_info_reads_are_dropped() -> None:
    assert_valid(
        [
            rec(1, "write", "a", 0, 10),
            rec(2, "write", "b", 20, 30, status="fail"),
            rec(2, "cas", "c", 20, 30, status="fail", expect="zzz"),
            rec(3, "read", "nonsense", 40, 50, status="info"),
            rec(3, "read", "a", 60, 70),
        ]
    )


def test_touching_intervals_are_concurrent() -> None:
    assert_valid([rec(1, "write", "a", 0, 10), rec(2, "read", None, 10, 20)])


# --- not linearizable by hand ---------------------------------------------------------------


def assert_invalid(history: list[Record]) -> checker.Report:
    report = check(history)
    assert report.valid is False, report.summary()
    result = report.keys["k"]
    assert result.valid is False and result.anomaly and result.window
    assert not brute_force([history[op.index] for op in result.window])
    return report


def test_stale_read() -> None:
    history = [
        rec(1, "write", "a", 0, 10),
        rec(1, "write", "b", 20, 30),
        rec(2, "read", "b", 35, 38),
        rec(2, "read", "a", 40, 50),
    ]
    report = assert_invalid(history)
    assert indexes(report.keys["k"].window) == [0, 1, 2, 3]
    assert indexes(report.lost_writes) == [1]
    assert "#1" in (report.keys["k"].anomaly or "")


def test_stale_read_of_a_write_in_flight_found_by_the_search() -> None:
    history = [
        rec(1, "write", "a", 0, 10),
        rec(2, "write", "b", 20, 100),
        rec(3, "read", "b", 30, 40),
        rec(3, "read", "a", 50, 60),
    ]
    report = assert_invalid(history)
    assert report.lost_writes == []  # b had not returned: not a lost write, still invalid
    assert report.keys["k"].anomaly == f"no linearization once {parse(history)[3].describe()}" + (
        " returns"
    )
    assert indexes(report.keys["k"].window) == [0, 1, 2, 3]


def test_lost_write_read_as_absent() -> None:
    history = [
        rec(1, "write", "a", 0, 10),
        rec(2, "delete", None, 5, 15),
        rec(1, "write", "b", 20, 30),
        rec(2, "read", None, 40, 50),
    ]
    report = assert_invalid(history)
    assert indexes(report.lost_writes) == [2]  # not a: the delete may explain it


def test_lost_write_window_drops_the_quiet_past() -> None:
    history = [rec(1, "write", f"old{i}", 10 * i, 10 * i + 5) for i in range(20)]
    history += [rec(1, "write", "x", 300, 310), rec(2, "read", "old19", 320, 330)]
    report = assert_invalid(history)
    assert indexes(report.lost_writes) == [20]
    assert indexes(report.keys["k"].window) == [19, 20, 21]


def test_fail_but_applied() -> None:
    history = [
        rec(1, "write", "a", 0, 10),
        rec(2, "write", "b", 20, 30, status="fail"),
        rec(3, "read", "b", 40, 50),
    ]
    report = assert_invalid(history)
    assert indexes(report.fail_but_applied) == [1]
    assert indexes(report.keys["k"].window) == [2]


def test_cas_mismatch_that_applied_is_fail_but_applied() -> None:
    history = [
        rec(1, "write", "a", 0, 10),
        rec(2, "cas", "b", 20, 30, expect="z", cas_ok=False),
        rec(3, "read", "b", 40, 50),
    ]
    assert indexes(assert_invalid(history).fail_but_applied) == [1]


def test_concurrent_writes_observed_in_contradictory_orders() -> None:
    history = [
        rec(1, "write", "a", 0, 100),
        rec(2, "write", "b", 0, 100),
        rec(3, "read", "a", 10, 20),
        rec(3, "read", "b", 30, 40),
        rec(3, "read", "a", 50, 60),
    ]
    report = assert_invalid(history)
    assert report.lost_writes == []
    assert indexes(report.keys["k"].window) == [0, 1, 2, 3, 4]


def test_cas_double_success_on_one_expected_value() -> None:
    history = [
        rec(1, "write", "a", 0, 10),
        rec(2, "cas", "b", 20, 50, expect="a", cas_ok=True),
        rec(3, "cas", "c", 25, 55, expect="a", cas_ok=True),
    ]
    report = assert_invalid(history)
    assert indexes(report.keys["k"].window) == [0, 1, 2]


def test_read_of_a_value_never_written() -> None:
    report = assert_invalid([rec(1, "write", "a", 0, 10), rec(2, "read", "zzz", 20, 30)])
    assert "no op on this key wrote" in (report.keys["k"].anomaly or "")


def test_read_from_the_future() -> None:
    history = [rec(2, "read", "a", 0, 10), rec(1, "write", "a", 20, 30)]
    assert "called later" in (assert_invalid(history).keys["k"].anomaly or "")


def test_keys_are_independent() -> None:
    history = [
        rec(1, "write", "a", 0, 10, key="x"),
        rec(2, "read", None, 20, 30, key="y"),
        rec(1, "write", "b", 40, 50, key="x"),
        rec(2, "read", "a", 60, 70, key="x"),
    ]
    report = check(history)
    assert report.valid is False
    assert report.keys["y"].valid is True and report.keys["x"].valid is False
    text = report.summary()
    assert "key 'x'" in text and "lost acknowledged writes: 1" in text


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"op": "read"}, "missing field 'client'"),
        (rec(1, "append", "a", 0, 1), "op must be one of"),
        (rec(1, "write", "a", 0, None), "must have a return time"),
        (rec(1, "write", "a", 10, 5), "return is before call"),
        (rec(1, "write", None, 0, 5), "a write must write a value"),
        (rec(1, "cas", "a", 0, 5, cas_ok=True), "needs 'expect'"),
        (rec(1, "cas", "a", 0, 5, expect=None), "cas_ok"),
        (rec(1, "read", [1], 0, 5), "value must be"),
        ({**rec(1, "write", "a", 0, 5), "call": 0.5}, "call must be an integer"),
        ({**rec(1, "read", None, 0, 5), "status": "maybe"}, "status must be one of"),
    ],
)
def test_parse_rejects_malformed_records(bad: Record, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse([rec(0, "read", None, 0, 1), bad])
    assert "history record 1" in str(error.value)


def test_duplicate_written_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="records 0 and 2 both write 'a'"):
        check([rec(1, "write", "a", 0, 1), rec(1, "read", "a", 2, 3), rec(2, "write", "a", 4, 5)])


def test_parsed_ops_are_accepted_and_keep_their_index() -> None:
    ops = parse([rec(1, "write", "a", 0, 10), rec(2, "read", "a", 20, None, status="info")])
    assert [op.index for op in ops] == [0, 1] and ops[1].value is None
    assert check(ops).valid is True
    with pytest.raises(ValueError, match="either all records or all Op"):
        mixed: list[Any] = [ops[0], rec(1, "read", None, 0, 1)]
        check(mixed)


# --- budgets --------------------------------------------------------------------------------


class FakeClock:
    """Advances ``tick`` seconds every time it is read."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_budget_exhaustion_is_unknown_not_valid() -> None:
    history = [rec(c, "write", f"h{c}", 0, 1000) for c in range(16)]
    history += [rec(20, "read", f"h{c}", 2000 + 10 * c, 2005 + 10 * c) for c in range(16)]
    report = check(history, time_budget_s=5.0, clock=FakeClock(1.0))
    assert report.valid is None and report.unknown_keys == ["k"]
    assert report.keys["k"].valid is None and report.keys["k"].window == []
    assert "UNKNOWN" in report.summary()


def test_a_violation_elsewhere_beats_unknown() -> None:
    history = [rec(c, "write", f"h{c}", 0, 1000, key="slow") for c in range(16)]
    history += [rec(20, "read", f"h{c}", 2000 + c, 2000 + c, key="slow") for c in range(16)]
    history += [
        rec(1, "write", "a", 0, 10),
        rec(1, "write", "b", 20, 30),
        rec(2, "read", "a", 40, 50),
    ]
    report = check(history, per_key_budget_s=3.0, clock=FakeClock(1.0))
    assert report.valid is False
    assert report.unknown_keys == ["slow"] and report.keys["k"].valid is False


def test_per_key_budget_spares_the_other_keys() -> None:
    history = [rec(c, "write", f"h{c}", 0, 1000, key="slow") for c in range(16)]
    history += [rec(20, "read", f"h{c}", 2000 + c, 2000 + c, key="slow") for c in range(16)]
    history += [rec(1, "write", "a", 0, 10), rec(2, "read", "a", 20, 30)]
    report = check(history, per_key_budget_s=1.0, clock=FakeClock(0.01))
    assert report.valid is None and report.unknown_keys == ["slow"]
    assert report.keys["k"].valid is True


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    n_ops=st.integers(1, 100),
    n_keys=st.integers(1, 3),
    n_clients=st.integers(1, 8),
)
def test_histories_of_a_sequential_model_are_accepted(
    rng: random.Random, n_ops: int, n_keys: int, n_clients: int
) -> None:
    history = simulate(rng, n_ops, n_keys, n_clients, p_info=0.1, p_fail=0.1)
    report = check(history)
    assert report.valid is True, report.summary()
    assert report.ops == n_ops and sum(r.checked_ops for r in report.keys.values()) <= n_ops


@settings(max_examples=60, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    n_ops=st.integers(1, 100),
    n_clients=st.integers(1, 8),
)
def test_a_read_of_a_never_written_value_is_rejected(
    rng: random.Random, n_ops: int, n_clients: int
) -> None:
    history = simulate(rng, n_ops, 2, n_clients)
    reads = [r for r in history if r["op"] == "read" and r["status"] == "ok"]
    if not reads:
        return
    corrupted = rng.choice(reads)
    corrupted["value"] = "never written"
    report = check(history)
    assert report.valid is False
    result = report.keys[corrupted["key"]]
    assert result.valid is False
    assert any(history[op.index] is corrupted for op in result.window)
    assert check([history[op.index] for op in result.window]).valid is False


@settings(max_examples=300, deadline=None)
@given(small_histories())
def test_agrees_with_brute_force(history: list[Record]) -> None:
    report = check(history)
    assert report.valid is brute_force(history), report.summary()
    if report.valid is False:
        window = report.keys["k"].window
        assert window and not brute_force([history[op.index] for op in window])


# --- scale and purity -----------------------------------------------------------------------


@pytest.mark.parametrize("n_ops, n_keys, n_clients", [(5000, 25, 8), (1500, 1, 10)])
def test_a_large_history_checks_well_within_budget(n_ops: int, n_keys: int, n_clients: int) -> None:
    history = simulate(random.Random(7), n_ops, n_keys, n_clients, p_info=0.02, p_fail=0.02)
    report = check(history, time_budget_s=10.0)
    assert report.valid is True, report.summary()
    assert report.elapsed_s < 5.0


@pytest.mark.parametrize("seed", [8, 28])  # the search gives up (8) or finishes (28) first
def test_a_stale_read_deep_in_a_busy_key_is_found_and_narrowed(seed: int) -> None:
    rng = random.Random(seed)
    history = simulate(rng, 1000, 1, 10, p_info=0.02, p_fail=0.02)
    reads = [r for r in history if r["op"] == "read" and r["status"] == "ok"]
    stale = reads[len(reads) // 2]
    stale["value"] = next(  # a value overwritten shortly before the read was called
        w["value"]
        for w in history
        if w["op"] == "write" and w["status"] == "ok" and 0 < stale["call"] - w["return"] < 600
    )
    report = check(history)
    assert report.valid is False and report.lost_writes == report.fail_but_applied == []
    result = report.keys["k0"]
    assert f"#{history.index(stale)} " in (result.anomaly or "")
    assert any(history[op.index] is stale for op in result.window)
    assert len(result.window) < 50
    assert check([history[op.index] for op in result.window]).valid is False


def imports_of(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_checker_is_pure() -> None:
    io = {"asyncio", "grpc", "kazoo", "rocksdict", "subprocess", "socket", "threading", "os"}
    io |= {"io", "pathlib", "json", "storage", "scheduler"}
    found = {name.split(".")[0] for name in imports_of(Path(checker.__file__))}
    assert not found & io, found & io
