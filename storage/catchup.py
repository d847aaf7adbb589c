"""Snapshot catch-up, both ends: a leader streams a partition to a follower behind its log.

Role: the shell around `storage/snapshot.py` (which holds the decisions, the digest and
the engine reader and writer). A leader's `Senders` (`storage/sender.py`) hand it a
follower whose next index is at or below the leader's base (`start_snapshot`); the
follower's servicer hands it the incoming stream (`install_snapshot`). Afterwards the
follower gets the log tail by ordinary Appends.

Invariants:
- At most one snapshot is sent per (peer, partition) at a time; a failed one is retried
  with bounded backoff (`Tuning.snapshot_retry_max`), at once when it failed only because
  the peer was unreachable and the peer answers again. A leader that steps down stops
  sending the partition's snapshots (`forget`).
- A sent snapshot is the applied state at exactly its header's position: nothing awaits
  between reading the applied index and opening the engine iterators. While it is sent,
  `PartitionReplica.sending` keeps the log entries after that position from retention
  (`storage/apply.py`). The follower counts as holding that position (`match`) only
  once it has accepted the snapshot.
- A follower installs a snapshot all or nothing: the epoch fence (`decide_install`) is
  checked on the header and again just before the write; the counts and digest are
  checked; then one engine batch replaces the partition and its meta, with no `await`
  between the last check and the write. A follower that led the partition steps down
  first. Any refusal writes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING

import grpc

from storage.replication import LeaderProgress, LogPosition
from storage.snapshot import (
    Section,
    SnapshotHeader,
    SnapshotInstall,
    SnapshotRejected,
    SnapshotSource,
    SnapshotTrailer,
    decide_install,
)
from storage.v1 import replica_pb2

if TYPE_CHECKING:
    from storage.replica import PartitionReplica, Replicas

log = logging.getLogger(__name__)


class Catchup:
    """Snapshot sending (as a leader) and installing (as a follower) for one node."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas
        self.engine = replicas.engine
        self.node_id = replicas.node_id
        self.peers = replicas.peers
        self.tuning = replicas.tuning
        self._closed = False
        self._snapshots: dict[tuple[str, int], asyncio.Task[None]] = {}
        # (peer, partition) -> (failed attempts, retry not before, failed as unreachable)
        self._snapshot_failures: dict[tuple[str, int], tuple[int, float, bool]] = {}

    def stop(self) -> list[asyncio.Task[None]]:
        """Cancel every snapshot being sent; return their tasks for the caller to await."""
        self._closed = True
        snapshots = list(self._snapshots.values())
        for task in snapshots:
            task.cancel()
        return snapshots

    def forget(self, p: int) -> None:
        """This node no longer leads p: stop its snapshot sends and forget their failures."""
        for key in [k for k in self._snapshots if k[1] == p]:
            self._snapshots[key].cancel()
        for key in [k for k in self._snapshot_failures if k[1] == p]:
            del self._snapshot_failures[key]

    # -- snapshots: leader side ---------------------------------------------------------

    def start_snapshot(self, r: PartitionReplica, lp: LeaderProgress, peer: str) -> None:
        """Send peer a snapshot of r, unless one is in flight or a retry is not yet due."""
        key = (peer, r.partition)
        if key in self._snapshots or self._closed:
            return
        failures, retry_at, _ = self._snapshot_failures.get(key, (0, 0.0, False))
        if time.monotonic() < retry_at:
            return
        log.log(logging.INFO if failures % 10 == 0 else logging.DEBUG,
                "follower behind the retained log: sending a snapshot partition=%d peer=%s "
                "next=%d base=%d attempt=%d", r.partition, peer, lp.next[peer],
                r.meta.base_index, failures + 1)
        task = asyncio.create_task(self._send_snapshot(r, lp, peer),
                                   name=f"snapshot-{peer}-{r.partition}")
        self._snapshots[key] = task
        task.add_done_callback(functools.partial(self._snapshot_done, key))

    def peer_reachable(self, peer: str) -> None:
        """The peer answered: snapshots that failed only because it was unreachable are
        due at once, not after their backoff (a restarted follower catches up sooner)."""
        for key, (failures, _, unreachable) in list(self._snapshot_failures.items()):
            if unreachable and key[0] == peer:
                self._snapshot_failures[key] = (failures, 0.0, False)

    def _snapshot_done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self._snapshots.get(key) is task:
            del self._snapshots[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("snapshot sender crashed peer=%s partition=%d", *key,
                      exc_info=task.exception())

    async def _send_snapshot(self, r: PartitionReplica, lp: LeaderProgress, peer: str) -> None:
        stub = self.peers.stub(peer)
        if stub is None or r.leader is not lp:
            return
        # No await from reading the applied position to opening the iterators: the view
        # is exactly the state at that position.
        index = r.meta.applied_index
        epoch = self.replicas.epoch_at(r, index)
        if epoch is None:
            log.error("no epoch for the applied index partition=%d index=%d", r.partition, index)
            return
        source = SnapshotSource(self.engine, SnapshotHeader(
            r.partition, lp.epoch, epoch, index, self.node_id))
        r.sending[peer] = index
        started = time.monotonic()
        response: replica_pb2.InstallSnapshotResponse | None = None
        unreachable = False
        try:
            response = await stub.InstallSnapshot(_snapshot_stream(source),
                                                  timeout=self.tuning.snapshot_timeout)
            reason = response.reason
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            unreachable = exc.code() == grpc.StatusCode.UNAVAILABLE
        except Exception as exc:  # e.g. reading the engine failed: retried like the rest
            log.exception("snapshot stream failed partition=%d peer=%s", r.partition, peer)
            reason = f"stream failed: {exc!r}"
        finally:
            source.close()
            if r.sending.get(peer) == index:
                del r.sending[peer]
        key = (peer, r.partition)
        if response is not None and response.accepted:
            self._snapshot_failures.pop(key, None)
            t = source.trailer()
            log.info("snapshot sent partition=%d peer=%s position=%d.%d keys=%d requests=%d "
                     "bytes=%d seconds=%.3f", r.partition, peer, epoch, index, t.data_items,
                     t.request_items, source.bytes, time.monotonic() - started)
            if r.leader is lp:
                lp.next[peer] = max(lp.next[peer], index + 1)
                lp.match[peer] = max(lp.match[peer], index)
                r.notify()
                self.replicas.senders.sender(peer).wake()
            return
        if r.leader is lp and response is not None:
            if response.promised_epoch > lp.epoch:
                self.replicas.step_down(r, f"{peer} promised epoch {response.promised_epoch}")
                return
            if response.last_index > r.meta.base_index:  # it holds enough: back to the log
                lp.next[peer] = max(1, min(response.last_index + 1, r.last.index + 1))
        failures = self._snapshot_failures.get(key, (0, 0.0, False))[0] + 1
        delay = min(self.tuning.snapshot_retry_max,
                    self.tuning.retry_min * 2 ** min(failures, 10)) * (0.5 + random.random() / 2)
        self._snapshot_failures[key] = (failures, time.monotonic() + delay, unreachable)
        level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
        log.log(level, "snapshot not installed partition=%d peer=%s failures=%d retry_in=%.2fs "
                "reason=%s", r.partition, peer, failures, delay, reason)

    # -- snapshots: follower side ---------------------------------------------------------

    async def install_snapshot(self, chunks: AsyncIterable[replica_pb2.SnapshotChunk]
                               ) -> replica_pb2.InstallSnapshotResponse:
        """Receive a snapshot stream and install it all or nothing (storage/snapshot.py)."""
        header: SnapshotHeader | None = None
        install: SnapshotInstall | None = None
        started = time.monotonic()
        accepted, reason = False, ""
        try:
            async for chunk in chunks:
                if install is None:
                    header = _snapshot_header(chunk)
                    self._check_install(self.replicas.open_replica(header.partition), header)
                    log.info("snapshot receiving partition=%d epoch=%d position=%d.%d "
                             "leader=%s", header.partition, header.epoch, header.base_epoch,
                             header.base_index, header.leader_id)
                    install = SnapshotInstall(self.engine, header)
                    continue
                if chunk.HasField("header"):
                    raise SnapshotRejected("a second header")
                if chunk.data:
                    install.add(Section.DATA, [(i.key, i.value) for i in chunk.data])
                if chunk.requests:
                    install.add(Section.REQUESTS, [(i.key, i.value) for i in chunk.requests])
                if chunk.HasField("trailer"):
                    t = chunk.trailer
                    install.finish(SnapshotTrailer(t.data_items, t.request_items, t.digest))
            if install is None:
                raise SnapshotRejected("an empty stream")
            self._commit_snapshot(install, started)
            accepted = True
        except SnapshotRejected as exc:
            reason = str(exc)
        except Exception as exc:  # nothing was written: the batch is dropped with `install`
            log.exception("snapshot install failed")
            reason = f"install failed: {exc}"
        p = header.partition if header is not None else 0
        r = self.replicas.replica(p)
        if not accepted:
            log.warning("snapshot refused partition=%d leader=%s reason=%s", p,
                        header.leader_id if header else "?", reason)
        return replica_pb2.InstallSnapshotResponse(
            partition=p, accepted=accepted, reason=reason,
            promised_epoch=r.meta.promised_epoch if r else 0,
            last_epoch=r.last.epoch if r else 0, last_index=r.last.index if r else 0,
            node_id=self.node_id)

    def _check_install(self, r: PartitionReplica, header: SnapshotHeader) -> None:
        reason = decide_install(header, promised_epoch=r.meta.promised_epoch,
                                commit_index=r.meta.commit_index,
                                leading_epoch=r.leader.epoch if r.leader else None)
        if reason:
            raise SnapshotRejected(reason)

    def _commit_snapshot(self, install: SnapshotInstall, started: float) -> None:
        """Re-check the fence, write the snapshot in one batch, reset the replica. No await."""
        h = install.header
        r = self.replicas.open_replica(h.partition)
        self._check_install(r, h)
        if r.leader is not None:
            self.replicas.step_down(r, f"installing a snapshot of epoch {h.epoch}")
        r.meta = install.commit(r.meta.promised_epoch)
        r.last = LogPosition(h.base_epoch, h.base_index)
        r.tail.clear()
        r.log_bytes = 0
        r.notify()
        log.info("snapshot installed partition=%d epoch=%d position=%d.%d bytes=%d "
                 "seconds=%.3f leader=%s", h.partition, h.epoch, h.base_epoch, h.base_index,
                 install.bytes, time.monotonic() - started, h.leader_id)


def _snapshot_header(chunk: replica_pb2.SnapshotChunk) -> SnapshotHeader:
    """The header that must open a snapshot stream, alone in its message."""
    if not chunk.HasField("header"):
        raise SnapshotRejected("the stream does not start with a header")
    if chunk.data or chunk.requests or chunk.HasField("trailer"):
        raise SnapshotRejected("the header must travel alone")
    h = chunk.header
    return SnapshotHeader(h.partition, h.epoch, h.base_epoch, h.base_index, h.leader_id)


async def _snapshot_stream(source: SnapshotSource) -> AsyncIterator[replica_pb2.SnapshotChunk]:
    """A snapshot as gRPC messages: header, item chunks, trailer; yields to the event loop
    between chunks, and reads the engine one chunk at a time."""
    h = source.header
    yield replica_pb2.SnapshotChunk(header=replica_pb2.SnapshotHeader(
        partition=h.partition, epoch=h.epoch, base_epoch=h.base_epoch,
        base_index=h.base_index, leader_id=h.leader_id))
    for section, items in source.chunks():
        chunk = replica_pb2.SnapshotChunk()
        target = chunk.data if section is Section.DATA else chunk.requests
        for key, value in items:
            target.add(key=key, value=value)
        yield chunk
        await asyncio.sleep(0)
    t = source.trailer()
    yield replica_pb2.SnapshotChunk(trailer=replica_pb2.SnapshotTrailer(
        data_items=t.data_items, request_items=t.request_items, digest=t.digest))
