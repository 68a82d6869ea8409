"""Echo agent: answers every direct message with ``{"echo": <content>}``.

Usage: ``python examples/echo.py --url URL --agent-id ID [--certificate-file F]``

It registers with the capabilities ``["echo", "instructions"]``, prints one line
``registered <agent_id> <incarnation>`` once connected, acknowledges every instruction
``done`` with the result ``{"echoed": <payload>}``, and exits cleanly (status 0) on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from tether_agent import (
    INSTRUCTIONS_CAPABILITY,
    AckStatus,
    Agent,
    AgentConfig,
    Instruction,
    Message,
)


async def serve(agent: Agent) -> None:
    """Answer messages and instructions until the agent stops."""
    async for event in agent:
        if isinstance(event, Message) and event.kind == "direct":
            await agent.send_direct(event.sender_id, {"echo": event.content})
        elif isinstance(event, Instruction):
            await agent.ack(event.instruction_id, AckStatus.DONE, result={"echoed": event.payload})


async def main() -> None:
    """Parse the arguments, connect, and echo until a signal arrives."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--agent-id", required=True)
    parser.add_argument("--certificate-file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = AgentConfig(
        url=args.url,
        agent_id=args.agent_id,
        capabilities=["echo", INSTRUCTIONS_CAPABILITY],
        certificate_file=args.certificate_file,
    )
    async with await Agent.connect(config) as agent:
        print(f"registered {agent.registration.agent_id} {agent.registration.incarnation}",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = asyncio.create_task(serve(agent))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not server.done():
            server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


if __name__ == "__main__":
    asyncio.run(main())
