"""An agentmesh agent in Python: `agentmesh.v1.AgentService` on a port of its own,
registered with a node through `agentmesh.v1.DiscoveryService`.

It answers every style with what it was called with, so a caller can see what crossed
the mesh:

- Invoke: `{"echo": <payload>, "call": {...}}`.
- Stream: a progress event, `n` partial results `{"i": i}` (from `{"n": N}`, default 3),
  then the result `{"done": n, "call": {...}}`.
- Converse: one reply `{"turn": k, "echo": <payload>, "call": {...}}` per message, a
  heartbeat when quiet; ends when the caller half-closes.

`call` holds the `correlation_id` (the `x-correlation-id` metadata), the one in the
envelope, and `deadline_ms`: the time left when the call arrived (`time_remaining()`,
null without a deadline), which the node shortens at every hop. The same goes to the
response's initial metadata (`x-correlation-id`, `x-agent-deadline-ms`) and to the log
on stderr.

Once registered it prints one JSON line on stdout,
`{"registered": name, "instance_id": …, "endpoint": …}`; it renews its lease every
third of the TTL, registers again if the node lost it, and deregisters on SIGINT or
SIGTERM.

    python agent.py --node 127.0.0.1:7700 --name py-echo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

import protos

pb = protos.load()
log = logging.getLogger("agent")

CORRELATION_ID = "x-correlation-id"
MISSED_HEARTBEATS = 3
DEFAULT_HEARTBEAT = 5.0


def payload_of(envelope: Any) -> Any:
    """The envelope's JSON payload as Python values (None for other payloads)."""
    if envelope.WhichOneof("payload") != "json":
        return None
    return json_format.MessageToDict(envelope.json)


def json_envelope(kind: str, value: Any, request: Any, source: str) -> Any:
    """A reply envelope carrying `value` as JSON, answering `request`."""
    envelope = pb.envelope.Envelope(
        type=kind,
        content_type="application/json",
        correlation_id=request.correlation_id,
        causation_id=request.id,
        source=source,
    )
    envelope.json.CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
    envelope.created_at.GetCurrentTime()
    return envelope


class CallSeen:
    """What a call arrived with: its correlation id and the time it had left."""

    def __init__(self, style: str, context: grpc.aio.ServicerContext, envelope: Any = None):
        remaining = context.time_remaining()
        metadata = dict(context.invocation_metadata() or ())
        self.style = style
        self.correlation_id: str = metadata.get(CORRELATION_ID, "")
        self.envelope_correlation_id: str = envelope.correlation_id if envelope else ""
        self.deadline_ms: int | None = None if remaining is None else int(remaining * 1000)
        log.info(
            "%s correlation_id=%s deadline_ms=%s",
            style,
            self.correlation_id or "-",
            "none" if self.deadline_ms is None else self.deadline_ms,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "style": self.style,
            "correlation_id": self.correlation_id,
            "envelope_correlation_id": self.envelope_correlation_id,
            "deadline_ms": self.deadline_ms,
        }

    def as_metadata(self) -> tuple[tuple[str, str], ...]:
        deadline = "none" if self.deadline_ms is None else str(self.deadline_ms)
        return ((CORRELATION_ID, self.correlation_id), ("x-agent-deadline-ms", deadline))


class EchoAgent(pb.agent_grpc.AgentServiceServicer):
    """Answers Invoke, Stream and Converse with what it was sent and how it arrived."""

    def __init__(self, source: str) -> None:
        self.source = source

    async def Invoke(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        seen = CallSeen("invoke", context, request.envelope)
        await context.send_initial_metadata(seen.as_metadata())
        reply = {"echo": payload_of(request.envelope), "call": seen.as_json()}
        return pb.agent.InvokeResponse(
            envelope=json_envelope("echo.reply", reply, request.envelope, self.source)
        )

    async def Stream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        seen = CallSeen("stream", context, request.envelope)
        await context.send_initial_metadata(seen.as_metadata())
        payload = payload_of(request.envelope)
        n = int(payload.get("n", 3)) if isinstance(payload, dict) else 3
        kinds = pb.agent.StreamEventKind
        yield pb.agent.StreamResponse(
            kind=kinds.Value("STREAM_EVENT_KIND_PROGRESS"),
            progress=0.0,
            message="starting",
            envelope=json_envelope("echo.progress", seen.as_json(), request.envelope, self.source),
        )
        for i in range(1, n + 1):
            yield pb.agent.StreamResponse(
                kind=kinds.Value("STREAM_EVENT_KIND_PARTIAL"),
                envelope=json_envelope("echo.partial", {"i": i}, request.envelope, self.source),
            )
        result = {"done": n, "call": seen.as_json()}
        yield pb.agent.StreamResponse(
            kind=kinds.Value("STREAM_EVENT_KIND_RESULT"),
            envelope=json_envelope("echo.result", result, request.envelope, self.source),
        )

    async def Converse(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        seen = CallSeen("converse", context)
        # Headers go out now, not with the first reply: the node waits for them.
        await context.send_initial_metadata(seen.as_metadata())
        frames: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
        interval = DEFAULT_HEARTBEAT

        async def read() -> None:
            async for frame in requests:
                await frames.put(frame)
            await frames.put(None)  # the caller half-closed

        reader = asyncio.create_task(read())
        turn = 0
        last_heard = last_sent = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                wait = min(last_sent + interval, last_heard + interval * MISSED_HEARTBEATS) - now
                try:
                    frame = await asyncio.wait_for(frames.get(), timeout=max(wait, 0))
                except asyncio.TimeoutError:
                    now = time.monotonic()
                    if now >= last_heard + interval * MISSED_HEARTBEATS:
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE,
                            f"peer silent for {int(interval * MISSED_HEARTBEATS * 1000)} ms "
                            f"({MISSED_HEARTBEATS} heartbeat intervals)",
                        )
                    last_sent = now
                    yield heartbeat()
                    continue
                if frame is None:
                    return
                last_heard = time.monotonic()
                which = frame.WhichOneof("frame")
                if which == "open":
                    if frame.open.HasField("heartbeat_interval"):
                        interval = max(
                            frame.open.heartbeat_interval.ToTimedelta().total_seconds(), 0.01
                        )
                elif which == "envelope":
                    turn += 1
                    envelope = frame.envelope
                    reply = {
                        "turn": turn,
                        "echo": payload_of(envelope),
                        "call": {
                            **seen.as_json(),
                            "envelope_correlation_id": envelope.correlation_id,
                        },
                    }
                    last_sent = time.monotonic()
                    yield pb.agent.ConverseResponse(
                        envelope=json_envelope("echo.turn", reply, envelope, self.source)
                    )
        finally:
            reader.cancel()


def heartbeat() -> Any:
    beat = pb.agent.ConverseHeartbeat()
    beat.sent_at.GetCurrentTime()
    return pb.agent.ConverseResponse(heartbeat=beat)


def agent_card(name: str, endpoint: str) -> Any:
    styles = pb.discovery.InteractionStyle
    return pb.discovery.AgentCard(
        name=name,
        version="1.0.0",
        description="Echoes each call with the correlation id and deadline it arrived with",
        endpoint=endpoint,
        skills=[pb.discovery.Skill(id=f"{name}-echo", tags=["python", "echo"], idempotent=True)],
        styles=[
            styles.Value("INTERACTION_STYLE_UNARY"),
            styles.Value("INTERACTION_STYLE_STREAM"),
            styles.Value("INTERACTION_STYLE_CONVERSE"),
        ],
        metadata={"language": "python"},
    )


class Registration:
    """The agent's lease with the node: registers, renews, registers again, deregisters."""

    def __init__(self, node: str, card: Any, ttl: float) -> None:
        self.channel = grpc.aio.insecure_channel(node)
        self.discovery = pb.discovery_grpc.DiscoveryServiceStub(self.channel)
        self.card = card
        self.ttl = ttl
        self.lease_id = ""

    async def register(self) -> Any:
        request = pb.discovery.RegisterRequest(card=self.card)
        request.ttl.FromMilliseconds(int(self.ttl * 1000))
        response = await self.discovery.Register(request, timeout=5)
        self.lease_id = response.lease.lease_id
        # Keep the node's instance id, so a register after a lost lease is the same instance.
        self.card = response.card
        return response

    async def keep_alive(self) -> None:
        """Renews the lease every third of its TTL; registers again when it is gone."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.discovery.Heartbeat(
                    pb.discovery.HeartbeatRequest(lease_id=self.lease_id), timeout=self.ttl / 3
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    log.warning("lease lost; registering again")
                    try:
                        await self.register()
                    except grpc.aio.AioRpcError as again:
                        log.warning("register failed: %s", again.details())
                else:
                    log.warning("heartbeat failed: %s", error.details())

    async def deregister(self) -> None:
        try:
            await self.discovery.Deregister(
                pb.discovery.DeregisterRequest(lease_id=self.lease_id), timeout=2
            )
            log.info("deregistered")
        except grpc.aio.AioRpcError as error:
            log.warning("deregister failed: %s", error.details())
        await self.channel.close()


async def serve(node: str, name: str, host: str, port: int, ttl: float) -> None:
    server = grpc.aio.server()
    endpoint_port = server.add_insecure_port(f"{host}:{port}")
    endpoint = f"http://{host}:{endpoint_port}"
    pb.agent_grpc.add_AgentServiceServicer_to_server(EchoAgent(source=name), server)
    await server.start()

    registration = Registration(node, agent_card(name, endpoint), ttl)
    registered = await registration.register()
    instance_id = registered.card.instance_id
    print(
        json.dumps({"registered": name, "instance_id": instance_id, "endpoint": endpoint}),
        flush=True,
    )
    log.info("%s (%s) serves at %s, registered with %s", name, instance_id, endpoint, node)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    renewing = asyncio.create_task(registration.keep_alive())
    await stop.wait()

    renewing.cancel()
    # Leave the registry first, so the node sends nothing new while calls finish.
    await registration.deregister()
    await server.stop(grace=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", default="127.0.0.1:7700", help="the node's gRPC address")
    parser.add_argument("--name", default="py-echo", help="the agent's name on the mesh")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on")
    parser.add_argument("--port", type=int, default=0, help="the port to serve on (0: any free)")
    parser.add_argument("--ttl", type=float, default=10.0, help="lease TTL in seconds")
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(serve(args.node, args.name, args.host, args.port, args.ttl))


if __name__ == "__main__":
    main()
