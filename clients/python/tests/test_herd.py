"""The package against a real broker: every method, every error, reconnects,
1,000 requests on one session, the worker API, and the shared key vectors."""

import asyncio
import json
import pathlib

import pytest

import herd
from conftest import BASIC, free_port

VECTORS = pathlib.Path(__file__).resolve().parents[3] / "tests" / "vectors" / "keys.json"


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_keys_match_the_shared_vectors():
    for case in json.loads(VECTORS.read_text()):
        assert herd.canonical_json(case["input"]) == case["canonical"]
        assert herd.key(case["input"], fn=case["fn"]) == case["key"]


def test_a_request_is_sent_with_its_id_first_and_its_input_last():
    from herd._client import _submit_frame, _with_id

    frame = _submit_frame({"b": [1]}, "f", 5, None, None)
    frame["wait"] = False
    assert json.dumps(_with_id(frame, 7)) == (
        '{"id": 7, "op": "submit", "fn": "f", "max_age_ms": 5, "wait": false, "input": {"b": [1]}}'
    )
    assert json.dumps(_with_id({"op": "get", "key": "k"}, 8)) == '{"id": 8, "op": "get", "key": "k"}'


async def stats(h):
    async for snap in h.watch(100):
        return snap["stats"]


def test_every_method(broker):
    async def main():
        async with herd.connect(broker.url) as h:
            assert h.hello["type"] == "hello"
            out = await h.submit({"sleep_ms": 20, "q": 1})
            assert out["key"] == herd.key({"sleep_ms": 20, "q": 1})
            assert await h.submit([1, 2], fn="echo") == [1, 2]
            accepted = await h.submit({"sleep_ms": 200, "q": 2}, wait=False)
            assert isinstance(accepted, herd.Accepted) and accepted.first
            status = await h.get(accepted.key)
            assert status.state in ("queued", "running")
            results = [r async for r in h.subscribe(accepted.key)]
            assert results[0].key == accepted.key and results[0].source == "eval"
            done = await h.get(accepted.key)
            assert done.state == "done" and done.output["key"] == accepted.key
            assert (await h.get(herd.key("never"))).state == "unknown"
            assert await h.ping() > 0
            never = herd.key({"never": True, "sleep_ms": 3000})
            waiting = asyncio.ensure_future(h.submit({"never": True, "sleep_ms": 3000}))
            await asyncio.sleep(0)
            while (await h.get(never)).state == "unknown":
                await asyncio.sleep(0)
            await h.cancel(never)
            with pytest.raises(herd.Cancelled):
                await waiting
            assert (await stats(h))["submits"] >= 4

    run(main())


def test_invalidate_and_max_age(broker):
    async def main():
        async with herd.connect(broker.url) as h:
            evaluations = (await stats(h))["evaluations"]
            first = await h.submit({"py": "invalidate"})
            key = herd.key({"py": "invalidate"})
            cached = [r async for r in h.subscribe(key)][0]
            assert cached.source == "cache" and cached.age_ms >= 0
            await h.invalidate(key=key)
            assert (await h.get(key)).state == "unknown"
            assert await h.submit({"py": "invalidate"}) == first
            await h.submit({"py": "invalidate"}, max_age_ms=0)
            await h.invalidate(fn="default")
            assert (await h.get(key)).state == "unknown"
            assert (await stats(h))["evaluations"] == evaluations + 3
            with pytest.raises(ValueError):
                await h.invalidate()
            with pytest.raises(herd.Refused) as refused:
                await h.invalidate(fn="no-such-fn")
            assert refused.value.code == "unknown_fn"

    run(main())


def test_errors_are_typed(make_broker):
    broker = make_broker("[limits]\nmax_pending = 1\n" + BASIC)

    async def main():
        async with herd.connect(broker.url) as h:
            with pytest.raises(herd.EvalError) as failed:
                await h.submit({"fail": "boom", "sleep_ms": 1})
            assert failed.value.code == "eval_failed" and failed.value.message == "boom"
            with pytest.raises(herd.EvalError) as late:
                await h.submit({"sleep_ms": 4000, "slow": 1})
            assert late.value.code == "eval_timeout"
            with pytest.raises(herd.Refused) as unknown:
                await h.submit(1, fn="nope")
            assert unknown.value.code == "unknown_fn"
            held = {"sleep_ms": 300, "hold": 1}
            first = asyncio.ensure_future(h.submit(held))
            # The broker shows the first submit waiting before the second is sent.
            while (await h.get(herd.key(held))).state == "unknown":
                pass
            with pytest.raises(herd.Busy):
                await h.submit({"sleep_ms": 1, "over": 1})
            await first
        guarded = make_broker('[[token]]\nname = "a"\nrole = "agent"\nsecret = "right"\n' + BASIC)
        with pytest.raises(herd.Refused):
            async with herd.connect(guarded.url, token="wrong"):
                pass
        async with herd.connect(guarded.url, token="right") as h:
            assert await h.ping() > 0

    run(main())


def test_a_namespace_s_rate_limit_is_a_typed_error_with_its_retry_time(make_broker):
    broker = make_broker(
        '[[token]]\nname = "t"\nrole = "agent"\nsecret = "team"\nnamespace = "team"\n'
        '[[namespace]]\nname = "team"\nsubmits_per_s = 1\nburst = 1\n' + BASIC
    )

    async def main():
        async with herd.connect(broker.url, token="team") as h:
            assert await h.submit(1, fn="echo") == 1
            with pytest.raises(herd.RateLimited) as limited:
                await h.submit(2, fn="echo")
            assert limited.value.code == "rate_limited"
            assert 0 < limited.value.retry_after_ms <= 1000

    run(main())


def test_an_oversized_request_fails_at_once_and_is_never_resent(make_broker):
    broker = make_broker("[limits]\nmax_frame_bytes = 4096\n" + BASIC)

    async def main():
        async with herd.connect(broker.url) as h:
            with pytest.raises(herd.TooLarge) as refused:
                await h.submit({"blob": "x" * 8192})
            assert refused.value.limit == 4096 and "max_frame_bytes" in str(refused.value)
            assert await h.ping() > 0
            # Past the client's own check (as a client with a stale hello
            # would be), the broker closes with 1009: the call fails naming
            # it, once, and the session comes back for the next request.
            h.hello["limits"]["max_frame_bytes"] = None
            with pytest.raises(herd.ClosedByBroker) as closed:
                await asyncio.wait_for(h.submit({"blob": "y" * 8192}), 30)
            assert closed.value.code == 1009
            assert await asyncio.wait_for(h.submit([1], fn="echo"), 30) == [1]
            assert (await stats(h))["submits"] == 1

    run(main())


def test_a_thousand_submits_on_one_session(broker):
    async def main():
        async with herd.connect(broker.url) as h:
            inputs = [{"sleep_ms": 30, "n": i % 100} for i in range(1000)]
            outputs = await asyncio.gather(*(h.submit(x) for x in inputs))
            assert [o["key"] for o in outputs] == [herd.key(x) for x in inputs]
            assert (await stats(h))["evaluations"] == 100

    run(main())


def test_reconnect_across_a_restart_loses_no_request(make_broker):
    port = free_port()
    first = make_broker(port=port)

    async def main():
        async with herd.connect(first.url) as h:
            assert await h.ping() > 0
            first.kill()
            during = asyncio.ensure_future(h.submit([3, 4], fn="echo"))
            subscribed = h.subscribe(herd.key({"after": "restart", "sleep_ms": 10}))
            waiting = asyncio.ensure_future(subscribed.__anext__())
            # Let both calls register (one turn of the loop); no broker is there.
            await asyncio.sleep(0)
            second = make_broker(port=port)
            assert await during == [3, 4]
            async with herd.connect(second.url) as other:
                await other.submit({"after": "restart", "sleep_ms": 10})
            assert (await waiting).output is not None

    run(main())


def test_worker_api_end_to_end(broker):
    async def main():
        stop = asyncio.Event()
        seen = []

        async def embed(value, progress):
            seen.append(value)
            if value.get("bad"):
                raise ValueError("cannot embed that")
            for step in range(1, value.get("steps", 0) + 1):
                progress({"step": step})
            return {"length": len(json.dumps(value))}

        worker = asyncio.ensure_future(herd.aserve(broker.url, "embed", embed, concurrency=2, stop=stop))
        async with herd.connect(broker.url) as h:
            outputs = await asyncio.gather(*(h.submit({"text": "hi", "n": n % 3}, fn="embed") for n in range(9)))
            assert all(o["length"] > 5 for o in outputs)
            assert len(seen) == 3, "one evaluation per distinct input"
            with pytest.raises(herd.EvalError) as failed:
                await h.submit({"bad": True}, fn="embed")
            assert "cannot embed that" in failed.value.message
            items = [i async for i in h.submit_stream({"steps": 2}, fn="embed")]
            assert [(p.seq, p.data) for p in items[:-1]] == [(1, {"step": 1}), (2, {"step": 2})]
            assert items[-1].output["length"] > 5
        stop.set()
        await worker

    run(main())


def test_a_sync_handler_and_the_sync_client(broker):
    async def serve_for(stop):
        await herd.aserve(broker.url, "embed", lambda value: {"upper": str(value).upper()}, concurrency=1, stop=stop)

    async def main():
        stop = asyncio.Event()
        worker = asyncio.ensure_future(serve_for(stop))
        loop = asyncio.get_running_loop()

        def script():
            with herd.Client(broker.url) as client:
                assert client.submit("abc", fn="embed") == {"upper": "ABC"}
                assert client.submit({"sleep_ms": 1, "s": 1})["key"]
                assert client.get(herd.key("abc", fn="embed")).state == "done"

        await loop.run_in_executor(None, script)
        stop.set()
        await worker

    run(main())


def test_a_streamed_submit_yields_progress_then_its_result(broker):
    async def main():
        async with herd.connect(broker.url) as h:
            value = {"sleep_ms": 300, "progress": 3, "stream": "python"}
            items = [item async for item in h.submit_stream(value)]
            assert [type(i) for i in items] == [herd.Progress] * 3 + [herd.Result]
            assert [(p.seq, p.data) for p in items[:3]] == [(n, {"step": n, "of": 3}) for n in (1, 2, 3)]
            assert items[3].source == "eval" and items[3].key == herd.key(value)
            cached = [item async for item in h.submit_stream(value)]
            assert len(cached) == 1 and cached[0].source == "cache"
            with pytest.raises(herd.DeadlineExceeded) as late:
                await h.submit({"sleep_ms": 1500, "stream": "late"}, priority=9, deadline_ms=50)
            assert late.value.code == "deadline_exceeded"

    run(main())
