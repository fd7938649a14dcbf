"""Remote reward endpoint: a local aiohttp server on 127.0.0.1 plays the user's reward model."""
import asyncio
import threading

import pytest
from aiohttp import web

from dapo_megatron.reward import RewardConfig, RewardScorer, get_verifier
from dapo_megatron.reward.remote import RemoteRewardClient
from dapo_megatron.rollout.sample import Sample


class FakeRewardModel:
    """Scores 1.0 when response == label, else -0.5; `script` makes the first calls misbehave."""

    def __init__(self, script=()):
        self.script = list(script)  # per call: "500", "slow", "garbage", "short" or "ok"
        self.batch_sizes = []

    async def handle(self, request):
        items = (await request.json())["items"]
        self.batch_sizes.append(len(items))
        mode = self.script.pop(0) if self.script else "ok"
        if mode == "500":
            return web.Response(status=500, text="overloaded")
        if mode == "slow":
            await asyncio.sleep(2)
        if mode == "garbage":
            return web.Response(text="not json")
        scores = [1.0 if it["response"] == it["label"] else -0.5 for it in items]
        return web.json_response({"scores": scores[:-1] if mode == "short" else scores})


async def _serve(model):
    app = web.Application()
    app.router.add_post("/reward", model.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/reward"


def _run(model, fn):
    async def main():
        runner, url = await _serve(model)
        try:
            return await fn(url)
        finally:
            await runner.cleanup()
    return asyncio.run(main())


def _items(n):
    return [{"prompt": "p", "response": str(i % 2), "label": "0", "data_source": "t"} for i in range(n)]


def test_batches_and_scores():
    model = FakeRewardModel()
    got = _run(model, lambda url: RemoteRewardClient(url, batch_size=2).score(_items(5)))
    assert sorted(model.batch_sizes) == [1, 2, 2]
    assert [r.correct for r in got] == [True, False, True, False, True]
    assert [r.score for r in got] == [1.0, -0.5, 1.0, -0.5, 1.0]


def test_retries_with_backoff_then_succeeds():
    model = FakeRewardModel(script=["500", "500"])
    got = _run(model, lambda url: RemoteRewardClient(url, batch_size=8, max_retries=2, backoff_s=0.01).score(_items(2)))
    assert len(model.batch_sizes) == 3 and [r.status for r in got] == ["ok", "ok"]


def test_gives_up_after_retries_without_raising():
    model = FakeRewardModel(script=["500"] * 10)
    got = _run(model, lambda url: RemoteRewardClient(url, max_retries=1, backoff_s=0.01).score(_items(3)))
    assert len(model.batch_sizes) == 2
    assert [(r.correct, r.status) for r in got] == [(False, "error")] * 3 and "HTTP 500" in got[0].error


def test_timeout_scores_wrong():
    model = FakeRewardModel(script=["slow"])
    got = _run(model, lambda url: RemoteRewardClient(url, timeout_s=0.3, max_retries=0).score(_items(2)))
    assert [(r.correct, r.status) for r in got] == [(False, "timeout")] * 2


@pytest.mark.parametrize("mode", ["garbage", "short"])
def test_malformed_answer_is_an_error_without_retry(mode):
    model = FakeRewardModel(script=[mode])
    got = _run(model, lambda url: RemoteRewardClient(url, max_retries=3, backoff_s=0.01).score(_items(2)))
    assert len(model.batch_sizes) == 1 and [r.status for r in got] == ["error", "error"]


def test_scorer_sync_path_and_registry_verifier():
    """Sync callers (score_samples, get_verifier('remote')) against a server on another thread."""
    model = FakeRewardModel()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(_serve(model), loop).result()
    try:
        cfg = RewardConfig(type="remote", remote_url=url, remote_batch_size=2, wrong_reward=0.0)
        samples = [Sample(prompt_ids=[1], response_text=r, label="a") for r in ("a", "b", "a")]
        metrics = RewardScorer(cfg).score_samples(samples)
        assert [(s.correct, s.reward) for s in samples] == [(True, 1.0), (False, 0.0), (True, 1.0)]
        assert metrics["reward/accuracy"] == pytest.approx(2 / 3)
        raw = RewardConfig(type="remote", remote_url=url, remote_use_raw_score=True)
        samples = [Sample(prompt_ids=[1], response_text="b", label="a")]
        RewardScorer(raw).score_samples(samples)
        assert samples[0].reward == -0.5 and samples[0].correct is False
        assert get_verifier("remote", cfg)("a", "a") is True
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
