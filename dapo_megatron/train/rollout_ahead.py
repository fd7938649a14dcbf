"""One-step off-policy rollout (`rollout.async_steps: 1`): the next step's rollout generates while this step trains.

The schedule (rank 0; the other ranks only see batches arrive sooner):

    step N:  take batch N (generated during step N-1, with weights version N-1)
             start rollout N+1 on a thread (the engines still hold version N)
             old log-probs + train on batch N                 <- overlaps the rollout
             wait for rollout N+1, then sync weights N+1      <- engines change weights only between rollouts

So every sample is at most one version behind the weights it is trained from (`check_staleness`, asserted every
step and logged as `rollout/weight_version_lag_max`), as in verl's one_step_off and slime's train_async. Old
log-probs are then the trainer's (`actor.recompute_old_logprobs: true`, recomputed with the weights being updated);
the engine's log-probs of the older weights feed `algorithm.rollout_correction` when it is on.

The pipeline drains before every checkpoint: on a step that saves, the next rollout starts only after the sync, with
the saved weights, so a resumed run generates exactly what the uninterrupted one did (deterministic mode). A
preemption at another step saves the prompt-sampler state from before the in-flight rollout (`state_dict`): its
prompts are generated again after the resume, with the newer weights; no prompt is skipped.

`async_steps: 0` (the default) is the synchronous loop: `next()` collects in place and `start()` does nothing.
`async_steps >= 2` is train/rollout_producer.py (continuous generation, partial rollouts).
"""
import concurrent.futures
import contextlib
import time

from ..types import Sample


def check_staleness(samples: list[Sample], trainer_version: int, bound: int) -> dict:
    """Lag of each response token's weight version behind the trainer's (a sample without tokens counts once, with
    its own version); raises if any exceeds `bound` versions. The oldest token is each sample's `weight_version`."""
    lags = [trainer_version - int(v) for s in samples for v in (s.token_versions() or [s.weight_version])]
    if lags and (max(lags) > bound or min(lags) < 0):
        worst = max(lags, key=abs)
        raise RuntimeError(f"rollout staleness: a sample of weight version {trainer_version - worst} reached the "
                           f"trainer at version {trainer_version} (bound {bound}: rollout.async_steps); this is a bug")
    return {"rollout/weight_version_lag_max": max(lags, default=0),
            "rollout/weight_version_lag_mean": sum(lags) / len(lags) if lags else 0.0}


class RolloutAhead:
    """Rank 0's rollout, optionally one step ahead (module docstring). `stage` is train/stages.py's RolloutStage."""

    def __init__(self, stage, async_steps: int, staleness_bound: int):
        self.stage, self.async_steps, self.bound = stage, async_steps, staleness_bound
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "dapo-rollout-ahead") if async_steps else None
        self._pending = None  # the future of the rollout for the next step
        self._before = None  # the stage's state from before that rollout (what a checkpoint saves meanwhile)
        restored = getattr(stage, "restored", {})
        if restored.get("ready"):  # a checkpoint of async_steps >= 2: its finished batches are trained first
            stage.buffer.pending[:0] = [restored["groups"][g] for r in restored["ready"] for g in r["groups"]]

    def next(self) -> tuple[list[list[Sample]], dict]:
        """This step's groups and rollout metrics: the rollout started last step, else one collected now."""
        if self._pending is not None:
            groups, metrics, seconds = self._pending.result()
            self._pending = self._before = None
        else:
            groups, metrics, seconds = self._collect()
        lag = check_staleness([s for g in groups for s in g], self.stage.backend.version.value, self.bound)
        return groups, {**metrics, **lag, "time/rollout_generate_s": seconds}

    def start(self) -> None:
        """Begin the next step's rollout on the thread (async_steps=1), with the engines' current weights."""
        if self._pool is None:
            return
        self._before = self.stage.state_dict()
        self._pending = self._pool.submit(self._collect)

    def wait(self) -> None:
        """Block until the rollout in flight has finished (before the engines take new weights)."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending])

    def state_dict(self) -> dict:
        """The rollout state a checkpoint saves now: from before the in-flight rollout, if there is one."""
        return self._before if self._pending is not None else self.stage.state_dict()

    def weight_update(self):
        """Around the weight sync: nothing to do (the rollout in flight has finished: `wait`)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()

    def _collect(self):
        t0 = time.perf_counter()
        groups, metrics = self.stage.collect()
        return groups, metrics, time.perf_counter() - t0
