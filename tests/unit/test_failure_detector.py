"""The controller's failure detector: suspicion from probe outcomes and clock readings."""

from __future__ import annotations

import pytest

from storage.failure_detector import FailureDetector, Probe

A, S, R = Probe.ANSWERED, Probe.SILENT, Probe.REFUSED


def rounds(detector: FailureDetector, *outcomes: dict[str, Probe], start: float = 0.0,
           every: float = 0.75, takes: float = 0.5) -> float:
    """Feed probe rounds sent every `every` s, each over `takes` s later; return the end."""
    now = start
    for i, round_ in enumerate(outcomes):
        sent = start + i * every
        now = sent + takes
        detector.observe(sent, now, round_)
    return now


def test_a_silent_node_is_suspected_only_after_the_window() -> None:
    detector = FailureDetector(window=2.0)
    silent = {"n1": A, "n2": A, "n3": S}
    rounds(detector, *[silent] * 2)  # two timeouts spanning 1.25 s
    assert detector.suspected == frozenset()
    rounds(detector, silent, start=1.5)  # the third ends 2.0 s after the first was sent
    assert detector.suspected == {"n3"} and detector.down == {"n3"}
    assert detector.silent_for("n3", 2.0) == pytest.approx(2.0)


def test_one_answer_clears_a_suspicion_and_restarts_the_count() -> None:
    detector = FailureDetector(window=2.0)
    silent = {"n1": A, "n3": S}
    rounds(detector, *[silent] * 4)
    assert detector.suspected == {"n3"}
    rounds(detector, {"n1": A, "n3": A}, start=3.0)
    assert detector.suspected == frozenset()
    rounds(detector, *[silent] * 3, start=3.75, every=0.5)  # only 1.5 s of silence
    assert detector.suspected == frozenset()
    detector.observe(5.5, 6.0, silent)  # the fourth: 2.25 s since the first of this run
    assert detector.suspected == {"n3"}
    detector.heard_from("n3")  # it answered a Promise
    assert detector.suspected == frozenset()
    detector.observe(6.25, 6.75, silent)  # and the count starts again
    assert detector.suspected == frozenset()


def test_a_slow_answer_is_not_silence_and_one_long_timeout_is_not_enough() -> None:
    detector = FailureDetector(window=2.0)
    detector.observe(0.0, 3.0, {"n1": A, "n2": S})  # one probe stuck 3 s: a stall
    assert detector.suspected == frozenset()
    detector.observe(3.25, 3.5, {"n1": A, "n2": A})
    assert detector.suspected == frozenset()


def test_a_round_nobody_answered_counts_for_nobody() -> None:
    detector = FailureDetector(window=2.0)
    rounds(detector, *[{"n1": S, "n2": S, "n3": S}] * 6)  # the controller's own trouble
    assert detector.suspected == frozenset()
    refused = {"n1": R, "n2": S, "n3": S}  # a refusal is an answer from the network
    rounds(detector, *[refused] * 4)
    assert detector.refusing == {"n1"} and detector.suspected == {"n2", "n3"}


def test_silence_counts_only_while_the_controllers_session_is_connected() -> None:
    detector = FailureDetector(window=2.0)
    silent = {"n1": A, "n3": S}
    rounds(detector, *[silent] * 4)
    assert detector.suspected == {"n3"}
    detector.observe(3.0, 3.5, silent, count_silence=False)  # SUSPENDED
    assert detector.suspected == frozenset()
    rounds(detector, *[silent] * 2, start=3.75)
    assert detector.suspected == frozenset()  # a whole new window is needed


def test_refusal_is_down_at_once_and_a_node_gone_from_live_is_forgotten() -> None:
    detector = FailureDetector(window=2.0)
    detector.observe(0.0, 0.01, {"n1": A, "n2": R})
    assert detector.down == {"n2"}
    rounds(detector, *[{"n1": A, "n2": S}] * 4)
    assert detector.suspected == {"n2"}
    detector.observe(3.0, 3.1, {"n1": A})
    assert detector.down == frozenset() and detector.recently_suspected(3.1, 10.0) == {"n2"}
