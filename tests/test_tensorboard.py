"""TensorBoard events read back with tensorboard's EventAccumulator: every scalar at every step, after a resume too
(the replayed step replaces the crashed run's), no duplicated steps. The full-loop version runs in test_slurm.py."""
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dapo_megatron.train.metrics import MetricsLogger

KEYS = ["rollout/reward_mean", "rollout/accuracy", "actor/pg_clipfrac_high", "actor/grad_norm", "time/step_s"]


def _log(run, start, steps, offset):
    logger = MetricsLogger(run, tensorboard=True, start_step=start)
    for step in steps:
        logger.log(step, {k: step + offset + i / 10 for i, k in enumerate(KEYS)})
    logger.close()


def test_scalars_for_every_step_after_a_resume(tmp_path):
    _log(tmp_path, 0, [1, 2, 3], offset=0.0)  # crashed after logging step 3, checkpoint at step 2
    _log(tmp_path, 2, [3, 4], offset=100.0)  # resumed from step 2: step 3 is replayed
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(KEYS) <= set(acc.Tags()["scalars"])
    for i, key in enumerate(KEYS):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3, 4], key  # once each, in order
        want = [1 + i / 10, 2 + i / 10, 103 + i / 10, 104 + i / 10]
        assert all(abs(e.value - w) < 1e-4 for e, w in zip(events, want)), (key, [e.value for e in events])
