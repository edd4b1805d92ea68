#!/usr/bin/env python3
"""Cache-hit submits per second from Python: the herd package beside the raw
`websockets` protocol, same broker, same requests, same number in flight.

    python3 clients/python/bench_hits.py ws://127.0.0.1:7878/ws [seconds] [in_flight]

Prints one JSON line per client and the ratio (package / raw).
"""

import asyncio
import itertools
import json
import sys
import time

import websockets

import herd

INPUTS = [{"bench": "python-hits", "n": n, "sleep_ms": 0} for n in range(100)]


async def package_rate(url, seconds, depth):
    async with herd.connect(url) as h:
        await asyncio.gather(*(h.submit(x) for x in INPUTS))
        done, until = 0, time.perf_counter() + seconds
        start = time.perf_counter()

        async def loop(i):
            nonlocal done
            while time.perf_counter() < until:
                await h.submit(INPUTS[(i + done) % len(INPUTS)])
                done += 1

        await asyncio.gather(*(loop(i) for i in range(depth)))
        return done / (time.perf_counter() - start)


async def raw_rate(url, seconds, depth):
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        ids = itertools.count()
        done, until = 0, time.perf_counter() + seconds
        start = time.perf_counter()
        for _ in range(depth):
            i = next(ids)
            await ws.send(json.dumps({"op": "submit", "id": i, "input": INPUTS[i % len(INPUTS)]}))
        outstanding = depth
        while outstanding:
            frame = json.loads(await ws.recv())
            if frame.get("type") != "result":
                continue
            done += 1
            outstanding -= 1
            if time.perf_counter() < until:
                i = next(ids)
                await ws.send(json.dumps({"op": "submit", "id": i, "input": INPUTS[i % len(INPUTS)]}))
                outstanding += 1
        return done / (time.perf_counter() - start)


async def main():
    url = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5
    depth = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    raw = await raw_rate(url, seconds, depth)
    package = await package_rate(url, seconds, depth)
    print(json.dumps({"client": "raw websockets", "hits_per_s": round(raw)}))
    print(json.dumps({"client": "herd package", "hits_per_s": round(package)}))
    print(json.dumps({"package_over_raw": round(package / raw, 3)}))


if __name__ == "__main__":
    asyncio.run(main())
