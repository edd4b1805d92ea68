#!/usr/bin/env python3
"""Chaos run: agents against three brokers on one Redis while brokers and
Redis are killed, paused and restarted at random.

    cargo build --release
    python3 examples/chaos.py --minutes 10

It starts its own redis-server and three `herd serve` processes on free
local ports (cluster mode, lease_ms 1000), and 20 agents that submit a
skewed mix of inputs (many identical, 20-200 ms each) over sessions spread
across the brokers, one request at a time per agent; the key space moves
on every 5 s, so new keys (and claims) keep coming. A chaos task, every
2-6 s, does one of: SIGKILL a broker and restart it; SIGSTOP a broker for up
to 3 s; SIGKILL Redis and restart it (empty); SIGSTOP Redis for up to 3 s;
CLIENT KILL TYPE pubsub. At the end it prints one JSON object:

- submits, results (by source), errors by code;
- cut: waits whose session was closed by a broker's death (the agent
  reconnects to another broker and submits again);
- stranded: submits on a live session not answered within the fn's
  timeout plus two leases plus the time its broker was paused (must be 0);
- evaluations (summed over every broker process) against distinct keys,
  and takeovers (from the brokers' logs);
- new_key_p99_ms_redis_away: p99 latency of submits answered by an
  evaluation while Redis was away (killed or paused).

Needs: redis-server on PATH, the `websockets` package, a release build
(or --herd PATH).
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

LEASE_MS = 1000
TIMEOUT_MS = 5000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process that can be killed, paused and restarted."""

    def __init__(self, name, argv, log):
        self.name, self.argv, self.log = name, argv, log
        self.child = None
        self.paused_until = 0.0
        self.paused_total = 0.0
        self.start()

    def start(self):
        out = open(self.log, "a")
        self.child = subprocess.Popen(self.argv, stdout=out, stderr=out)

    def kill(self):
        if self.child:
            self.child.send_signal(signal.SIGCONT)
            self.child.kill()
            self.child.wait()
            self.child = None

    def stop(self, seconds):
        self.child.send_signal(signal.SIGSTOP)
        self.paused_until = time.monotonic() + seconds
        self.paused_total += seconds

    def cont(self):
        if self.child:
            self.child.send_signal(signal.SIGCONT)
        self.paused_until = 0.0


def metric(port, name):
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except Exception:
        return None
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Chaos:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="herd-chaos-")
        self.redis_port = free_port()
        self.redis = Proc(
            "redis",
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            os.path.join(self.dir, "redis.log"),
        )
        self.brokers = []
        for i in range(3):
            port = free_port()
            config = os.path.join(self.dir, f"b{i}.toml")
            with open(config, "w") as f:
                f.write(
                    f'[cluster]\nredis = "redis://127.0.0.1:{self.redis_port}/"\nnode = "b{i}"\n'
                    f"lease_ms = {LEASE_MS}\nredis_timeout_ms = 300\n"
                    f'[[evaluator]]\nfn = "default"\nkind = "simulate"\nthreads = 32\n'
                    f"timeout_ms = {TIMEOUT_MS}\n"
                )
            argv = [args.herd, "serve", "--config", config, "--listen", f"127.0.0.1:{port}"]
            proc = Proc(f"b{i}", argv, os.path.join(self.dir, f"b{i}.log"))
            proc.port = port
            proc.evaluations_before = 0.0
            proc.evaluations_seen = 0.0
            self.brokers.append(proc)
        self.redis_away = []  # (start, end) windows
        self.stats = {
            "submits": 0,
            "results": {},
            "errors": {},
            "cut": 0,
            "stranded": 0,
            "chaos": {},
        }
        self.keys = set()
        self.away_latencies = []
        self.stranded_examples = []

    def url(self, broker):
        return f"ws://127.0.0.1:{broker.port}/ws"

    def redis_is_away(self, at):
        return any(start <= at <= end for start, end in self.redis_away)

    async def agent(self, n, deadline):
        rng = random.Random(n)
        while time.monotonic() < deadline:
            broker = self.brokers[rng.randrange(len(self.brokers))]
            try:
                async with websockets.connect(self.url(broker), open_timeout=3, ping_interval=None) as ws:
                    await ws.recv()  # hello
                    while time.monotonic() < deadline:
                        # A skewed draw from a key space that moves on every
                        # 5 s, so new keys keep coming (and claims with them).
                        epoch = int((time.monotonic() - self.started) / 5)
                        k = min(int(rng.paretovariate(0.8)), 20000)
                        sleep_ms = 20 + (k * 37) % 180
                        inp = {"chaos": k, "epoch": epoch, "sleep_ms": sleep_ms}
                        self.keys.add((epoch, k))
                        rid = f"{n}-{self.stats['submits']}"
                        self.stats["submits"] += 1
                        sent = time.monotonic()
                        paused_before = broker.paused_total
                        await ws.send(json.dumps({"op": "submit", "id": rid, "input": inp}))
                        bound = (TIMEOUT_MS + 2 * LEASE_MS) / 1000 + 1.0
                        frame = None
                        while frame is None:
                            wait = bound + (broker.paused_total - paused_before) - (time.monotonic() - sent)
                            if wait <= 0:
                                break
                            try:
                                text = await asyncio.wait_for(ws.recv(), timeout=min(wait, 1.0))
                            except asyncio.TimeoutError:
                                continue
                            got = json.loads(text)
                            if got.get("id") == rid and got["type"] in ("result", "error"):
                                frame = got
                        if frame is None:
                            self.stats["stranded"] += 1
                            if len(self.stranded_examples) < 5:
                                self.stranded_examples.append({"broker": broker.name, "input": inp, "at_s": round(sent - self.started, 1)})
                            break
                        took = (time.monotonic() - sent) * 1000
                        if frame["type"] == "error":
                            code = frame["code"]
                            self.stats["errors"][code] = self.stats["errors"].get(code, 0) + 1
                        elif "error" in frame:
                            code = frame["error"]["code"]
                            self.stats["errors"][code] = self.stats["errors"].get(code, 0) + 1
                        else:
                            source = frame.get("source", "cache")
                            self.stats["results"][source] = self.stats["results"].get(source, 0) + 1
                            if source == "eval" and self.redis_is_away(sent):
                                self.away_latencies.append(took)
            except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError):
                self.stats["cut"] += 1
                await asyncio.sleep(0.2)

    def count(self, what):
        self.stats["chaos"][what] = self.stats["chaos"].get(what, 0) + 1

    def scrape(self):
        for b in self.brokers:
            value = metric(b.port, "herd_evaluations_total") if b.child and not b.paused_until else None
            if value is not None:
                b.evaluations_seen = value

    async def chaos(self, deadline):
        rng = random.Random(self.args.seed)
        while time.monotonic() < deadline - 5:
            await asyncio.sleep(rng.uniform(2, 6))
            self.scrape()
            action = rng.randrange(5)
            if action == 0:
                b = rng.choice(self.brokers)
                b.evaluations_before += b.evaluations_seen
                b.evaluations_seen = 0
                b.kill()
                self.count("broker SIGKILL")
                await asyncio.sleep(rng.uniform(0.5, 3))
                b.start()
            elif action == 1:
                b = rng.choice(self.brokers)
                b.stop(rng.uniform(0.5, 3))
                self.count("broker SIGSTOP")
                await asyncio.sleep(b.paused_until - time.monotonic())
                b.cont()
            elif action == 2:
                start = time.monotonic()
                self.redis.kill()
                self.count("redis SIGKILL")
                await asyncio.sleep(rng.uniform(1, 3))
                self.redis.start()
                await asyncio.sleep(0.5)
                self.redis_away.append((start, time.monotonic()))
            elif action == 3:
                start = time.monotonic()
                self.redis.stop(rng.uniform(1, 3))
                self.count("redis SIGSTOP")
                await asyncio.sleep(self.redis.paused_until - time.monotonic())
                self.redis.cont()
                self.redis_away.append((start, time.monotonic() + 0.5))
            else:
                subprocess.run(
                    ["redis-cli", "-p", str(self.redis_port), "CLIENT", "KILL", "TYPE", "pubsub"],
                    capture_output=True,
                )
                self.count("CLIENT KILL TYPE pubsub")

    async def run(self):
        await asyncio.sleep(1.0)
        self.started = time.monotonic()
        deadline = self.started + self.args.minutes * 60
        agents = [self.agent(n, deadline) for n in range(self.args.agents)]
        await asyncio.gather(self.chaos(deadline), *agents)
        self.scrape()

    def report(self):
        evaluations = sum(b.evaluations_before + b.evaluations_seen for b in self.brokers)
        takeovers = 0
        for b in self.brokers:
            with open(b.log) as f:
                takeovers += len(re.findall("lease expired", f.read()))
        away = sorted(self.away_latencies)
        p99 = away[int(len(away) * 0.99) - 1] if away else None
        out = dict(self.stats)
        out.update(
            minutes=self.args.minutes,
            evaluations=int(evaluations),
            distinct_keys=len(self.keys),
            takeovers=takeovers,
            new_key_p99_ms_redis_away=round(p99, 1) if p99 else None,
            new_keys_redis_away=len(away),
            stranded_examples=self.stranded_examples,
            logs=self.dir,
        )
        return out

    def close(self):
        for b in self.brokers:
            b.kill()
        self.redis.kill()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2)
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--herd", default=os.path.join(here, "..", "target", "release", "herd"))
    args = parser.parse_args()
    chaos = Chaos(args)
    try:
        asyncio.run(chaos.run())
        report = chaos.report()
    finally:
        chaos.close()
    print(json.dumps(report, indent=1))
    sys.exit(1 if report["stranded"] else 0)


if __name__ == "__main__":
    main()
