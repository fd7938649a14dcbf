"""rollout.async_steps=1: the next rollout generates while the step trains, never more than one version behind."""
import threading

import pytest
import torch

from dapo_megatron.config import ConfigError, load_config, validate
from dapo_megatron.train.rollout_ahead import RolloutAhead, check_staleness
from dapo_megatron.types import Sample, WeightVersion
from test_trainer import _args, _metrics, _train, toy  # noqa: F401 (toy is a fixture)

WAIT_S = 60  # a bound on every wait below, never a guess at how fast anything runs


def test_staleness_lag_by_hand_and_the_bound_is_enforced():
    samples = [Sample(prompt_ids=[1], weight_version=v) for v in (3, 2, 3, 2)]
    assert check_staleness(samples, trainer_version=3, bound=1) == {
        "rollout/weight_version_lag_max": 1, "rollout/weight_version_lag_mean": 0.5}
    assert check_staleness(samples[:1], 3, 0)["rollout/weight_version_lag_max"] == 0
    with pytest.raises(RuntimeError, match="weight version 1 reached the trainer at version 3"):
        check_staleness(samples + [Sample(prompt_ids=[1], weight_version=1)], 3, 1)
    with pytest.raises(RuntimeError, match="weight version 4"):  # newer than the trainer: also a bug
        check_staleness([Sample(prompt_ids=[1], weight_version=4)], 3, 1)


class _Backend:
    def __init__(self):
        self.version = WeightVersion(0)


class _Stage:
    """A rollout stage whose collect() blocks until the test lets it finish, so overlap is shown by events."""

    def __init__(self):
        self.backend, self.step = _Backend(), 0
        self.started, self.go = threading.Event(), threading.Event()
        self.threads = []

    def collect(self):
        self.threads.append(threading.current_thread().name)
        version = self.backend.version.value  # the weights the engines hold when generation starts
        self.started.set()
        assert self.go.wait(WAIT_S), "the test never released the rollout"
        self.step += 1
        return [[Sample(prompt_ids=[1], weight_version=version)]], {"rollout/n": self.step}

    def state_dict(self):
        return {"step": self.step}


def test_the_next_rollout_runs_on_a_thread_while_the_caller_works():
    stage = _Stage()
    ahead = RolloutAhead(stage, async_steps=1, staleness_bound=1)
    stage.go.set()
    groups, metrics = ahead.next()  # nothing in flight: collected in place
    assert metrics["rollout/n"] == 1 and stage.threads == ["MainThread"]
    stage.go.clear(), stage.started.clear()
    ahead.start()
    assert stage.started.wait(WAIT_S)  # generating, and this thread is free: "training" happens here
    assert ahead.state_dict() == {"step": 1}  # a checkpoint now saves the state from before the rollout in flight
    stage.backend.version.set(1)  # the step's update (the engines would take it after wait())
    stage.go.set()
    ahead.wait()
    groups, metrics = ahead.next()
    assert stage.threads[1].startswith("dapo-rollout-ahead") and metrics["rollout/n"] == 2
    assert groups[0][0].weight_version == 0 and metrics["rollout/weight_version_lag_max"] == 1
    assert ahead.state_dict() == {"step": 2}
    ahead.close()


def test_synchronous_mode_never_starts_a_thread():
    stage = _Stage()
    stage.go.set()
    ahead = RolloutAhead(stage, async_steps=0, staleness_bound=0)
    ahead.start()
    assert not stage.started.is_set()
    ahead.next()
    assert stage.threads == ["MainThread"]


@pytest.mark.parametrize("override, key", [
    ("rollout.async_steps=-1", "rollout.async_steps=-1"),  # k >= 2 is allowed (tests/test_async_producer.py)
    ("dynamic_sampling.keep_partial=true", "keep_partial"),
    ("trainer.save_interval=1", "trainer.save_interval=1"),
    pytest.param("rollout.backend=sglang", "rollout.colocate=false", marks=pytest.mark.gpu),  # released GPUs
])
def test_refused_in_one_line(toy, tmp_path, override, key):  # noqa: F811
    args = _args(toy, tmp_path / "run", 2, extra=["rollout.async_steps=1", override])
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, args), world_size=1)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_colocated_sglang_on_cpu_may_generate_while_training(toy, tmp_path):  # noqa: F811
    """Colocated CPU servers release nothing while the actor trains (no memory saver), so async_steps=1 is allowed
    there (tests/test_sglang_cpu_train.py runs it); on GPU it is refused (above)."""
    if torch.cuda.is_available():
        pytest.skip("CPU only")
    args = _args(toy, tmp_path / "run", 2, extra=["rollout.async_steps=1", "rollout.backend=sglang"])
    validate(load_config(None, args), world_size=1)


@pytest.mark.dist
def test_async_run_lags_one_version_and_resumes_exactly(toy, tmp_path):  # noqa: F811
    """4 steps, a checkpoint every 2: steps 2 and 4 train on rollouts made one version back; the drain before the
    step-2 save makes a run stopped there and resumed produce the same numbers."""
    extra = ["rollout.async_steps=1"]
    whole = tmp_path / "whole"
    _train(_args(toy, whole, 4, extra=extra))
    rows = _metrics(whole)
    assert [r["rollout/weight_version_lag_max"] for r in rows] == [0, 1, 0, 1]
    # the setting is real: where the rollout lags, the engine's log-probs are of the weights one update back
    gaps = [r["rollout/train_infer_logprob_diff_max"] for r in rows]
    assert max(gaps[0], gaps[2]) < 1e-5 < min(gaps[1], gaps[3]), gaps
    part = tmp_path / "part"
    _train(_args(toy, part, 2, extra=extra))
    _train(_args(toy, part, 4, extra=[*extra, f"trainer.load={part / 'checkpoints'}"]))
    assert _metrics(part) == rows


@pytest.mark.dist
def test_token_budget_stops_at_the_step_that_spends_it(toy, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    _train(_args(toy, run, 20, extra=["trainer.max_generated_tokens=150"]))
    totals = [r["rollout/generated_tokens_total"] for r in _metrics(run)]
    assert totals == sorted(totals) and totals[0] == _metrics(run)[0]["rollout/generated_tokens"]
    assert len(totals) < 20 and totals[-1] >= 150 > totals[-2], totals  # stopped at the first step over the budget
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{len(totals):07d}"  # and saved it
