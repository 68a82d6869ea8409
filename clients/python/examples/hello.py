"""The smallest agent: connect, say hello to everyone, print what arrives.

Usage: ``python examples/hello.py [URL] [AGENT_ID]`` (Ctrl-C to stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from tether_agent import Agent, AgentConfig


async def main(url: str, agent_id: str) -> None:
    """Connect, broadcast one message and print every event."""
    async with await Agent.connect(AgentConfig(url=url, agent_id=agent_id)) as agent:
        print("registered:", agent.registration)
        await agent.broadcast({"text": f"hello from {agent_id}"})
        async for event in agent:
            print(event)


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8570/"
    agent_id = sys.argv[2] if len(sys.argv) > 2 else "hello"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(url, agent_id))
