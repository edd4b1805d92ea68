"""The worker side: serve a remote fn, run each task with a handler."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import random
import signal
from typing import Any, Awaitable, Callable, Dict, Optional, Union

import websockets

from ._client import Refused

Handler = Callable[[Any], Union[Any, Awaitable[Any]]]


async def aserve(
    url: str,
    fn: str,
    handler: Handler,
    concurrency: int = 4,
    token: Optional[str] = None,
    stop: Optional[asyncio.Event] = None,
) -> None:
    """Serves remote fn `fn` on the broker at `url` until `stop` is set.

    `handler(input)` returns the output (a plain function runs in a thread,
    a coroutine function on the loop); an exception fails the task with its
    message. A handler with a `progress` parameter is given a function
    that sends the broker a progress report (any JSON value) for the
    waiters that asked for progress: `def handler(input, progress): ...`. A `revoke` cancels the task. When the broker goes away this
    reconnects with jittered backoff (tasks in hand are abandoned; the
    broker re-queues them). When `stop` is set: `unserve`, finish the tasks
    in hand, return. Raises `Refused` if the broker will not have this worker."""
    stop = stop or asyncio.Event()
    delay = 0.1
    while not stop.is_set():
        try:
            await _session(url, fn, handler, concurrency, token, stop)
            return
        except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake) as error:
            if isinstance(error, websockets.InvalidStatus) and error.response.status_code in (401, 403):
                raise Refused("refused", f"{url} refused the worker (HTTP {error.response.status_code})")
        try:
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.75, 1.25))
        except asyncio.TimeoutError:
            pass
        delay = min(delay * 2, 5.0)


def _takes_progress(handler: Handler) -> bool:
    try:
        return "progress" in inspect.signature(handler).parameters
    except (TypeError, ValueError):
        return False


async def _run(handler: Handler, value: Any, progress: Callable[[Any], None]) -> Any:
    call = functools.partial(handler, progress=progress) if _takes_progress(handler) else handler
    if inspect.iscoroutinefunction(handler):
        return await call(value)
    return await asyncio.get_running_loop().run_in_executor(None, call, value)


async def _session(url, fn, handler, concurrency, token, stop) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.recv()  # hello
        await ws.send(json.dumps({"op": "serve", "id": "serve", "fn": fn, "concurrency": concurrency}))
        running: Dict[str, asyncio.Task] = {}

        loop = asyncio.get_running_loop()

        async def run_task(task: Dict[str, Any]) -> None:
            reports: list = []

            def progress(data: Any) -> None:
                # Sent on the loop, in order, and before the task's complete.
                text = json.dumps({"op": "progress", "task": task["task"], "data": data})

                def send() -> None:
                    reports.append(asyncio.ensure_future(ws.send(text)))

                try:
                    in_loop = asyncio.get_running_loop() is loop
                except RuntimeError:
                    in_loop = False
                if in_loop:
                    send()
                else:
                    loop.call_soon_threadsafe(send)

            try:
                output = await _run(handler, task["input"], progress)
                if reports:
                    await asyncio.gather(*reports)
                reply = {"op": "complete", "task": task["task"], "output": output}
            except asyncio.CancelledError:
                return
            except Exception as error:  # the task fails, the worker goes on
                reply = {"op": "complete", "task": task["task"], "error": str(error) or type(error).__name__}
            finally:
                running.pop(task["task"], None)
            await ws.send(json.dumps(reply))

        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                receiving = asyncio.ensure_future(ws.recv())
                done, _ = await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    receiving.cancel()
                    await ws.send(json.dumps({"op": "unserve", "id": "unserve", "fn": fn}))
                    if running:
                        await asyncio.wait(list(running.values()))
                    return
                frame = json.loads(receiving.result())
                kind = frame.get("type")
                if kind == "task":
                    running[frame["task"]] = asyncio.ensure_future(run_task(frame))
                elif kind == "revoke" and frame.get("task") in running:
                    running.pop(frame["task"]).cancel()
                elif kind == "error" and frame.get("id") == "serve":
                    raise Refused(frame.get("code", ""), frame.get("message", ""))
        finally:
            stopping.cancel()
            for task in running.values():
                task.cancel()


def serve(url: str, fn: str, handler: Handler, concurrency: int = 4, token: Optional[str] = None) -> None:
    """Runs a worker until SIGTERM or Ctrl-C, then drains (see `aserve`)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await aserve(url, fn, handler, concurrency, token, stop)

    asyncio.run(main())
