#!/usr/bin/env python3
"""A herd agent in Python, with the `websockets` library (pip install websockets).

Start a broker (`cargo run --release -- serve`), then:

    python3 examples/agent.py

It submits a few inputs concurrently over one connection, matches replies
to requests by "id", and prints each result as it arrives. It speaks the
raw protocol on purpose, as a model for clients in other languages; Python
programs would rather `pip install ./clients/python` and use the `herd`
package.
"""

import asyncio
import itertools
import json
import os

import websockets

URL = os.environ.get("HERD_URL", "ws://127.0.0.1:7878/ws")
TOKEN = os.environ.get("HERD_TOKEN")


async def main():
    headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
    async with websockets.connect(URL, additional_headers=headers) as ws:
        hello = json.loads(await ws.recv())
        print("connected as", hello["role"], "to", hello["server"])

        ids = itertools.count(1)
        waiting = {}  # id -> future of the final frame (result or error)

        async def reader():
            async for text in ws:
                frame = json.loads(text)
                future = waiting.get(frame.get("id"))
                if future and frame["type"] in ("result", "error"):
                    future.set_result(frame)

        async def submit(value, fn="default"):
            request_id = next(ids)
            waiting[request_id] = asyncio.get_running_loop().create_future()
            await ws.send(json.dumps({"op": "submit", "id": request_id, "fn": fn, "input": value}))
            try:
                frame = await waiting[request_id]
            finally:
                del waiting[request_id]
            if frame["type"] == "error" or "error" in frame:
                raise RuntimeError(frame.get("error") or frame)
            return frame

        reading = asyncio.create_task(reader())
        # The same input three times, one other: two evaluations in all.
        inputs = [{"city": "Lyon"}, {"city": "Lyon"}, {"city": "Oslo"}, {"city": "Lyon"}]
        for frame in await asyncio.gather(*(submit(v) for v in inputs)):
            print(frame["key"], frame["source"], "shared by", frame.get("shared", "-"))
        reading.cancel()


if __name__ == "__main__":
    asyncio.run(main())
