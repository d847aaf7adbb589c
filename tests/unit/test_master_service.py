"""The master's per-stream queue: bounded, ends after what was queued, quiet means None."""

from __future__ import annotations

from scheduler.master_service import CLOSE, Conn


async def test_a_full_queue_refuses_and_a_closed_one_ends_after_its_items() -> None:
    conn = Conn(1, limit=2)
    assert conn.send("a") and conn.send("b")
    assert not conn.send("c")  # full: the daemon drops the stream
    conn.close("error")
    assert conn.send("ignored")  # after close: silently dropped
    assert [await conn.next(0.01) for _ in range(4)] == ["a", "b", "error", CLOSE]


async def test_a_quiet_queue_times_out_with_none() -> None:
    conn = Conn(2, limit=10)
    assert await conn.next(0.01) is None
    conn.send("x")
    assert await conn.next(0.01) == "x"
