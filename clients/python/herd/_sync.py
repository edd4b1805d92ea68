"""A synchronous wrapper for scripts and notebooks: the asyncio client on a
background loop thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional

from ._client import Herd, Status


class Client:
    """`herd.Client(url).submit(input)`: blocking calls on one session."""

    def __init__(self, url: str, token: Optional[str] = None, reconnect: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._herd = Herd(url, token, reconnect)
        self._call(self._herd.__aenter__())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(self, input: Any, fn: str = "default", wait: bool = True, max_age_ms: Optional[int] = None) -> Any:
        return self._call(self._herd.submit(input, fn=fn, wait=wait, max_age_ms=max_age_ms))

    def get(self, key: str) -> Status:
        return self._call(self._herd.get(key))

    def cancel(self, key: str) -> None:
        self._call(self._herd.cancel(key))

    def invalidate(self, key: Optional[str] = None, fn: Optional[str] = None) -> None:
        self._call(self._herd.invalidate(key=key, fn=fn))

    def ping(self) -> int:
        return self._call(self._herd.ping())

    def close(self) -> None:
        self._call(self._herd.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
