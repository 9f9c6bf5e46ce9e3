"""An A2A client, written with the official Python SDK (a2a-sdk 1.3), talking to agents
on an agentmesh node: every mesh agent is an A2A agent at http://NODE/a2a/AGENT.

    python3 -m pip install "a2a-sdk==1.3.0"
    python3 a2a_client.py send http://127.0.0.1:7700/a2a/echo --text hello

Each command prints one JSON object on stdout (the tests read it).
"""

import argparse
import asyncio
import json
import sys
import uuid

from google.protobuf.json_format import MessageToDict, ParseDict

from a2a.client import ClientConfig, create_client
from a2a.client.errors import A2AClientError
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskState,
)
from google.protobuf import struct_pb2


def message(args, message_id=None):
    """A user message: one text part (--text) or one data part (--data JSON)."""
    if args.data is not None:
        value = struct_pb2.Value()
        value.struct_value.update(json.loads(args.data))
        part = Part(data=value)
    else:
        part = Part(text=args.text)
    msg = Message(
        message_id=message_id or args.message_id or str(uuid.uuid4()),
        role=Role.ROLE_USER,
        parts=[part],
    )
    if args.context_id:
        msg.context_id = args.context_id
    return msg


async def client_for(args, streaming):
    bindings = [args.binding] if args.binding else []
    config = ClientConfig(streaming=streaming, supported_protocol_bindings=bindings)
    if args.card:
        # A card resolved earlier (clients keep them): the agent itself may be down now.
        with open(args.card) as f:
            card = ParseDict(json.load(f), AgentCard(), ignore_unknown_fields=True)
        return await create_client(card, client_config=config)
    return await create_client(args.url, client_config=config)


def as_dict(proto):
    return MessageToDict(proto)


async def card(args):
    client = await client_for(args, True)
    card = await client.get_card() if hasattr(client, "get_card") else client._card
    return as_dict(card)


async def send(args):
    """SendMessage (blocking, or with --no-wait returning at once)."""
    client = await client_for(args, False)
    request = SendMessageRequest(message=message(args))
    if args.no_wait:
        request.configuration.CopyFrom(SendMessageConfiguration(return_immediately=True))
    responses = [as_dict(r) async for r in client.send_message(request)]
    return {"responses": responses}


async def send_twice(args):
    """The same message (same messageId) sent twice: a client retrying."""
    client = await client_for(args, False)
    msg = message(args)
    first = [as_dict(r) async for r in client.send_message(SendMessageRequest(message=msg))]
    second = [as_dict(r) async for r in client.send_message(SendMessageRequest(message=msg))]
    return {"first": first, "second": second}


async def stream(args):
    """SendStreamingMessage; with --cut-after N, drops the connection after N events and
    follows the task again with SubscribeToTask."""
    client = await client_for(args, True)
    events = []
    task_id = None
    it = client.send_message(SendMessageRequest(message=message(args)))
    async for event in it:
        event = as_dict(event)
        events.append(event)
        task_id = task_id or event.get("task", {}).get("id")
        if args.cut_after and len(events) >= args.cut_after:
            break
    await it.aclose()
    resumed = []
    if args.cut_after:
        # A fresh client: the first one's connection is gone.
        client = await client_for(args, True)
        async for event in client.subscribe(SubscribeToTaskRequest(id=task_id)):
            resumed.append(as_dict(event))
    return {"taskId": task_id, "events": events, "resumed": resumed}


async def get(args):
    client = await client_for(args, False)
    request = GetTaskRequest(id=args.task)
    if args.history_length is not None:
        request.history_length = args.history_length
    return as_dict(await client.get_task(request))


async def wait(args):
    """Polls GetTask until the task is done."""
    client = await client_for(args, False)
    for _ in range(600):
        task = await client.get_task(GetTaskRequest(id=args.task))
        if task.status.state in (
            TaskState.TASK_STATE_COMPLETED,
            TaskState.TASK_STATE_FAILED,
            TaskState.TASK_STATE_CANCELED,
        ):
            return as_dict(task)
        await asyncio.sleep(0.1)
    return {"error": "not done after 60 s", "task": as_dict(task)}


async def list_tasks(args):
    client = await client_for(args, False)
    request = ListTasksRequest(include_artifacts=True)
    if args.context_id:
        request.context_id = args.context_id
    if args.page_size:
        request.page_size = args.page_size
    pages = []
    while True:
        page = await client.list_tasks(request)
        pages.append(as_dict(page))
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    return {"pages": pages}


async def cancel(args):
    client = await client_for(args, False)
    first = as_dict(await client.cancel_task(CancelTaskRequest(id=args.task)))
    try:
        await client.cancel_task(CancelTaskRequest(id=args.task))
        again = None
    except A2AClientError as e:
        again = type(e).__name__
    except Exception as e:  # the SDK's A2A errors
        again = type(e).__name__
    return {"canceled": first, "again": again}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["card", "send", "send-twice", "stream", "get", "wait", "list", "cancel"])
    parser.add_argument("url", help="the agent's base URL, http://NODE/a2a/AGENT")
    parser.add_argument("--card", default=None, help="use this card (JSON file) instead of resolving it")
    parser.add_argument("--binding", choices=["JSONRPC", "HTTP+JSON"], default=None)
    parser.add_argument("--text", default="hello")
    parser.add_argument("--data", default=None, help="a JSON object sent as one data part")
    parser.add_argument("--message-id", default=None)
    parser.add_argument("--context-id", default=None)
    parser.add_argument("--no-wait", action="store_true", help="returnImmediately")
    parser.add_argument("--cut-after", type=int, default=0)
    parser.add_argument("--task", default=None)
    parser.add_argument("--history-length", type=int, default=None)
    parser.add_argument("--page-size", type=int, default=0)
    args = parser.parse_args()
    commands = {
        "card": card, "send": send, "send-twice": send_twice, "stream": stream,
        "get": get, "wait": wait, "list": list_tasks, "cancel": cancel,
    }
    result = await commands[args.command](args)
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    asyncio.run(main())
