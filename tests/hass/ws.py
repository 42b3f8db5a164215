"""`python ws.py URL TOKEN MESSAGE_JSON`: one Home Assistant websocket command, its result on stdout.

Run by the Home Assistant venv's Python (aiohttp is there), so the test venv needs no websocket client.
"""
from __future__ import annotations

import asyncio
import json
import sys

import aiohttp


async def command(url: str, token: str, message: dict) -> object:
    """Authenticate, send MESSAGE with id 1, return its result (exit 1 with the error otherwise)."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/api/websocket") as ws:
        assert (await ws.receive_json())["type"] == "auth_required"
        await ws.send_json({"type": "auth", "access_token": token})
        answer = await ws.receive_json()
        if answer["type"] != "auth_ok":
            sys.exit(f"websocket auth failed: {answer}")
        await ws.send_json({"id": 1, **message})
        while True:
            answer = await ws.receive_json()
            if answer.get("id") == 1 and answer.get("type") == "result":
                if not answer["success"]:
                    sys.exit(f"websocket command failed: {answer}")
                return answer["result"]


if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.wait_for(command(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])), 30))))
