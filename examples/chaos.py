#!/usr/bin/env python3
"""Chaos run: agents against three brokers on one Redis while brokers and
Redis are killed, paused and restarted at random.

    cargo build --release
    python3 examples/chaos.py --minutes 10

It starts its own redis-server and three `herd serve` processes on free
local ports (cluster mode, lease_ms 1000), and 20 agents that submit a
skewed mix of inputs (many identical, 20-200 ms each) over sessions spread
across the brokers, one request at a time per agent; the key space moves
on every 5 s, so new keys (and claims) keep coming. A fifth of the
submits go to fn `nonce`, a process evaluator whose every evaluation
returns a fresh id and the time it was computed. Subscribers, on random
brokers, subscribe to keys the agents submit. An admin invalidates fn
`nonce` every few seconds. A chaos task, every 2-6 s, does one of:
SIGKILL a broker and restart it; SIGSTOP a broker for up to 3 s; SIGKILL
Redis and restart it (empty); SIGSTOP Redis for up to 3 s; CLIENT KILL
TYPE pubsub. Then the faults stop, and once all is quiet (a few leases) it
looks at every key. At the end it prints one JSON object:

- submits, results (by source), errors by code;
- cut: waits whose session was closed by a broker's death (the agent
  reconnects to another broker and submits again);
- stranded: submits on a live session not answered within the fn's
  timeout plus two leases plus the time its broker was paused (must be 0);
- stranded_subscriptions: subscriptions still waiting once all is quiet
  for a key whose result Redis or a broker holds (must be 0);
- disagreements: keys for which a broker serves, once all is quiet, a
  result other than the one Redis holds (must be 0);
- stale: results of fn `nonce` computed before an invalidation that was
  answered before the request was made (must be 0), beside invalidations
  (answered) and invalidations_refused;
- evaluations (summed over every broker process) against distinct keys,
  and takeovers (from the brokers' logs);
- new_key_p99_ms_redis_away: p99 latency of submits answered by an
  evaluation while Redis was away (killed or paused).

Needs: redis-server and redis-cli on PATH, the `websockets` and `blake3`
packages, a release build (or --herd PATH).
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

import blake3
import websockets

LEASE_MS = 1000
TIMEOUT_MS = 5000

# The `nonce` fn's program: each evaluation a fresh id and when it was
# computed (Unix seconds), after the input's sleep_ms.
NONCE_WORKER = """
import json, sys, time, uuid
for line in sys.stdin:
    task = json.loads(line)
    time.sleep(task["input"].get("sleep_ms", 20) / 1000)
    print(json.dumps({"output": {"nonce": uuid.uuid4().hex, "at": time.time()}}), flush=True)
"""


def key_of(fn, value):
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return blake3.blake3(fn.encode() + b"\0" + text.encode()).hexdigest()[:32]


def redis_cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True)
    return out.stdout.strip()


def redis_gets(port, names):
    """GET of each name, in one redis-cli run (None where nothing is stored)."""
    script = "".join(f'GET "{name}"\n' for name in names)
    out = subprocess.run(["redis-cli", "-p", str(port)], input=script, capture_output=True, text=True)
    values = out.stdout.split("\n")[: len(names)]
    return [v or None for v in values]


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
        worker = os.path.join(self.dir, "nonce_worker.py")
        with open(worker, "w") as f:
            f.write(NONCE_WORKER)
        for i in range(3):
            port = free_port()
            config = os.path.join(self.dir, f"b{i}.toml")
            with open(config, "w") as f:
                f.write(
                    f'[cluster]\nredis = "redis://127.0.0.1:{self.redis_port}/"\nnode = "b{i}"\n'
                    f"lease_ms = {LEASE_MS}\nredis_timeout_ms = 300\n"
                    f'[[evaluator]]\nfn = "default"\nkind = "simulate"\nthreads = 32\n'
                    f"timeout_ms = {TIMEOUT_MS}\n"
                    f'[[evaluator]]\nfn = "nonce"\nkind = "process"\nthreads = 8\n'
                    f'timeout_ms = {TIMEOUT_MS}\ncommand = ["{sys.executable}", "{worker}"]\n'
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
            "stale": 0,
            "invalidations": 0,
            "invalidations_refused": 0,
            "chaos": {},
        }
        self.keys = set()
        # Every (fn, input) submitted, for the look at quiescence.
        self.inputs = {}
        # Answered invalidations of fn nonce: (asked, answered), wall clock.
        self.invalidated = []
        self.stale_examples = []
        # Subscriptions: key -> [(broker, answered?)].
        self.subscriptions = []
        self.quiet = False
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
                        fn = "nonce" if k % 5 == 0 else "default"
                        self.keys.add((epoch, k))
                        self.inputs[key_of(fn, inp)] = (fn, inp)
                        rid = f"{n}-{self.stats['submits']}"
                        self.stats["submits"] += 1
                        sent = time.monotonic()
                        sent_wall = time.time()
                        paused_before = broker.paused_total
                        await ws.send(json.dumps({"op": "submit", "id": rid, "fn": fn, "input": inp}))
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
                            if fn == "nonce":
                                self.check_fresh(frame, sent_wall, broker)
            except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError):
                self.stats["cut"] += 1
                await asyncio.sleep(0.2)

    def check_fresh(self, frame, sent_wall, broker):
        """A result of fn nonce computed before an invalidation that was
        answered before its request was made is stale."""
        computed = frame["output"].get("at", 0)
        for asked, answered in self.invalidated:
            if answered < sent_wall and computed < asked:
                self.stats["stale"] += 1
                if len(self.stale_examples) < 5:
                    self.stale_examples.append(
                        {"broker": broker.name, "source": frame.get("source"), "computed": computed, "asked": asked, "answered": answered, "sent": sent_wall}
                    )
                return

    async def admin(self, deadline):
        """Invalidates fn nonce on a random broker every few seconds."""
        rng = random.Random(self.args.seed + 1)
        while time.monotonic() < deadline - 5:
            await asyncio.sleep(rng.uniform(2, 5))
            broker = rng.choice(self.brokers)
            try:
                async with websockets.connect(self.url(broker), open_timeout=3, ping_interval=None) as ws:
                    await ws.recv()
                    asked = time.time()
                    await ws.send(json.dumps({"op": "invalidate", "id": "i", "fn": "nonce"}))
                    while True:
                        got = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
                        if got.get("id") == "i":
                            break
                    if got["type"] == "invalidated":
                        self.invalidated.append((asked, time.time()))
                        self.stats["invalidations"] += 1
                    else:
                        self.stats["invalidations_refused"] += 1
            except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError):
                self.stats["invalidations_refused"] += 1

    async def subscriber(self, n, deadline):
        """Subscribes to keys the agents submitted, one at a time, on
        random brokers; a subscription left waiting is kept open until the
        look at quiescence."""
        rng = random.Random(self.args.seed + 100 + n)
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(0.5, 2))
            if not self.inputs:
                continue
            key = rng.choice(list(self.inputs))
            broker = self.brokers[rng.randrange(len(self.brokers))]
            entry = {"key": key, "broker": broker.name, "answered": False, "cut": False}
            self.subscriptions.append(entry)
            try:
                async with websockets.connect(self.url(broker), open_timeout=3, ping_interval=None) as ws:
                    await ws.recv()
                    await ws.send(json.dumps({"op": "subscribe", "id": "s", "key": key}))
                    while not entry["answered"]:
                        if self.quiet and time.monotonic() > self.quiet_since + 3 * LEASE_MS / 1000:
                            break
                        try:
                            got = json.loads(await asyncio.wait_for(ws.recv(), timeout=1.0))
                        except asyncio.TimeoutError:
                            continue
                        if got.get("id") == "s" and got["type"] == "result":
                            entry["answered"] = True
                    if entry["answered"] or not self.quiet:
                        continue
                    return
            except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError):
                entry["cut"] = True

    async def look(self):
        """Once all is quiet: every key's result on every broker against
        Redis's, and the subscriptions still waiting."""
        epochs = {}
        for fn in ("default", "nonce"):
            epochs[fn] = redis_cli(self.redis_port, "HGET", "herd:epochs", fn) or "0"
        disagreements, examples = 0, []
        in_any = set()
        keys = list(self.inputs)
        names = [f"herd:result:{{{key}}}:{epochs[self.inputs[key][0]]}:" for key in keys]
        in_redis_by_key = {}
        for key, stored in zip(keys, redis_gets(self.redis_port, names)):
            in_redis_by_key[key] = json.loads(stored).get("output") if stored else None
        for b in self.brokers:
            async with websockets.connect(self.url(b), open_timeout=3, ping_interval=None) as ws:
                await ws.recv()
                for key in self.inputs:
                    await ws.send(json.dumps({"op": "get", "id": key, "key": key}))
                    while True:
                        got = json.loads(await ws.recv())
                        if got.get("id") == key:
                            break
                    in_redis = in_redis_by_key[key]
                    if in_redis is not None:
                        in_any.add(key)
                    if got.get("state") == "done":
                        in_any.add(key)
                        if got.get("output") != in_redis:
                            disagreements += 1
                            if len(examples) < 5:
                                examples.append({"broker": b.name, "key": key, "serves": got.get("output"), "redis": in_redis})
        stranded = [s for s in self.subscriptions if not s["answered"] and not s["cut"] and s["key"] in in_any]
        self.stats["disagreements"] = disagreements
        self.stats["disagreement_examples"] = examples
        self.stats["stranded_subscriptions"] = len(stranded)
        self.stats["stranded_subscription_examples"] = stranded[:5]
        self.stats["subscriptions"] = len(self.subscriptions)

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
        subscribers = [self.subscriber(n, deadline) for n in range(4)]
        quiet = self.quiesce(deadline)
        await asyncio.gather(self.chaos(deadline), self.admin(deadline), quiet, *agents, *subscribers)
        self.scrape()
        await self.look()

    async def quiesce(self, deadline):
        """After the deadline: every process running, nothing paused, then
        a few leases of quiet."""
        await asyncio.sleep(max(0, deadline - time.monotonic()))
        self.redis.cont()
        if self.redis.child is None:
            self.redis.start()
        for b in self.brokers:
            b.cont()
            if b.child is None:
                b.start()
        await asyncio.sleep(5 * LEASE_MS / 1000)
        self.quiet, self.quiet_since = True, time.monotonic()
        await asyncio.sleep(4 * LEASE_MS / 1000)

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
            stale_examples=self.stale_examples,
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
    bad = report["stranded"] or report["stranded_subscriptions"] or report["disagreements"] or report["stale"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
