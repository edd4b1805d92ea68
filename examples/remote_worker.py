#!/usr/bin/env python3
"""A remote worker for herd in plain Python: the raw protocol, nothing else.

It opens /ws, offers to run up to CONCURRENCY tasks of one remote fn, runs
each `task` and answers with `complete`; a `revoke` cancels a task. When the
broker goes away it reconnects (the broker has re-queued what it held).

    pip install websockets
    python3 examples/remote_worker.py ws://127.0.0.1:7878/ws embed 4

Replace `compute` with the real work. With tokens, set HERD_TOKEN to a
token of role "worker".
"""

import asyncio
import json
import os
import random
import sys

import websockets


async def compute(value):
    """The costly function: here, a stand-in that counts characters."""
    await asyncio.sleep(0.02)
    return {"characters": len(json.dumps(value)), "worker": os.getpid()}


async def run_task(ws, task, running):
    try:
        output = await compute(task["input"])
        reply = {"op": "complete", "task": task["task"], "output": output}
    except asyncio.CancelledError:
        return  # revoked: the broker no longer wants it
    except Exception as error:  # the task fails, the worker goes on
        reply = {"op": "complete", "task": task["task"], "error": str(error)}
    finally:
        running.pop(task["task"], None)
    await ws.send(json.dumps(reply))


async def serve(url, fn, concurrency):
    headers = {"Authorization": f"Bearer {os.environ['HERD_TOKEN']}"} if "HERD_TOKEN" in os.environ else {}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"op": "serve", "id": 1, "fn": fn, "concurrency": concurrency}))
        running = {}
        async for message in ws:
            frame = json.loads(message)
            if frame["type"] == "task":
                running[frame["task"]] = asyncio.create_task(run_task(ws, frame, running))
            elif frame["type"] == "revoke" and frame["task"] in running:
                running.pop(frame["task"]).cancel()
            elif frame["type"] == "error" and frame.get("id") == 1:
                raise SystemExit(f"refused: {frame['code']}: {frame['message']}")


async def main():
    url, fn = sys.argv[1], sys.argv[2]
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    delay = 0.1
    while True:
        try:
            await serve(url, fn, concurrency)
        except (OSError, websockets.ConnectionClosed):
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, 5.0)


if __name__ == "__main__":
    asyncio.run(main())
