"""Which live storage nodes the ring controller takes as down, from its health probes.

Pure: given probe outcomes and clock readings, no I/O. The controller (storage/controller.py)
probes every live node every `probe_interval` and feeds each round in here; a node taken
as down has its leaderships failed over through a Promise round, which keeps a wrong
verdict safe (it costs availability, never correctness).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Probe(enum.Enum):
    """What one health probe of a node found."""

    ANSWERED = "answered"
    REFUSED = "refused"  # connection refused: the process is gone
    SILENT = "silent"  # no answer within PROBE_TIMEOUT: frozen, or very slow


class FailureDetector:
    """Which live nodes the controller takes as down, from its health probes.

    Pure: it is given probe outcomes and clock readings and does no I/O.
    - A node whose connection is refused is down at once (`refusing`): its process is gone.
    - A node whose probes time out `min_silent` times in a row, the first of them sent at
      least `window` seconds before the last one ended, is `suspected`: frozen, or too
      slow to lead. Any answer (a probe, a Promise) clears it.
    - A round in which no node answered, nor refused, counts for no one: the controller
      itself (a stalled event loop, a lost network) is then the likely culprit.
    - Silence is counted only while the controller's own ZooKeeper session is CONNECTED
      (`count_silence`); otherwise every suspicion is forgotten.
    - `suspected_at` remembers when each node was last suspected, so leadership is not
      handed straight back to a node that may still be struggling.
    """

    def __init__(self, window: float, min_silent: int = 2) -> None:
        self.window = window
        self.min_silent = min_silent
        self.refusing: frozenset[str] = frozenset()
        self.suspected: frozenset[str] = frozenset()
        self._silent: dict[str, tuple[float, int]] = {}  # node -> (first sent, count)
        self.suspected_at: dict[str, float] = {}

    @property
    def down(self) -> frozenset[str]:
        return self.refusing | self.suspected

    def silent_for(self, node: str, now: float) -> float:
        """Seconds since the first of the node's current run of timed-out probes was sent."""
        first = self._silent.get(node)
        return now - first[0] if first is not None else 0.0

    def observe(self, sent_at: float, now: float, outcomes: Mapping[str, Probe], *,
                count_silence: bool = True) -> None:
        """Record one probe round, sent at `sent_at` and over by `now`. A node missing
        from `outcomes` is no longer live: what was known of it is dropped."""
        self.refusing = frozenset(n for n, o in outcomes.items() if o is Probe.REFUSED)
        heard = any(o is not Probe.SILENT for o in outcomes.values())
        if not count_silence:
            self.reset()
            return
        suspected = set(self.suspected) & set(outcomes)
        for node in list(self._silent):
            if outcomes.get(node, Probe.ANSWERED) is not Probe.SILENT:
                del self._silent[node]
                suspected.discard(node)
        for node, outcome in outcomes.items():
            if outcome is not Probe.SILENT or not heard:
                continue
            first, count = self._silent.get(node, (sent_at, 0))
            self._silent[node] = (first, count + 1)
            if count + 1 >= self.min_silent and now - first >= self.window \
                    and node not in suspected:
                suspected.add(node)
                self.suspected_at[node] = now
        self.suspected = frozenset(suspected)

    def heard_from(self, node: str) -> None:
        """`node` answered something (a Promise): it is not frozen."""
        self._silent.pop(node, None)
        self.suspected = self.suspected - {node}

    def recently_suspected(self, now: float, within: float) -> set[str]:
        return {n for n, at in self.suspected_at.items() if now - at < within}

    def reset(self) -> None:
        """Forget every silence and suspicion (not `suspected_at`)."""
        self._silent.clear()
        self.suspected = frozenset()
