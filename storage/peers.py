"""gRPC channels from this node to the other storage nodes' Replica service.

Owns one channel per peer node id, re-created when the peer's address changes (a node
restarted on another port). Internal traffic keeps to the same message cap as the client
API: the replication shell sizes its Append batches to fit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from storage import limits
from storage.v1 import replica_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.min_reconnect_backoff_ms", 100),
]


class Peers:
    """Replica-service stubs for peer nodes, keyed by node id."""

    def __init__(self) -> None:
        self._addresses: dict[str, str] = {}
        self._channels: dict[
            str, tuple[str, grpc.aio.Channel, replica_pb2_grpc.ReplicaAsyncStub]
        ] = {}
        self._retired: list[grpc.aio.Channel] = []

    def update(self, addresses: Mapping[str, str]) -> None:
        """Learn current addresses (from ZooKeeper node records)."""
        for node_id, address in addresses.items():
            if address:
                self._addresses[node_id] = address

    def address(self, node_id: str) -> str:
        return self._addresses.get(node_id, "")

    def stub(self, node_id: str) -> replica_pb2_grpc.ReplicaAsyncStub | None:
        held = self._held(node_id)
        return held[2] if held else None

    def channel(self, node_id: str) -> grpc.aio.Channel | None:
        held = self._held(node_id)
        return held[1] if held else None

    def _held(self, node_id: str
              ) -> tuple[str, grpc.aio.Channel, replica_pb2_grpc.ReplicaAsyncStub] | None:
        address = self._addresses.get(node_id)
        if not address:
            return None
        held = self._channels.get(node_id)
        if held is not None and held[0] == address:
            return held
        if held is not None:
            self._retired.append(held[1])
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub: replica_pb2_grpc.ReplicaAsyncStub = replica_pb2_grpc.ReplicaStub(channel)
        self._channels[node_id] = (address, channel, stub)
        log.debug("peer channel node=%s address=%s", node_id, address)
        return self._channels[node_id]

    async def close(self) -> None:
        channels = [held[1] for held in self._channels.values()] + self._retired
        self._channels.clear()
        self._retired.clear()
        for channel in channels:
            await channel.close(grace=None)
