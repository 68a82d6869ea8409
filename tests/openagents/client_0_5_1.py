"""An unmodified OpenAgents 0.5.1 agent against a Tether server.

Run by tests/openagents.rs with the interpreter of the venv scripts/test.sh creates
(`pip install openagents==0.5.1 requests packaging`):

    python client_0_5_1.py HOST PORT AGENT_ID PEER_ID

It connects with the package's own AgentClient / NetworkConnector, registers, lists
protocols and agents, sends PEER_ID a direct message, waits for PEER_ID's reply, and
disconnects. Each result is printed on stdout as one line `RESULT <json>`; anything
else the package prints is noise. Exits 0 when every step worked.
"""

import asyncio
import json
import sys

import openagents
from openagents.core.client import AgentClient
from openagents.models.messages import DirectMessage


def result(step, **fields):
    print("RESULT " + json.dumps({"step": step, **fields}), flush=True)


async def main(host, port, agent_id, peer_id):
    result("version", version=getattr(openagents, "__version__", "unknown"))
    client = AgentClient(agent_id=agent_id)
    connected = await client.connect_to_server(
        host=host, port=port, metadata={"name": "Python agent", "capabilities": ["chat"]}
    )
    result("connected", ok=connected)
    if not connected:
        return 1
    connector = client.connector

    async def raw_response(command):
        """The system_response to `command` as the connector receives it."""
        answered = asyncio.get_running_loop().create_future()

        async def handler(data):
            if not answered.done():
                answered.set_result(data)

        previous = connector.system_handlers.get(command)
        connector.register_system_handler(command, handler)
        try:
            await connector.send_system_request(command)
            return await asyncio.wait_for(answered, timeout=10)
        finally:
            if previous:
                connector.register_system_handler(command, previous)

    replies = asyncio.Queue()

    async def on_direct(message):
        await replies.put(message)

    connector.register_message_handler("direct_message", on_direct)

    # As the AgentClient API returns them (an empty list on failure too) ...
    protocols = await client.list_protocols()
    result("list_protocols", protocols=protocols)
    agents = await client.list_agents()
    result("list_agents", agents=agents)
    # ... and the frames themselves.
    result("list_protocols_raw", response=await raw_response("list_protocols"))
    result("list_agents_raw", response=await raw_response("list_agents"))

    message = DirectMessage(
        sender_id=agent_id,
        target_agent_id=peer_id,
        content={"text": "hello from python"},
        text_representation="hello from python",
    )
    await client.send_direct_message(message)
    result("sent", message_id=message.message_id)

    try:
        reply = await asyncio.wait_for(replies.get(), timeout=20)
    except asyncio.TimeoutError:
        result("reply", ok=False)
        return 1
    result(
        "reply",
        ok=True,
        sender_id=reply.sender_id,
        target_agent_id=reply.target_agent_id,
        content=reply.content,
        message_id=reply.message_id,
        timestamp=reply.timestamp,
        still_connected=connector.is_connected,
    )

    disconnected = await client.disconnect()
    result("disconnected", ok=disconnected)
    return 0


if __name__ == "__main__":
    host, port, agent_id, peer_id = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sys.exit(asyncio.run(main(host, port, agent_id, peer_id)))
