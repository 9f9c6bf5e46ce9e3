"""An A2A (Agent2Agent 1.0) agent written with the official Python SDK's server side
(`a2a-sdk[http-server]` 1.3, on Starlette and uvicorn), to be listed on an agentmesh node
by its card URL:

    python a2a_agent.py --port 9999
    agentmesh agents add-a2a http://127.0.0.1:9999 --name echo
    agentmesh call echo '"hi"'

It serves its card at `/.well-known/agent-card.json`, the JSON-RPC binding at `/` and
the HTTP+JSON binding at `/rest`; `--prefer rest` lists HTTP+JSON first in the card.

Its one skill, `echo`, answers with a task: a WORKING status, one artifact chunk per
word of the input, then COMPLETED with the message `echo: <input>` (the text of the
text parts, or the data parts as JSON). The input `fail` fails the task instead.

`--answer-early` answers every SendMessage at once with the task as it stands (as if the
client had set `returnImmediately`) and takes `--work-ms` to finish it: the client follows
the task with GetTask. `--ssl-certfile` and `--ssl-keyfile` serve it over https.

Once listening it prints one JSON line on stdout, `{"listening": "http://127.0.0.1:PORT"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

import uvicorn
from starlette.applications import Starlette

from a2a.helpers import get_data_parts, new_text_message, new_text_part
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import (
    create_agent_card_routes,
    create_jsonrpc_routes,
    create_rest_routes,
)
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
)


class Echo(AgentExecutor):
    """Echoes its input, word by word as artifact chunks, then as the final message."""

    def __init__(self, work_s: float = 0.0) -> None:
        self.work_s = work_s

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        message = context.message
        text = context.get_user_input(" ")
        if not text and message is not None:
            text = " ".join(json.dumps(d, sort_keys=True) for d in get_data_parts(message.parts))
        task = context.current_task or new_task_from_user_message(message)
        await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.start_work(updater.new_agent_message([new_text_part("working")]))
        if self.work_s:
            await asyncio.sleep(self.work_s)
        if text == "fail":
            await updater.failed(updater.new_agent_message([new_text_part("asked to fail")]))
            return
        for word in text.split():
            await updater.add_artifact([new_text_part(word)], name="words")
        await updater.complete(updater.new_agent_message([new_text_part(f"echo: {text}")]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.cancel()


class AnswersEarly(DefaultRequestHandler):
    """Answers a blocking SendMessage before its task is done."""

    async def on_message_send(self, params, context):
        params.configuration.return_immediately = True
        return await super().on_message_send(params, context)


def card(base: str, prefer: str) -> AgentCard:
    interfaces = [
        AgentInterface(url=base + "/", protocol_binding="JSONRPC", protocol_version="1.0"),
        AgentInterface(url=base + "/rest", protocol_binding="HTTP+JSON", protocol_version="1.0"),
    ]
    if prefer == "rest":
        interfaces.reverse()
    return AgentCard(
        name="Python Echo",
        description="Echoes what it is sent (a2a-sdk server)",
        version="1.0.0",
        supported_interfaces=interfaces,
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(
                id="echo",
                name="Echo",
                description="Answers with its input",
                tags=["test", "echo"],
            )
        ],
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--prefer", choices=["jsonrpc", "rest"], default="jsonrpc")
    parser.add_argument("--answer-early", action="store_true")
    parser.add_argument("--work-ms", type=int, default=0, help="time each task takes")
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    args = parser.parse_args()

    # Bound first, so the card can name the port when it was picked by the system.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    scheme = "https" if args.ssl_certfile else "http"
    base = f"{scheme}://{args.host}:{sock.getsockname()[1]}"

    agent_card = card(base, args.prefer)
    handler = (AnswersEarly if args.answer_early else DefaultRequestHandler)(
        agent_executor=Echo(args.work_ms / 1000),
        task_store=InMemoryTaskStore(),
        agent_card=agent_card,
    )
    routes = [
        *create_agent_card_routes(agent_card),
        *create_jsonrpc_routes(handler, rpc_url="/"),
        *create_rest_routes(handler, path_prefix="/rest"),
    ]
    app = Starlette(routes=routes)
    config = uvicorn.Config(
        app,
        log_level="warning",
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
            return
        await asyncio.sleep(0.01)
    print(json.dumps({"listening": base}), flush=True)
    await serving


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
