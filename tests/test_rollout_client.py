"""RolloutClient against the embedded server over HTTP (and in-process), and against scripted fake servers."""
import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dapo_megatron.models.tiny import make_tiny_hf_model
from dapo_megatron.rollout.client import (RolloutClient, RolloutRequestError, RolloutServerError,
                                          RolloutTimeoutError, run_sync)
from dapo_megatron.rollout.engine import Engine
from dapo_megatron.rollout.sample import Sample
from dapo_megatron.rollout.server import EmbeddedServer, free_port, launch_embedded_server, wait_for_health
from waiting import async_wait_until, held

LONG = {"max_new_tokens": 900, "ignore_eos": True}  # never finishes in these tests: the engine is held


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("client_model") / "m", family="qwen2.5")


@pytest.fixture(scope="module")
def server(model_path):
    with launch_embedded_server(model_path, 0, max_batch_size=16) as srv:
        yield srv


def group(prompt, g, group_id=0):
    return [Sample(prompt_ids=list(prompt), group_id=group_id, index=i) for i in range(g)]


def test_generate_group_fills_every_sample(server):
    client = RolloutClient([server.url])
    samples = asyncio.run(client.generate_group(group([5, 6, 7], 4), {"max_new_tokens": 6, "temperature": 1.0}))
    assert [s.index for s in samples] == [0, 1, 2, 3]
    for s in samples:
        assert 1 <= len(s.response_ids) <= 6 and len(s.rollout_logprobs) == len(s.response_ids)
        assert all(lp < 0 for lp in s.rollout_logprobs)
        assert s.finish_reason in ("stop", "length") and s.weight_version == 0
        assert (s.finish_reason == "length") == (len(s.response_ids) == 6)
    # a second asyncio.run (a new event loop) works with the same client
    again = asyncio.run(client.generate([5, 6, 7], {"max_new_tokens": 2, "n": 2}))
    assert len(again) == 2


def test_stop_ids_stop_strings_and_length_through_http(server):
    client = RolloutClient([server.url])
    base = {"temperature": 1.0, "sampling_seed": 5, "ignore_eos": True, "max_new_tokens": 12}
    full = asyncio.run(client.generate([5, 6, 7], base))[0]
    assert full["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    stop_id = full["output_ids"][3]
    out = asyncio.run(client.generate([5, 6, 7], {**base, "stop_token_ids": [stop_id]}))[0]
    assert out["output_ids"][-1] == stop_id and out["meta_info"]["finish_reason"]["matched"] == stop_id
    stop = full["text"][4:6]
    out = asyncio.run(client.generate([5, 6, 7], {**base, "stop": stop}))[0]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop} and stop not in out["text"]


def test_bad_request_raises_with_the_server_message(server):
    client = RolloutClient([server.url])
    with pytest.raises(RolloutRequestError, match=r"HTTP 400.*max_new_tokens"):
        asyncio.run(client.generate([5], {"max_new_tokens": -3}))
    with pytest.raises(RolloutRequestError, match="not a token id"):
        asyncio.run(client.generate([5, 10 ** 6], {}))
    assert len(asyncio.run(client.generate([5], {"max_new_tokens": 1}))) == 1  # still serving


def test_abort_all_returns_in_flight_and_queued_requests_promptly(server):
    client, engine = RolloutClient([server.url], max_concurrency=2), server.engine
    engine.hold()  # requests reach the server and wait there until the test lets them run

    async def run():
        tasks = [asyncio.ensure_future(client.generate([5, 6], LONG)) for _ in range(4)]
        await async_wait_until(lambda: _requests_on(engine, 2), "the 2 requests holding a concurrency slot to reach "
                               "the server")
        engine.hold(steps=1)  # one step: both admitted, prefilled (1 token) and decoded once (2 tokens)
        await asyncio.to_thread(held, engine)
        await client.abort_all()
        return await _bounded(asyncio.gather(*tasks), 30, "the 4 aborted requests to return")

    try:
        outs = asyncio.run(run())
    finally:
        engine.release()
    reasons = [o[0]["meta_info"]["finish_reason"]["type"] for o in outs]
    assert reasons == ["abort"] * 4
    lengths = sorted(len(o[0]["output_ids"]) for o in outs)
    assert lengths == [0, 0, 2, 2]  # two waited for a slot, two were generating
    assert len(asyncio.run(client.generate([5], {"max_new_tokens": 2}))[0]["output_ids"]) >= 1  # usable after


def test_request_timeout_raises_and_aborts_on_the_server(server):
    client = RolloutClient([server.url], request_timeout_s=0.5)
    server.engine.hold()  # the request cannot finish before its timeout, however fast the machine is
    try:
        with pytest.raises(RolloutTimeoutError, match=server.url):
            asyncio.run(client.generate([5, 6], LONG))
        asyncio.run(async_wait_until(lambda: _requests_on(server.engine, 0), "the timed-out request to be aborted "
                                     "on the server", timeout_s=10))
    finally:
        server.engine.release()


# A server whose engine holds every request in flight: it is still generating when the test kills it.
HELD_SERVER = r'''
import sys
from aiohttp import web
from dapo_megatron.rollout.engine import Engine
from dapo_megatron.rollout.server import build_app

engine = Engine(sys.argv[1])
engine.hold()
web.run_app(build_app(engine), host="127.0.0.1", port=int(sys.argv[2]), handler_cancellation=True, print=None)
'''


def launch_held_server(model_path) -> EmbeddedServer:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", HELD_SERVER, str(model_path), str(port)], env=env)
    server = EmbeddedServer(f"http://127.0.0.1:{port}", process=proc)
    try:
        wait_for_health(server.url, 120, process=proc)
    except Exception:
        server.shutdown()
        raise
    return server


def test_server_killed_mid_request_fails_over_then_errors_clearly(model_path, server):
    dying = launch_held_server(model_path)
    try:
        client = RolloutClient([dying.url, server.url], backoff_s=0.05)  # first pick: dying (round-robin start)

        async def run():
            task = asyncio.ensure_future(client.generate([5, 6], {"max_new_tokens": 60, "ignore_eos": True}))
            await async_wait_until(lambda: _running_on(client, dying.url), f"the request to reach {dying.url}")
            dying.kill()
            return await _bounded(task, 60, "the request to fail over to the live server and finish")

        out = asyncio.run(run())[0]
        assert len(out["output_ids"]) == 60 and out["meta_info"]["finish_reason"]["type"] == "length"
        alone = RolloutClient([dying.url], backoff_s=0.05, max_retries=2)
        started = time.monotonic()
        with pytest.raises(RolloutServerError, match=f"failed after 3 attempts.*{dying.url}"):
            asyncio.run(alone.generate([5], {"max_new_tokens": 2}))
        assert time.monotonic() - started < 5
    finally:
        dying.shutdown()


async def _running_on(client, url) -> bool:
    status, info = await client._call(url, "/get_server_info", method="GET", timeout_s=5)
    return status == 200 and info["num_requests"] > 0


async def _requests_on(engine, n: int) -> bool:
    return engine.num_requests == n


async def _bounded(awaitable, timeout_s: float, what: str):
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}") from None


def test_wait_healthy_names_the_dead_server(server):
    dead = f"http://127.0.0.1:{free_port()}"
    infos = asyncio.run(RolloutClient([server.url]).wait_healthy(timeout_s=5))
    assert infos[0]["is_generation"]
    with pytest.raises(RolloutServerError, match=dead):
        asyncio.run(RolloutClient([server.url, dead]).wait_healthy(timeout_s=1, interval_s=0.2))


def test_in_process_engine_has_the_same_interface(model_path):
    engine = Engine(model_path)
    try:
        client = RolloutClient(engine=engine)
        samples = asyncio.run(client.generate_group(group([5, 6], 3, group_id=7), {"max_new_tokens": 4}))
        assert all(len(s.response_ids) == len(s.rollout_logprobs) > 0 for s in samples)
        with pytest.raises(RolloutRequestError, match="top_p"):
            asyncio.run(client.generate([5], {"top_p": 2.0}))

        async def abort():
            engine.hold(steps=1)  # admitted, prefilled and decoded once, then held mid-generation
            task = asyncio.ensure_future(client.generate([5, 6], LONG))
            await asyncio.to_thread(held, engine)
            await client.abort_all()
            return await _bounded(task, 30, "the aborted in-process request to return")

        out = asyncio.run(abort())[0]
        assert out["meta_info"]["finish_reason"]["type"] == "abort" and len(out["output_ids"]) == 2
    finally:
        engine.release()
        engine.shutdown()


def test_generate_group_rejects_mixed_prompts(server):
    with pytest.raises(ValueError, match="identical prompt_ids"):
        asyncio.run(RolloutClient([server.url]).generate_group([Sample([1]), Sample([2])], {}))


# --------------------------------------------------------------------------- scripted fake SGLang servers
class FakeSGLang:
    """A scripted /generate endpoint: `statuses` are answered in turn (then 200), each after `delay_s`."""

    def __init__(self, delay_s=0.0, statuses=(), n_outputs=None):
        from aiohttp import web

        self.delay_s, self.statuses, self.n_outputs = delay_s, list(statuses), n_outputs
        self.calls, self.active, self.max_active, self.payloads = 0, 0, 0, []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.port = free_port()
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def handle(self, request):
        from aiohttp import web

        body = await request.json() if request.can_read_body else {}
        self.payloads.append((request.path, body))
        if request.path != "/generate":
            return web.json_response({"success": True})
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await asyncio.sleep(self.delay_s)
        self.active -= 1
        if self.statuses:
            status = self.statuses.pop(0)
            return web.json_response({"message": f"scripted {status}"}, status=status)
        n = self.n_outputs or body["sampling_params"].get("n", 1)
        out = {"text": "a", "output_ids": [7], "meta_info": {"id": body["rid"], "weight_version": "3",
               "finish_reason": {"type": "stop", "matched": 7}, "output_token_logprobs": [[-0.5, 7, None]]}}
        return web.json_response(out if n == 1 else [out] * n)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def fakes():
    made = []

    def make(**kwargs):
        made.append(FakeSGLang(**kwargs))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_bounded_concurrency_and_load_spread_over_servers(fakes):
    a, b = fakes(delay_s=0.2), fakes(delay_s=0.2)
    client = RolloutClient([a.url, b.url], max_concurrency=3)

    async def run():
        return await asyncio.gather(*[client.generate([1, 2], {"max_new_tokens": 1}) for _ in range(12)])

    assert len(asyncio.run(run())) == 12
    assert a.max_active + b.max_active <= 4 and max(a.max_active, b.max_active) <= 2
    assert a.calls + b.calls == 12 and min(a.calls, b.calls) >= 4  # least-loaded keeps both busy


def test_retries_5xx_with_backoff_but_not_4xx(fakes):
    flaky = fakes(statuses=[503, 500])
    out = asyncio.run(RolloutClient([flaky.url], backoff_s=0.01).generate([1], {}))
    assert flaky.calls == 3 and out[0]["output_ids"] == [7]
    bad = fakes(statuses=[400])
    with pytest.raises(RolloutRequestError, match="scripted 400"):
        asyncio.run(RolloutClient([bad.url], backoff_s=0.01).generate([1], {}))
    assert bad.calls == 1


def test_missing_outputs_are_an_error_not_lost_samples(fakes):
    short = fakes(n_outputs=2)
    with pytest.raises(RolloutServerError, match="2 outputs for n=4"):
        asyncio.run(RolloutClient([short.url]).generate_group(group([1], 4), {}))


def test_weight_version_parsed_from_sglang_strings(fakes):
    samples = asyncio.run(RolloutClient([fakes().url]).generate_group(group([1], 2), {}))
    assert [s.weight_version for s in samples] == [3, 3] and samples[0].response_ids == [7]


def test_control_calls_fan_out_to_every_worker(fakes):
    a, b = fakes(), fakes()
    router = fakes()
    client = RolloutClient([router.url], worker_urls=[a.url, b.url])
    asyncio.run(client.update_weights_from_disk("/ckpt/v4", weight_version=4))
    for f in (a, b):
        assert f.payloads[-1] == ("/update_weights_from_disk", {"model_path": "/ckpt/v4", "weight_version": "4",
                                                                "abort_all_requests": False})
    assert router.payloads == [] and client.weight_version == 0  # the backend owns the version
    asyncio.run(client.pause_generation())
    assert a.payloads[-1] == ("/pause_generation", {"mode": "abort"})
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RolloutServerError, match=f"1 of 2 servers.*{dead}"):
        asyncio.run(RolloutClient([a.url], worker_urls=[a.url, dead]).flush_cache())


def test_run_sync_inside_a_running_loop():
    async def inner():
        return run_sync(asyncio.sleep(0, result=42))

    assert run_sync(asyncio.sleep(0, result=1)) == 1 and asyncio.run(inner()) == 42
