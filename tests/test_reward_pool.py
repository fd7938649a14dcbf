"""Process pool: per-call timeout, crash and exception handling, recovery; the scorer on top of it.

The `python:test_reward_pool.*` verifiers below are imported by the worker processes (pytest puts
tests/ on sys.path, and forkserver children inherit it).
"""
import asyncio
import os
import time

import pytest

from dapo_megatron.reward import RewardConfig, RewardScorer, VerifierPool
from dapo_megatron.rollout.sample import Sample


def scripted_verifier(response: str, ground_truth: str):
    if response == "hang":
        time.sleep(60)
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise ZeroDivisionError("boom")
    if response == "number":
        return 0.7
    return response == ground_truth


SCRIPTED = "python:test_reward_pool.scripted_verifier"


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(SCRIPTED, num_workers=2, timeout_s=1.0) as p:
        yield p


def test_results_in_order_with_statuses(pool):
    t0 = time.monotonic()
    got = pool.map([("a", "a"), ("hang", "x"), ("b", "a"), ("raise", "x"), ("crash", "x"), ("number", "x"),
                    ("c", "c")])
    elapsed = time.monotonic() - t0
    assert [r.correct for r in got] == [True, False, False, False, False, True, True]
    assert [r.status for r in got] == ["ok", "timeout", "ok", "error", "error", "ok", "ok"]
    assert "ZeroDivisionError: boom" in got[3].error and "died" in got[4].error
    assert got[5].score == 0.7
    assert 1.0 <= elapsed < 10.0  # one timeout, served while the other worker kept going


def test_pool_recovers_after_hung_worker(pool):
    restarts = pool.restarts
    assert [r.status for r in pool.map([("hang", "x"), ("hang", "x")])] == ["timeout", "timeout"]
    assert pool.restarts == restarts + 2
    got = pool.map([(str(i), str(i)) for i in range(20)])
    assert all(r.correct and r.status == "ok" for r in got)


def test_worker_killed_while_idle_is_replaced_without_losing_a_response(pool):
    restarts = pool.restarts
    pool._workers[0].proc.kill()
    pool._workers[0].proc.join()
    got = pool.map([(str(i), str(i)) for i in range(6)])
    assert all(r.correct and r.status == "ok" for r in got) and pool.restarts == restarts + 1


def test_pathological_latex_hits_the_timeout():
    # sympy tries to evaluate 9^(9^(9^(9^9))); math-verify's own alarm cannot stop it within a second.
    with VerifierPool("math_verify", num_workers=1, timeout_s=1.0) as p:
        t0 = time.monotonic()
        got = p.map([("so \\boxed{9^{9^{9^{9^{9}}}}}", "1"), ("\\boxed{\\frac{1}{2}}", "0.5")])
        assert time.monotonic() - t0 < 10.0  # the status below is the proof: math-verify alone answers "ok" at ~5 s
        assert (got[0].correct, got[0].status) == (False, "timeout")
        assert (got[1].correct, got[1].status) == (True, "ok")
        assert p.restarts == 1


def test_in_process_mode_and_missing_label():
    p = VerifierPool("gsm8k", num_workers=0)
    got = p.map([("#### 5", "5"), ("#### 5", None)])
    assert got[0].correct and got[1].status == "error" and "no label" in got[1].error


def test_bad_python_path_fails_fast():
    with pytest.raises(ValueError, match="cannot import"):
        VerifierPool("python:not_a_module_abc.f", num_workers=1)


def _samples(pairs):
    return [Sample(prompt_ids=[1], response_text=r, label=l) for r, l in pairs]


def test_scorer_fills_samples_and_counts():
    cfg = RewardConfig(type=SCRIPTED, num_workers=1, timeout_s=1.0, correct_reward=1.0, wrong_reward=-1.0)
    with RewardScorer(cfg) as scorer:
        samples = _samples([("a", "a"), ("b", "a"), ("hang", "a"), ("raise", "a")])
        metrics = scorer.score_samples(samples)
        assert [s.correct for s in samples] == [True, False, False, False]
        assert [s.score for s in samples] == [1.0, 0.0, 0.0, 0.0]
        assert [s.reward for s in samples] == [1.0, -1.0, -1.0, -1.0]
        assert samples[2].metadata["reward_status"] == "timeout"
        assert metrics == {"reward/count": 4, "reward/accuracy": 0.25, "reward/mean": -0.5,
                           "reward/timeouts": 1, "reward/errors": 1}
        more = _samples([("x", "x"), ("y", "x")])
        metrics = asyncio.run(scorer.ascore_samples(more))
        assert [s.reward for s in more] == [1.0, -1.0] and metrics["reward/accuracy"] == 0.5
        assert scorer.totals == {"count": 6, "correct": 2, "timeouts": 1, "errors": 1}


def test_scorer_zero_one_convention_with_math_dapo():
    cfg = RewardConfig(type="math_dapo", num_workers=1, wrong_reward=0.0)
    with RewardScorer(cfg) as scorer:
        samples = _samples([("...\nAnswer: \\dfrac{1}{2}", "\\frac{1}{2}"), ("Answer: 2", "3")])
        scorer.score_samples(samples)
        assert [(s.correct, s.reward) for s in samples] == [(True, 1.0), (False, 0.0)]


def test_config_validation():
    with pytest.raises(ValueError, match="reward.type"):
        RewardConfig(type="bleu")
    with pytest.raises(ValueError, match="remote_url"):
        RewardConfig(type="remote")
    with pytest.raises(ValueError, match="num_workers"):
        RewardConfig(num_workers=-1)
