"""The history checker: is a recorded history of single-key register operations linearizable?

Role: the verdict of a chaos run (DESIGN §6 promises, §11). Knossos/Porcupine style: each key
is an independent register (P-compositionality), decided by the Wing-Gong/Lowe search over
linearizations with memoised (linearized set, register value) states. Lost acknowledged
writes and fail-but-applied ops are also listed on their own (the search rejects them too,
but the lists read better), and each bad key gets a small window that cannot be linearized.

Pure: takes parsed records (the JSON Lines objects the chaos tests write), does no I/O and
reads no clock but the injected ``clock`` (``time.monotonic``), and that only for budgets.

Semantics. A key is a register, initially absent (None). A write sets it, a delete sets
None, a cas with ``cas_ok`` true requires it to hold ``expect`` and sets it, an ok cas with
``cas_ok`` false requires it not to hold ``expect`` and changes nothing, a read returns it.
Status ``fail``: did not take effect, so left out (and checked for fail-but-applied).
Status ``info``: took effect at some point after its call, or never; its return time is
unknown (+infinity); an info cas that took effect succeeded. Reads that are not ok say
nothing and are dropped. Ops whose intervals touch (a return equal to a call) are concurrent.

Lost acknowledged write (``Report.lost_writes``): an ok write, delete or successful cas W
for which some ok read, or ok successful cas (which observes its ``expect``), R called
strictly after W returned observes
  (a) a value whose writer returned strictly before W was called (that writer, W and R
      are in this order in real time and values are unique: W's effect vanished), or
  (b) absent, when W wrote a value and no delete or cas to None, ok or info, can fit
      between them (none has call <= R's return and return >= W's call).

Fail-but-applied (``Report.fail_but_applied``): a write or cas with status fail, or an ok
cas that reported a mismatch, whose value an ok read observed (or an ok cas expected).

Window (``KeyResult.window``): ops that cannot be linearized on their own, from an absent
register. Found by cutting a failing prefix of the key's history at a time t: ops that
returned by t are dropped, ops in flight at t become optional (they may have taken effect
before t), and the rest must fail from every value the dropped, in-flight and info ops can
have left. The latest such cut, then the earliest end for it, are found by galloping and
binary searches (both properties are monotone), within the budget. Reported: the ok ops
after the cut, and the writes (earlier, or info) of the values they compare with.

Order of work, per key: a violation the rules found needs only its window. Otherwise a
search of bounded length settles almost every valid history; if it gives up, a window that
fails where it got stuck proves a violation at a fraction of the cost of exhausting the
whole search, which runs only when no such window does.

Invariants:
- a violation is reported only when proven; the rules above and the search's shortcuts
  (``_settle``) rely on values being unique per write, which ``check`` verifies;
- the shortcuts never change a verdict, only the work to reach it;
- a key is None (unknown) only when its budget ran out, and ``Report.valid`` is None only
  when no violation was found anywhere: a chaos run must treat that as a failure.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

Value: TypeAlias = str | int | None
Kind = Literal["read", "write", "cas", "delete"]
Status = Literal["ok", "fail", "info"]

KINDS: tuple[Kind, ...] = ("read", "write", "cas", "delete")
STATUSES: tuple[Status, ...] = ("ok", "fail", "info")
CLOCK_EVERY = 256  # search steps between budget checks
QUICK_STEPS_PER_OP = 64  # a first search this long settles almost every valid history


@dataclass(frozen=True)
class Op:
    """One recorded operation; ``index`` is its position in the input history."""

    client: str | int
    key: str
    kind: Kind
    value: Value
    expect: Value
    call: int
    ret: int | None
    status: Status
    cas_ok: bool | None
    index: int

    def describe(self) -> str:
        ret = "?" if self.ret is None or self.status == "info" else str(self.ret)
        if self.kind == "read":
            what = f"read -> {self.value!r}"
        elif self.kind == "write":
            what = f"write {self.value!r}"
        elif self.kind == "delete":
            what = "delete"
        else:
            outcome = {True: "", False: " (mismatch)", None: ""}[self.cas_ok]
            what = f"cas {self.expect!r} -> {self.value!r}{outcome}"
        return f"#{self.index} client={self.client} {what} [{self.call}, {ret}] {self.status}"


@dataclass
class KeyResult:
    key: str
    valid: bool | None  # None: the search ran out of budget
    checked_ops: int  # ops that entered the check (failed ops and non-ok reads excluded)
    anomaly: str | None = None
    window: list[Op] = field(default_factory=list)  # by call time; empty unless invalid


@dataclass
class Report:
    valid: bool | None
    keys: dict[str, KeyResult]
    lost_writes: list[Op]
    fail_but_applied: list[Op]
    unknown_keys: list[str]
    elapsed_s: float
    ops: int

    def summary(self, max_ops: int = 20) -> str:
        verdict = {True: "yes", False: "NO", None: "UNKNOWN (budget ran out: a failed run)"}
        bad = [r for r in self.keys.values() if r.valid is False]
        lines = [
            f"linearizable: {verdict[self.valid]}: {self.ops} ops over {len(self.keys)} keys"
            f" checked in {self.elapsed_s:.2f}s; {len(bad)} keys invalid,"
            f" {len(self.unknown_keys)} unknown",
            f"lost acknowledged writes: {len(self.lost_writes)}",
        ]
        lines += _listing(self.lost_writes, max_ops)
        lines.append(f"fail-but-applied: {len(self.fail_but_applied)}")
        lines += _listing(self.fail_but_applied, max_ops)
        for result in bad:
            lines.append(f"key {result.key!r}: {result.anomaly}")
            lines.append(f"  window of {len(result.window)} ops:")
            lines += _listing(result.window, max_ops)
        if self.unknown_keys:
            lines.append(f"unknown (budget ran out): {', '.join(map(repr, self.unknown_keys))}")
        return "\n".join(lines)


def _listing(ops: Sequence[Op], limit: int) -> list[str]:
    lines = [f"    {op.describe()}" for op in ops[:limit]]
    if len(ops) > limit:
        lines.append(f"    ... and {len(ops) - limit} more")
    return lines


# --- parsing ----------------------------------------------------------------------------


def parse(records: Iterable[Mapping[str, Any]]) -> list[Op]:
    """Validate history records (see the module docstring); ValueError names the record."""
    return [_parse_one(index, record) for index, record in enumerate(records)]


def _parse_one(index: int, record: object) -> Op:
    def bad(why: str) -> ValueError:
        return ValueError(f"history record {index}: {why}: {record!r}")

    if not isinstance(record, dict) and not isinstance(record, Mapping):
        raise bad("not an object")
    for name in ("client", "key", "op", "call", "status"):
        if name not in record:
            raise bad(f"missing field {name!r}")
    client, key, kind, status = record["client"], record["key"], record["op"], record["status"]
    if type(client) is not str and type(client) is not int:
        raise bad("client must be a string or an integer")
    if type(key) is not str:
        raise bad("key must be a string")
    if kind not in KINDS:
        raise bad(f"op must be one of {', '.join(KINDS)}")
    if status not in STATUSES:
        raise bad(f"status must be one of {', '.join(STATUSES)}")
    call, ret = record["call"], record.get("return")
    if not _is_int(call):
        raise bad("call must be an integer (monotonic nanoseconds)")
    if ret is not None and not _is_int(ret):
        raise bad("return must be an integer or null")
    if ret is not None and ret < call:
        raise bad("return is before call")
    if status == "ok" and ret is None:
        raise bad("an ok operation must have a return time")
    value = record.get("value") if kind != "read" or status == "ok" else None
    if not _is_value(value):
        raise bad("value must be a string, an integer or null")
    expect: Value = None
    cas_ok: bool | None = None
    if kind == "write" and value is None:
        raise bad("a write must write a value (null means absent: use delete)")
    if kind == "delete" and value is not None:
        raise bad("a delete carries no value")
    if status == "ok" and kind in ("read", "cas") and "value" not in record:
        raise bad("missing field 'value'")
    if kind == "cas":
        if "expect" not in record:
            raise bad("a cas needs 'expect' (null for expected absent)")
        expect = record["expect"]
        if not _is_value(expect):
            raise bad("expect must be a string, an integer or null")
        if status == "ok":
            cas_ok = record.get("cas_ok")
            if not isinstance(cas_ok, bool):
                raise bad("an ok cas needs cas_ok true or false")
    return Op(client, key, kind, value, expect, call, ret, status, cas_ok, index)


def _is_int(x: object) -> bool:
    return type(x) is int  # not bool


def _is_value(x: object) -> bool:
    return x is None or type(x) is str or type(x) is int


def _check_unique_values(ops: Sequence[Op]) -> None:
    seen: dict[tuple[str, Value], Op] = {}
    for op in ops:
        if op.kind in ("write", "cas") and op.value is not None:
            first = seen.setdefault((op.key, op.value), op)
            if first is not op:
                raise ValueError(
                    f"history records {first.index} and {op.index} both write {op.value!r}"
                    f" to key {op.key!r}: the checker needs a unique value per write"
                )


# --- the search -------------------------------------------------------------------------

# How the search sees an op. _MISS: an ok cas that reported a mismatch. _FREE and _SPARE:
# optional writes (and cas, expecting ``exp``) of a value no step compares with. Such a write
# only ever matters just before a mismatch that would fail without it, so the search keeps
# them out of its list and lets such a mismatch spend the next one (by call) in its pool.
_READ, _WRITE, _CAS, _MISS, _FREE, _SPARE = range(6)


@dataclass(frozen=True, slots=True)
class _Step:
    op: Op
    kind: int
    val: int  # interned: 0 is absent
    exp: int
    call: int
    ret: float  # +inf when optional, earlier when bounded by an observer
    mandatory: bool


def _linearizable(
    steps: Sequence[_Step],
    inits: Sequence[int],
    deadline: float,
    clock: Callable[[], float],
    limit: float = math.inf,
) -> tuple[bool | None, float]:
    """True if, from some register value in ``inits``, some order of the mandatory steps
    and of any of the optional ones respects real time and the register; None if ``clock``
    passed ``deadline`` or the search took ``limit`` steps first. Also the latest return
    that blocked the search: when the answer is False, the shortest failing prefix of the
    history ends there (and the search was stuck around there if it gave up).

    Wing-Gong/Lowe: a doubly linked list of call and return events sorted by time (calls
    first on ties); the calls before the first return are the candidates; lifting a step
    unlinks its events, backtracking relinks them (dancing links); every state reached,
    (value, linearized set), is remembered, since its future does not depend on the path.
    A candidate that changes nothing and holds now (a read of the current value, a true
    mismatch) is taken at once and alone: any linearization could take it first."""
    if clock() > deadline:
        return None, -math.inf
    n = len(steps)
    free = sorted((s.call, i) for i, s in enumerate(steps) if s.kind == _FREE)
    spare: dict[int, list[tuple[int, int]]] = {}
    for i, s in sorted(enumerate(steps), key=lambda p: p[1].call):
        if s.kind == _SPARE:
            spare.setdefault(s.exp, []).append((s.call, i))
    events: list[tuple[float, int, int]] = []
    for i, s in enumerate(steps):
        if s.kind not in (_FREE, _SPARE):
            events.append((s.call, 0, 2 * i))
            if s.mandatory:
                events.append((s.ret, 1, 2 * i + 1))
    events.sort()
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    at = [0.0] * (2 * n)
    last = head
    for t, _, e in events:
        nxt[last], prv[e], at[e], last = e, last, t, e
    kind = [s.kind for s in steps]
    val = [s.val for s in steps]
    exp = [s.exp for s in steps]
    mand = [s.mandatory for s in steps]
    bit = [1 << i for i in range(n)]
    total = sum(mand)
    seen: set[int] = set()  # (value << n) | linearized bits
    taken, stuck = 0, -math.inf
    for init in inits:
        cur, bits, remaining = init, 0, total
        spent = {-1: 0} | {e: 0 for e in spare}  # per pool: -1 is _FREE, else an exp
        stack: list[tuple[int, int, int, bool]] = []  # (call event, value before, spent, alone)
        entry, fresh = nxt[head], True
        while remaining:
            taken += 1
            if taken % CLOCK_EVERY == 0 and (taken > limit or clock() > deadline):
                return None, stuck
            go, new, spend, alone, state = -1, cur, -1, False, 0
            if fresh:  # a new state: is there a step to take alone?
                fresh, q = False, nxt[head]
                while q >= 0 and not q & 1:
                    k = kind[q >> 1]
                    if (k == _READ and val[q >> 1] == cur) or (k == _MISS and exp[q >> 1] != cur):
                        state = (cur << n) | bits | bit[q >> 1]
                        go, alone = (-2 if state in seen else q), True
                        break
                    q = nxt[q]
                entry = nxt[head]
            if go == -1 and entry >= 0 and not entry & 1:  # a call: try to linearize it now
                i = entry >> 1
                k = kind[i]
                if k == _WRITE:
                    ok, new = True, val[i]
                elif k == _CAS:
                    ok, new = cur == exp[i], val[i]
                elif k == _MISS and cur == exp[i]:  # needs a write of "some value" first
                    q = nxt[entry]
                    while q >= 0 and not q & 1:
                        q = nxt[q]
                    by = at[q] if q >= 0 else math.inf  # the latest it can happen
                    for pool, tag in ((spare.get(cur), cur), (free, -1)):
                        if pool and spent[tag] < len(pool) and pool[spent[tag]][0] <= by:
                            spend = pool[spent[tag]][1]
                            break
                    ok, new = spend >= 0, val[spend]
                else:  # reads and mismatches that hold were taken alone
                    ok = False
                if ok:
                    state = (new << n) | bits | bit[i] | (bit[spend] if spend >= 0 else 0)
                    if state not in seen:
                        go = entry
                if go < 0:
                    entry = nxt[entry]
                    continue
            elif go == -1:  # a mandatory step's return: nothing left to try here
                if entry >= 0:
                    stuck = max(stuck, at[entry])
                go = -2
            if go >= 0:  # linearize the step whose call event is ``go``
                seen.add(state)
                stack.append((go, cur, spend, alone))
                bits, cur, fresh = state ^ (new << n), new, True
                if spend >= 0:
                    spent[-1 if kind[spend] == _FREE else exp[spend]] += 1
                p, q = prv[go], nxt[go]
                nxt[p] = q
                if q >= 0:
                    prv[q] = p
                if mand[go >> 1]:
                    r = go + 1
                    p, q = prv[r], nxt[r]
                    nxt[p] = q
                    if q >= 0:
                        prv[q] = p
                    remaining -= 1
                continue
            # backtrack, past the steps that were taken alone: their parents failed too
            alone = True
            while alone and stack:
                entry, cur, spend, alone = stack.pop()
                i = entry >> 1
                bits ^= bit[i]
                if spend >= 0:
                    bits ^= bit[spend]
                    spent[-1 if kind[spend] == _FREE else exp[spend]] -= 1
                if mand[i]:
                    r = entry + 1
                    nxt[prv[r]] = r
                    if nxt[r] >= 0:
                        prv[nxt[r]] = r
                    remaining += 1
                nxt[prv[entry]] = entry
                if nxt[entry] >= 0:
                    prv[nxt[entry]] = entry
            if alone:  # the stack ran out: no linearization from this init
                break
            entry = nxt[entry]
        else:
            return True, stuck
    return False, stuck


def _settle(steps: Sequence[_Step], init: int, other: int) -> list[_Step]:
    """What the search needs of ``steps`` started from ``init``, with the same verdict:
    1. an optional write of ``init`` itself already happened: it goes (values are unique);
    2. an optional write whose value a mandatory step observes must precede that observer:
       it becomes mandatory, returning when the first observer returns;
    3. an optional write that no step that could follow it observes, and no mismatch could
       follow, may as well not happen: it goes (repeated, as cas go too);
    4. a value no step compares with becomes ``other``; optional writes of it become _FREE,
       optional cas of it _SPARE if some mismatch expects what they expect, else they go.
    """
    if init not in (0, other):
        steps = [s for s in steps if s.mandatory or s.kind == _READ or s.val != init]
    first_seen: dict[int, float] = {}
    for s in steps:
        if s.mandatory and s.kind in (_READ, _CAS):
            v = s.val if s.kind == _READ else s.exp
            first_seen[v] = min(first_seen.get(v, math.inf), s.ret)
    view = [
        replace(s, ret=first_seen[s.val], mandatory=True)
        if not s.mandatory and s.val not in (0, init) and s.val in first_seen
        else s
        for s in steps
    ]
    miss_until = max((s.ret for s in view if s.kind == _MISS), default=-math.inf)
    while True:
        last_seen: dict[int, float] = {}
        for s in view:
            if s.kind in (_READ, _CAS):
                v = s.val if s.kind == _READ else s.exp
                last_seen[v] = max(last_seen.get(v, -math.inf), s.ret)
        kept = [
            s
            for s in view
            if s.mandatory or max(last_seen.get(s.val, -math.inf), miss_until) >= s.call
        ]
        if len(kept) == len(view):
            break
        view = kept
    mentioned = _mentioned(view)
    missed = {s.exp for s in view if s.kind == _MISS}
    settled: list[_Step] = []
    for s in view:
        if s.kind in (_WRITE, _CAS) and s.val not in mentioned:
            kind = s.kind
            if not s.mandatory:
                if s.kind == _CAS and s.exp not in missed:
                    continue
                kind = _FREE if s.kind == _WRITE else _SPARE
            s = replace(s, val=other, kind=kind)
        settled.append(s)
    return settled


def _mentioned(steps: Iterable[_Step]) -> set[int]:
    """The register values these steps compare the register with."""
    return {s.val if s.kind == _READ else s.exp for s in steps if s.kind in (_READ, _CAS, _MISS)}


def _fails_after(
    steps: Sequence[_Step], cut: float, other: int, deadline: float, clock: Callable[[], float]
) -> bool | None:
    """Whether the steps that had not returned by ``cut`` fail from every register value
    the steps that had may have left (None: out of budget). Steps in flight at the cut may
    have taken effect before it: they become optional (reads and mismatches in flight say
    nothing), and what they, the optional steps and the returned ones wrote may be there."""
    before: list[_Step] = []
    rest: list[_Step] = []
    for s in steps:
        if s.ret <= cut or (s.call <= cut and s.kind in (_READ, _MISS)):
            before.append(s)
            continue
        if s.call <= cut:
            before.append(s)
            s = replace(s, ret=math.inf, mandatory=False)
        rest.append(s)
    mentioned = _mentioned(rest)
    left = {s.val for s in before if s.kind in (_WRITE, _CAS)}
    for init in sorted({0} | {v if v in mentioned else other for v in left}):
        verdict, _ = _linearizable(_settle(rest, init, other), [init], deadline, clock)
        if verdict is not False:
            return None if verdict is None else False
    return True


# --- one key ----------------------------------------------------------------------------


def _done(op: Op) -> float:
    """By when the op had certainly taken effect, if it did: +inf unless it is ok."""
    return math.inf if op.status != "ok" or op.ret is None else op.ret


def _did_not_happen(op: Op) -> bool:
    return op.status == "fail" or (op.kind == "cas" and op.status == "ok" and not op.cas_ok)


def _applies(op: Op) -> bool:
    """An ok or info op that may have changed the register."""
    return op.kind != "read" and not _did_not_happen(op)


def _observed(op: Op) -> tuple[bool, Value]:
    """(True, value) if this op observed the register holding ``value``."""
    if op.status == "ok" and op.kind == "read":
        return True, op.value
    if op.status == "ok" and op.kind == "cas" and op.cas_ok:
        return True, op.expect
    return False, None


def _suffix_min(rows: Sequence[tuple[float, Op]]) -> list[tuple[float, Op | None]]:
    """best[j]: the row with the smallest first field among rows[j:]."""
    best: list[tuple[float, Op | None]] = [(math.inf, None)] * (len(rows) + 1)
    for j in range(len(rows) - 1, -1, -1):
        best[j] = rows[j] if rows[j][0] < best[j + 1][0] else best[j + 1]
    return best


class _Key:
    """One key's history: the rules' findings, and the search's view of its prefixes."""

    def __init__(self, key: str, ops: Sequence[Op]) -> None:
        self.key = key
        self.kept = sorted(
            (op for op in ops if op.status != "fail" and (op.kind != "read" or op.status == "ok")),
            key=lambda op: (op.call, op.index),
        )
        self.ids: dict[Value, int] = {None: 0}
        for op in self.kept:
            self.ids.setdefault(op.value, len(self.ids))
            self.ids.setdefault(op.expect, len(self.ids))
        self.other = len(self.ids)  # stands for any value that no step at hand mentions
        writers = {op.value: op for op in ops if op.kind in ("write", "cas")}
        self.fail_but_applied: dict[int, Op] = {}
        self.evidence: list[tuple[float, str]] = []  # (end of a failing prefix, why)
        for op in self.kept:
            seen, value = _observed(op)
            w = writers.get(value)
            if not seen or value is None or w is op:
                continue
            if w is None:
                why = f"{op.describe()} observed {value!r}, which no op on this key wrote"
            elif _did_not_happen(w):
                self.fail_but_applied[w.index] = w
                why = f"{op.describe()} observed the value of {w.describe()}"
            elif w.call > _done(op):
                why = f"{op.describe()} observed the value of {w.describe()}, called later"
            else:
                continue
            self.evidence.append((_done(op), why))
        self.lost: dict[int, Op] = {}
        for w, r in self._lost_writes(writers):
            self.lost.setdefault(w.index, w)
            why = f"acknowledged {w.describe()} lost: {r.describe()} was called after it"
            self.evidence.append((_done(r), why))
        self.evidence.sort()

    def _lost_writes(self, writers: Mapping[Value, Op]) -> list[tuple[Op, Op]]:
        """(lost write, the observer that shows it), per the module docstring."""
        found: list[tuple[Op, Op]] = []
        acked = [op for op in self.kept if op.status == "ok" and _applies(op)]
        observers = [(op, v) for op in self.kept for seen, v in [_observed(op)] if seen]
        # (a) observers, by call, of a value whose writer returned before the write's call
        older = sorted(
            (r.call, _done(writers[v]), r.index, r)
            for r, v in observers
            if v is not None and v in writers and not _did_not_happen(writers[v])
        )
        best = _suffix_min([(writer_ret, r) for _, writer_ret, _, r in older])
        calls = [row[0] for row in older]
        for w in acked:
            writer_ret, r = best[bisect.bisect_right(calls, _done(w))]
            if r is not None and writer_ret < w.call:
                found.append((w, r))
        # (b) observers, by call, of absent when no delete fits between
        absent = sorted((r.call, _done(r), r.index, r) for r, v in observers if v is None)
        first = _suffix_min([(ret, r) for _, ret, _, r in absent])
        calls = [row[0] for row in absent]
        deletes = sorted((_done(d), d.call) for d in self.kept if _applies(d) and d.value is None)
        rets = [ret for ret, _ in deletes]
        earliest = [math.inf] * (len(deletes) + 1)  # earliest call among deletes[j:]
        for j in range(len(deletes) - 1, -1, -1):
            earliest[j] = min(earliest[j + 1], deletes[j][1])
        for w in acked:
            r_ret, r = first[bisect.bisect_right(calls, _done(w))]
            if w.value is not None and r is not None:
                if earliest[bisect.bisect_left(rets, w.call)] > r_ret:
                    found.append((w, r))
        return found

    def raw(self, horizon: float) -> list[_Step]:
        """The prefix of the history that ends at ``horizon``: ops called by then; ok ops
        still in flight become optional, reads and mismatches in flight go."""
        steps: list[_Step] = []
        for op in self.kept:
            if op.call > horizon:
                break
            finished = op.status == "ok" and _done(op) <= horizon
            if op.kind == "read":
                kind = _READ
            elif op.kind == "cas":
                kind = _CAS if op.status != "ok" or op.cas_ok else _MISS
            else:
                kind = _WRITE
            if finished or kind not in (_READ, _MISS):
                ret = _done(op) if finished else math.inf
                val, exp = self.ids[op.value], self.ids[op.expect]
                steps.append(_Step(op, kind, val, exp, op.call, ret, finished))
        return steps

    def check(self, deadline: float, clock: Callable[[], float]) -> KeyResult:
        """The verdict on this key, within ``deadline``. A violation the rules found needs
        no search; otherwise a short search usually settles it, and when it does not, a
        window that fails near where it got stuck is a cheaper proof than the whole search."""
        n = len(self.kept)
        if self.evidence:
            horizon, why = self.evidence[0]
            found = self._window(horizon, deadline, clock)
            window = found[0] if found else [op for op in self.kept if op.call <= horizon]
            return KeyResult(self.key, False, n, why, window)
        steps = _settle(self.raw(math.inf), 0, self.other)
        limit = QUICK_STEPS_PER_OP * len(steps)
        verdict, stuck = _linearizable(steps, [0], deadline, clock, limit)
        found = None
        if verdict is None and stuck > -math.inf and clock() <= deadline:
            found = self._window(stuck, deadline, clock, whole=False)
            if found is None:
                verdict, stuck = _linearizable(steps, [0], deadline, clock)
        if found is None and verdict is not False:
            return KeyResult(self.key, verdict, n)
        found = found or self._window(stuck, deadline, clock)
        if found is None:
            return KeyResult(
                self.key, False, n, "no linearization (no time left to narrow)", self.kept
            )
        window, culprit = found
        return KeyResult(
            self.key, False, n, f"no linearization once {culprit.describe()} returns", window
        )

    def _window(
        self, horizon: float, deadline: float, clock: Callable[[], float], whole: bool = True
    ) -> tuple[list[Op], Op] | None:
        """Shrink the failing prefix that ends at ``horizon`` to a small failing window (see
        the module docstring): first the latest cut, galloping back from the end so that
        the searches that fail, which must be exhaustive, stay small; then the earliest end
        for that cut. Returns the window and the op whose return makes it fail, or None if
        no window was shown to fail (out of budget; or, unless ``whole``, none in the later
        half of the prefix does)."""
        steps = self.raw(horizon)
        cuts = sorted({-math.inf} | {s.ret for s in steps if s.mandatory and s.ret < horizon})
        lowest = 0 if whole else len(cuts) // 2
        passing, failing, gap = len(cuts), -1, 1  # indexes into cuts
        while failing < 0:
            j = max(len(cuts) - gap, lowest)
            fails = _fails_after(steps, cuts[j], self.other, deadline, clock)
            if fails:
                failing = j
            elif fails is None or j == lowest:
                return None
            else:
                passing, gap = j, 2 * gap
        while passing - failing > 1:
            mid = (passing + failing) // 2
            fails = _fails_after(steps, cuts[mid], self.other, deadline, clock)
            if fails is None:
                break
            passing, failing = (passing, mid) if fails else (mid, failing)
        cut = cuts[failing]
        ends = sorted({_done(op) for op in self.kept if cut < _done(op) <= horizon})
        passing, failing = -1, len(ends) - 1
        while failing - passing > 1:
            mid = (passing + failing) // 2
            fails = _fails_after(self.raw(ends[mid]), cut, self.other, deadline, clock)
            if fails is None:
                break
            passing, failing = (passing, mid) if fails else (mid, failing)
        # Reported: the ok ops of the rest, and the writes (before the cut, or info) of the
        # values it compares with. Dropped info ops only took ways to linearize it away, and
        # what precedes the rest can only leave a value the search started it from.
        steps = self.raw(ends[failing])
        rest = [s for s in steps if s.ret > cut]
        mentioned = _mentioned(rest)
        window = sorted(
            (
                s.op
                for s in steps
                if (s.ret > cut and s.op.status == "ok")
                or (s.kind in (_WRITE, _CAS) and s.val != 0 and s.val in mentioned)
            ),
            key=lambda op: (op.call, op.index),
        )
        return window, self._returning_at(ends[failing])

    def _returning_at(self, end: float) -> Op:
        return next(op for op in self.kept if op.status == "ok" and _done(op) == end)


# --- the whole history ------------------------------------------------------------------


def check(
    history: Iterable[Mapping[str, Any]] | Iterable[Op],
    *,
    time_budget_s: float = 30.0,
    per_key_budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Report:
    """Check a history (records or parsed ops). Keys are searched smallest first; without
    ``per_key_budget_s`` each gets a fair share of what is left of ``time_budget_s``, and
    keys that ran out are retried with whatever remains at the end."""
    start = clock()
    deadline = start + time_budget_s
    items: list[Op | Mapping[str, Any]] = list(history)
    ops = [item for item in items if isinstance(item, Op)]
    if len(ops) != len(items):
        if ops:
            raise ValueError("a history is either all records or all Op")
        ops = parse([item for item in items if not isinstance(item, Op)])
    _check_unique_values(ops)
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    keys = [_Key(key, key_ops) for key, key_ops in by_key.items()]
    results: dict[str, KeyResult] = {}
    todo = sorted(keys, key=lambda k: (len(k.kept), k.key))
    for _attempt in range(1 if per_key_budget_s is not None else 2):
        for j, key in enumerate(todo):
            now = clock()
            if per_key_budget_s is not None:
                key_deadline = min(deadline, now + per_key_budget_s)
            else:
                key_deadline = now + (deadline - now) / (len(todo) - j)
            results[key.key] = key.check(key_deadline, clock)
        todo = [key for key in todo if results[key.key].valid is None]
    lost = sorted((op for k in keys for op in k.lost.values()), key=lambda op: op.index)
    fab = sorted((op for k in keys for op in k.fail_but_applied.values()), key=lambda o: o.index)
    unknown = sorted(k for k, r in results.items() if r.valid is None)
    valid: bool | None = True
    if lost or fab or any(r.valid is False for r in results.values()):
        valid = False
    elif unknown:
        valid = None
    return Report(
        valid=valid,
        keys=dict(sorted(results.items())),
        lost_writes=lost,
        fail_but_applied=fab,
        unknown_keys=unknown,
        elapsed_s=clock() - start,
        ops=len(ops),
    )
