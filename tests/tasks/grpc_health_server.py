"""A test task: a gRPC server on $PORT0 whose grpc.health.v1 service says SERVING."""

from __future__ import annotations

import asyncio
import os

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def main() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{os.environ['PORT0']}")
    await server.start()
    print(f"pid {os.getpid()}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
