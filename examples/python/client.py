"""An agentmesh client in Python: everything goes through the node.

It invokes an agent, reads a stream from it, holds a short conversation with it, then
submits a message to a durable queue, consumes it (acking with a result) and reads the
stored result back. Each step prints one JSON line on stdout:

    {"step": "invoke", "correlation_id": …, "reply": <payload>}
    {"step": "stream", "events": [{"sequence": 1, "kind": "PROGRESS", "payload": …}, …]}
    {"step": "converse", "replies": [<payload>, …]}
    {"step": "submit", "queue": …, "message_id": …, "correlation_id": …}
    {"step": "consume", "message_id": …, "payload": …, "attempt": 1}
    {"step": "result", "correlation_id": …, "payload": …}

Calls carry `--correlation-id` (as `x-correlation-id` and in the envelope; Converse
and the queue add a suffix) and `--timeout` as their gRPC deadline.

    python client.py --node 127.0.0.1:7700 --target py-echo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

import protos

pb = protos.load()

CORRELATION_ID = "x-correlation-id"


def json_envelope(kind: str, value: Any, **fields: Any) -> Any:
    envelope = pb.envelope.Envelope(type=kind, content_type="application/json", **fields)
    envelope.json.CopyFrom(json_format.ParseDict(value, struct_pb2.Value()))
    return envelope


def payload_of(envelope: Any) -> Any:
    if envelope.WhichOneof("payload") != "json":
        return None
    return whole_numbers(json_format.MessageToDict(envelope.json))


def whole_numbers(value: Any) -> Any:
    """`value` with integral floats as ints: a JSON payload's numbers are doubles on the
    wire, and `{"n": 3}` should print as it was sent, not as `{"n": 3.0}`."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    return value


def emit(step: str, **fields: Any) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


class Client:
    """Stubs of the node's services and the options every call shares."""

    def __init__(self, channel: grpc.aio.Channel, correlation_id: str, timeout: float) -> None:
        self.agents = pb.agent_grpc.AgentServiceStub(channel)
        self.queues = pb.queue_grpc.QueueServiceStub(channel)
        self.correlation_id = correlation_id
        self.timeout = timeout

    def metadata(self, correlation_id: str | None = None) -> tuple[tuple[str, str], ...]:
        return ((CORRELATION_ID, correlation_id or self.correlation_id),)

    async def invoke(self, target: str) -> None:
        request = pb.agent.InvokeRequest(
            envelope=json_envelope(
                "echo.request",
                {"text": "hello from Python"},
                target=target,
                correlation_id=self.correlation_id,
            )
        )
        call = self.agents.Invoke(request, timeout=self.timeout, metadata=self.metadata())
        response = await call
        headers = await call.initial_metadata()
        emit(
            "invoke",
            correlation_id=headers.get(CORRELATION_ID, "") if headers else "",
            reply=payload_of(response.envelope),
        )

    async def stream(self, target: str, n: int) -> None:
        request = pb.agent.StreamRequest(
            envelope=json_envelope(
                "echo.request", {"n": n}, target=target, correlation_id=self.correlation_id
            )
        )
        events = []
        kinds = pb.agent.StreamEventKind
        async for event in self.agents.Stream(
            request, timeout=self.timeout, metadata=self.metadata()
        ):
            events.append(
                {
                    "stream_id": event.stream_id,
                    "sequence": event.sequence,
                    "kind": kinds.Name(event.kind).removeprefix("STREAM_EVENT_KIND_"),
                    "message": event.message,
                    "payload": payload_of(event.envelope),
                }
            )
        emit("stream", events=events)

    async def converse(self, target: str, turns: int) -> None:
        correlation_id = f"{self.correlation_id}-converse"

        async def frames() -> AsyncIterator[Any]:
            open_frame = pb.agent.ConverseOpen(target=target)
            open_frame.heartbeat_interval.FromSeconds(5)
            yield pb.agent.ConverseRequest(open=open_frame)
            for turn in range(1, turns + 1):
                yield pb.agent.ConverseRequest(
                    envelope=json_envelope(
                        "echo.turn", {"say": turn}, correlation_id=correlation_id
                    )
                )
            # Returning half-closes our side; the agent answers what it got and ends.

        replies = []
        async for frame in self.agents.Converse(
            frames(), timeout=self.timeout, metadata=self.metadata(correlation_id)
        ):
            if frame.WhichOneof("frame") == "envelope":
                replies.append(payload_of(frame.envelope))
        emit("converse", correlation_id=correlation_id, replies=replies)

    async def queue_round_trip(self, queue: str) -> None:
        correlation_id = f"{self.correlation_id}-queue"

        async def submissions() -> AsyncIterator[Any]:
            yield pb.queue.SubmitRequest(
                queue=queue,
                envelope=json_envelope(
                    "job.request", {"task": "resize"}, correlation_id=correlation_id
                ),
            )

        submitted = await self.queues.Submit(submissions(), timeout=self.timeout)
        outcome = submitted.outcomes[0]
        status = pb.queue.SubmitStatus.Name(outcome.status).removeprefix("SUBMIT_STATUS_")
        if status != "ACCEPTED":
            raise SystemExit(f"submit to {queue} was {status}: {outcome.reason}")
        emit(
            "submit",
            queue=queue,
            message_id=outcome.message_id,
            correlation_id=correlation_id,
        )

        # Consume: subscribe, take the delivery, ack it with a result, wait for the receipt.
        actions: asyncio.Queue[Any] = asyncio.Queue()
        subscribe = pb.queue.ConsumeSubscribe(queue=queue, prefetch=1, consumer_id="python-client")
        await actions.put(pb.queue.ConsumeRequest(subscribe=subscribe))

        async def requests() -> AsyncIterator[Any]:
            while (action := await actions.get()) is not None:
                yield action

        consumer = self.queues.Consume(requests(), timeout=self.timeout)
        async for frame in consumer:
            which = frame.WhichOneof("event")
            if which == "delivery":
                delivery = frame.delivery
                emit(
                    "consume",
                    message_id=delivery.envelope.id,
                    payload=payload_of(delivery.envelope),
                    attempt=delivery.attempt,
                )
                result = json_envelope(
                    "job.result", {"resized": True}, correlation_id=correlation_id
                )
                ack = pb.queue.ConsumeAck(receipt=delivery.receipt, result=result)
                await actions.put(pb.queue.ConsumeRequest(ack=ack))
            elif which == "receipt":
                if frame.receipt.error.code:
                    raise SystemExit(f"ack failed: {frame.receipt.error.message}")
                break
        await actions.put(None)
        consumer.cancel()

        stored = await self.queues.GetResult(
            pb.queue.GetResultRequest(correlation_id=correlation_id, wait=True),
            timeout=self.timeout,
        )
        emit("result", correlation_id=correlation_id, payload=payload_of(stored.result))


async def run(args: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(args.node) as channel:
        client = Client(channel, args.correlation_id, args.timeout)
        await client.invoke(args.target)
        await client.stream(args.target, args.n)
        await client.converse(args.target, args.turns)
        await client.queue_round_trip(args.queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", default="127.0.0.1:7700", help="the node's gRPC address")
    parser.add_argument("--target", default="py-echo", help="an agent name or skill:<id>")
    parser.add_argument("--queue", default="py-jobs", help="the queue to submit to and consume")
    parser.add_argument(
        "--correlation-id",
        default=f"py-{uuid.uuid4()}",
        help="sent as x-correlation-id (default: a fresh one)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each call, s")
    parser.add_argument("--n", type=int, default=3, help="partial results to stream")
    parser.add_argument("--turns", type=int, default=2, help="messages in the conversation")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
