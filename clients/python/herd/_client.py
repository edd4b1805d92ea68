"""The asyncio client: many requests in flight on one session, matched by id,
re-sent after a reconnect."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, Optional, Union

import websockets



class HerdError(Exception):
    """Base of every error this package raises."""


class EvalError(HerdError):
    """The evaluation ran and failed (`eval_failed`) or timed out (`eval_timeout`)."""

    def __init__(self, code: str, message: str, key: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.key = code, message, key


class DeadlineExceeded(EvalError):
    """This request's own `deadline_ms` passed first (`deadline_exceeded`);
    the evaluation goes on for its other waiters."""


class Refused(HerdError):
    """The broker refused the request (`bad_request`, `unknown_fn`, `forbidden`, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class TooLarge(HerdError):
    """The request is larger than the broker takes (its `max_frame_bytes`,
    from `hello`): refused here, before it is sent (the broker would close
    the session with 1009)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the request is {size} bytes; the broker takes frames of at most {limit} bytes (max_frame_bytes)"
        )
        self.size, self.limit = size, limit


class Busy(Refused):
    """A limit was reached (`busy`); trying again later may succeed."""


class RateLimited(Refused):
    """The namespace's `submits_per_s` was reached (`rate_limited`); a
    submit may succeed after `retry_after_ms`."""

    def __init__(self, code: str, message: str, retry_after_ms: int) -> None:
        super().__init__(code, message)
        self.retry_after_ms = retry_after_ms


class ShuttingDown(Refused):
    """The broker is draining (`shutting_down`)."""


class Cancelled(HerdError):
    """This session cancelled its wait on the key."""


class Closed(HerdError):
    """The connection is closed (the client was closed, or reconnecting is off)."""


class ClosedByBroker(Closed):
    """The broker closed the session for a reason that would recur if the
    requests in flight were sent again: 1009 (a frame larger than
    `max_frame_bytes`) or 1008 (policy, such as an expired token). Those
    requests fail with this instead of being re-sent."""

    def __init__(self, code: int, reason: str) -> None:
        what = {1009: "a frame was larger than its max_frame_bytes", 1008: "policy violation"}[code]
        super().__init__(f"the broker closed the session with {code} ({what}): {reason or 'no reason given'}")
        self.code, self.reason = code, reason


# Close codes after which re-sending the requests in flight would only be
# refused again: they fail instead. After 1008 (policy) the client does not
# reconnect either.
_NOT_RETRIED = (1008, 1009)


@dataclass
class Result:
    """A key's result: `output`, where it came from, for an evaluation its
    time and how many waiters shared it, and from a cache its age."""

    key: str
    output: Any
    source: str
    eval_ms: Optional[float] = None
    shared: Optional[int] = None
    age_ms: Optional[int] = None


@dataclass
class Progress:
    """A progress report of the evaluation a streamed submit waits on:
    `seq` counts from 1 per evaluation, `data` is what the evaluator wrote."""

    key: str
    seq: int
    data: Any


@dataclass
class Accepted:
    """What a `wait=False` submit learns: the key, and whether it started the evaluation."""

    key: str
    first: bool
    state: str
    waiters: int


@dataclass
class Status:
    """A key's state (`get`): `done` (with `output` or `error`), `queued`, `running` or `unknown`."""

    key: str
    state: str
    output: Any = None
    error: Optional[Dict[str, str]] = None
    waiters: Optional[int] = None
    age_ms: Optional[int] = None


def _error_of(frame: Dict[str, Any]) -> HerdError:
    code, message = frame.get("code", ""), frame.get("message", "")
    if code == "busy":
        return Busy(code, message)
    if code == "rate_limited":
        return RateLimited(code, message, int(frame.get("retry_after_ms", 0)))
    if code == "shutting_down":
        return ShuttingDown(code, message)
    return Refused(code, message)


def _result_of(frame: Dict[str, Any]) -> Result:
    if "error" in frame:
        e = frame["error"]
        kind = DeadlineExceeded if e.get("code") == "deadline_exceeded" else EvalError
        raise kind(e.get("code", ""), e.get("message", ""), frame.get("key", ""))
    return Result(
        key=frame["key"],
        output=frame.get("output"),
        source=frame.get("source", ""),
        eval_ms=frame.get("eval_ms"),
        shared=frame.get("shared"),
        age_ms=frame.get("age_ms"),
    )


class _Pending:
    """A request waiting for its answer: re-sent as is after a reconnect.

    A call ends on the first frame whose type is in `until` (or an error);
    a stream (`watch`) gets every frame on its queue instead."""

    __slots__ = ("frame", "key", "until", "future", "queue")

    def __init__(self, frame: Dict[str, Any], key: Optional[str], until: tuple, stream: bool) -> None:
        self.frame = frame
        self.key = key
        self.until = until
        loop = asyncio.get_running_loop()
        self.future: Optional[asyncio.Future] = None if stream else loop.create_future()
        self.queue: Optional[asyncio.Queue] = asyncio.Queue() if stream else None

    def fail(self, error: HerdError) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(error)
        else:
            self.queue.put_nowait(error)


class Herd:
    """One session with a broker. Use `connect(url)`."""

    def __init__(self, url: str, token: Optional[str] = None, reconnect: bool = True) -> None:
        self.url, self.token, self.reconnect = url, token, reconnect
        self._ids = itertools.count(1)
        self._pending: Dict[int, _Pending] = {}
        self._ws: Any = None
        self._reader: Optional[asyncio.Task] = None
        self._closed = False
        self._ready = asyncio.Event()
        self.hello: Dict[str, Any] = {}

    async def _open(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            ws = await websockets.connect(self.url, additional_headers=headers, max_size=None)
        except websockets.InvalidStatus as e:
            status = e.response.status_code
            if status in (401, 403):
                raise Refused("refused", f"{self.url} refused the connection (HTTP {status})") from e
            raise Closed(f"{self.url} is not a WebSocket endpoint (HTTP {status}); it is at /ws") from e
        self.hello = json.loads(await ws.recv())
        self._ws = ws
        for pending in self._pending.values():
            await ws.send(json.dumps(pending.frame))
        self._ready.set()

    async def _run(self) -> None:
        delay = 0.1
        while not self._closed:
            code, reason = None, ""
            try:
                async for message in self._ws:
                    self._route(json.loads(message))
            except websockets.ConnectionClosed as e:
                if e.rcvd is not None:
                    code, reason = e.rcvd.code, e.rcvd.reason
            self._ready.clear()
            if code in _NOT_RETRIED:
                failed = ClosedByBroker(code, reason)
                for pending in self._pending.values():
                    pending.fail(failed)
                self._pending.clear()
                if code == 1008:
                    self._closed = True
                    break
            if self._closed or not self.reconnect:
                break
            while not self._closed:
                await asyncio.sleep(delay * random.uniform(0.75, 1.25))
                delay = min(delay * 2, 5.0)
                try:
                    await self._open()
                    delay = 0.1
                    break
                except (OSError, websockets.WebSocketException, HerdError):
                    continue
        for pending in self._pending.values():
            pending.fail(Closed("the connection is closed"))

    def _route(self, frame: Dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "cancelled":
            for request_id, pending in list(self._pending.items()):
                if pending.key == frame.get("key") and pending.future is not None:
                    self._pending.pop(request_id)
                    pending.fail(Cancelled(f"wait for {pending.key} cancelled"))
        request_id = frame.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is None:
            return
        if pending.queue is not None:
            pending.queue.put_nowait(frame)
        elif kind == "error":
            pending.fail(_error_of(frame))
        elif kind in pending.until:
            if not pending.future.done():
                pending.future.set_result(frame)
        elif kind == "accepted":
            pending.key = frame.get("key")

    async def _request(
        self, frame: Dict[str, Any], until: tuple = (), key: Optional[str] = None, stream: bool = False
    ):
        if self._closed:
            raise Closed("the client is closed")
        request_id = next(self._ids)
        frame = _with_id(frame, request_id)
        text = json.dumps(frame)
        limit = self.hello.get("limits", {}).get("max_frame_bytes")
        size = len(text.encode())
        if limit and size > limit:
            raise TooLarge(size, limit)
        pending = _Pending(frame, key, until, stream)
        self._pending[request_id] = pending
        if self._ready.is_set():
            try:
                await self._ws.send(text)
            except websockets.ConnectionClosed:
                pass  # re-sent on reconnect
        return request_id, pending

    async def _answer(self, request_id: int, pending: _Pending) -> Dict[str, Any]:
        try:
            return await pending.future
        finally:
            self._pending.pop(request_id, None)

    async def submit(
        self,
        input: Any,
        fn: str = "default",
        wait: bool = True,
        max_age_ms: Optional[int] = None,
        priority: Optional[int] = None,
        deadline_ms: Optional[int] = None,
    ):
        """Evaluates `input` with evaluator `fn` (or takes the cached result).

        Returns the output; with `wait=False`, an `Accepted` (or a `Result`
        when the key was cached). Raises `EvalError` for a failed evaluation.
        With `max_age_ms`, a cached result older than that is not taken: a
        fresh evaluation is started or joined. `priority` (0-9, default 5)
        orders the queued job by the highest among its submits;
        `deadline_ms` raises `DeadlineExceeded` for this call alone once it
        passes (at most the fn's `timeout_ms`)."""
        frame = _submit_frame(input, fn, max_age_ms, priority, deadline_ms)
        frame["wait"] = wait
        if not wait:
            request_id, pending = await self._request(frame, ("accepted", "result"))
            answer = await self._answer(request_id, pending)
            if answer["type"] == "result":
                return _result_of(answer)
            return Accepted(answer["key"], answer["first"], answer["state"], answer["waiters"])
        request_id, pending = await self._request(frame, ("result",))
        return _result_of(await self._answer(request_id, pending)).output

    async def submit_stream(
        self,
        input: Any,
        fn: str = "default",
        priority: Optional[int] = None,
        deadline_ms: Optional[int] = None,
    ) -> AsyncIterator[Union[Progress, Result]]:
        """Submits and yields the evaluation's `Progress` reports as they
        come (first those made before this submit joined it), then its
        `Result`, last. A cached result comes alone. Raises `EvalError`
        (or `DeadlineExceeded`) instead of the result.

            async for item in h.submit_stream(x):
                if isinstance(item, herd.Progress):
                    print(item.seq, item.data)
                else:
                    print(item.output)
        """
        frame = _submit_frame(input, fn, None, priority, deadline_ms)
        frame["progress"] = True
        request_id, pending = await self._request(frame, stream=True)
        assert pending.queue is not None
        try:
            while True:
                item = await pending.queue.get()
                if isinstance(item, HerdError):
                    raise item
                kind = item.get("type")
                if kind == "error":
                    raise _error_of(item)
                if kind == "progress":
                    yield Progress(item.get("key", ""), item["seq"], item.get("data"))
                elif kind == "result":
                    yield _result_of(item)
                    return
        finally:
            self._pending.pop(request_id, None)

    async def get(self, key: str) -> Status:
        """A key's state; never waits, never starts work."""
        request_id, pending = await self._request({"op": "get", "key": key}, ("status",))
        s = await self._answer(request_id, pending)
        return Status(s["key"], s["state"], s.get("output"), s.get("error"), s.get("waiters"), s.get("age_ms"))

    async def subscribe(self, *keys: str) -> AsyncIterator[Result]:
        """Each key's result as it lands, whoever submits it (one per key)."""
        waits = [await self._request({"op": "subscribe", "key": k}, ("result",), key=k) for k in keys]
        answers = {request_id: pending for request_id, pending in waits}

        async def next_result(request_id: int, pending: _Pending) -> Result:
            return _result_of(await self._answer(request_id, pending))

        tasks = [asyncio.ensure_future(next_result(i, p)) for i, p in answers.items()]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            for task in tasks:
                task.cancel()

    async def cancel(self, key: str) -> None:
        """Stops this session's waits on `key`; calls waiting on it raise `Cancelled`."""
        request_id, pending = await self._request({"op": "cancel", "key": key}, ("cancelled",))
        await self._answer(request_id, pending)

    async def invalidate(self, key: Optional[str] = None, fn: Optional[str] = None) -> None:
        """Drops the cached result of `key`, or every cached result of `fn`
        (give exactly one; an admin's op). Returns once the broker has."""
        if (key is None) == (fn is None):
            raise ValueError("give exactly one of key and fn")
        frame = {"op": "invalidate", "key": key} if key is not None else {"op": "invalidate", "fn": fn}
        request_id, pending = await self._request(frame, ("invalidated",))
        await self._answer(request_id, pending)

    async def watch(self, interval_ms: int = 500) -> AsyncIterator[Dict[str, Any]]:
        """`snapshot` frames every `interval_ms`, until the loop stops."""
        request_id, pending = await self._request({"op": "watch", "interval_ms": interval_ms}, stream=True)
        assert pending.queue is not None
        try:
            while True:
                frame = await pending.queue.get()
                if isinstance(frame, HerdError):
                    raise frame
                if frame.get("type") == "error":
                    raise _error_of(frame)
                yield frame
        finally:
            self._pending.pop(request_id, None)
            if self._ready.is_set() and not self._closed:
                await self._ws.send(json.dumps({"op": "unwatch"}))

    async def ping(self) -> int:
        """A round trip; returns the broker's clock (Unix ms)."""
        request_id, pending = await self._request({"op": "ping"}, ("pong",))
        return (await self._answer(request_id, pending))["server_time_ms"]

    async def close(self) -> None:
        """Closes the session; calls still waiting raise `Closed`."""
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await self._reader

    async def __aenter__(self) -> "Herd":
        await self._open()
        self._reader = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _with_id(frame: Dict[str, Any], request_id: int) -> Dict[str, Any]:
    """`frame` with `id` first and its `input` (if any) last: a broker that
    has read that input before does not read the frame past its start."""
    framed = {"id": request_id, **frame}
    if "input" in framed:
        framed["input"] = framed.pop("input")
    return framed


def _submit_frame(
    input: Any, fn: str, max_age_ms: Optional[int], priority: Optional[int], deadline_ms: Optional[int]
) -> Dict[str, Any]:
    frame: Dict[str, Any] = {"op": "submit", "fn": fn, "input": input}
    for name, value in (("max_age_ms", max_age_ms), ("priority", priority), ("deadline_ms", deadline_ms)):
        if value is not None:
            frame[name] = value
    return frame


def connect(url: str, token: Optional[str] = None, reconnect: bool = True) -> Herd:
    """`async with herd.connect(url) as h:` a session with the broker at `url`
    (`ws://host:port/ws`). With `reconnect`, a lost connection is re-opened with
    jittered backoff and every request still waiting is sent again."""
    return Herd(url, token, reconnect)
