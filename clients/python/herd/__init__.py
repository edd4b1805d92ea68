"""herd: a client and a worker for the herd result broker.

    import asyncio, herd

    async def main():
        async with herd.connect("ws://127.0.0.1:7878/ws") as h:
            print(await h.submit({"text": "hello"}))

    asyncio.run(main())
"""

from ._client import (
    Accepted,
    Busy,
    Cancelled,
    Closed,
    ClosedByBroker,
    DeadlineExceeded,
    EvalError,
    Herd,
    HerdError,
    Progress,
    RateLimited,
    Refused,
    Result,
    ShuttingDown,
    Status,
    TooLarge,
    connect,
)
from ._keys import canonical_json, key
from ._sync import Client
from ._worker import aserve, serve

__all__ = [
    "Accepted",
    "Busy",
    "Cancelled",
    "Client",
    "Closed",
    "ClosedByBroker",
    "DeadlineExceeded",
    "EvalError",
    "Herd",
    "HerdError",
    "Progress",
    "RateLimited",
    "Refused",
    "Result",
    "ShuttingDown",
    "Status",
    "TooLarge",
    "aserve",
    "canonical_json",
    "connect",
    "key",
    "serve",
]
