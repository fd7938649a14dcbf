"""End to end with a reference policy: kl_coef=0.1 through the CLI (embedded engine, megatron actor over gloo)."""
import json

import pytest

from tests.test_trainer import _args, _metrics, _train, toy  # noqa: F401  (toy is a fixture)


@pytest.mark.dist
def test_kl_to_the_reference_is_zero_at_step_one_and_grows(toy, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    # one optimizer step per rollout step (16 responses = global batch), so step 1 trains the initial policy
    _train(_args(toy, run, steps=3, extra=["algorithm.kl_coef=0.1", "actor.global_batch_size=16",
                                           "trainer.save_interval=0"]))
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    first, last = rows[0], rows[-1]
    # the reference is the initial policy: its log-probs equal the trainer's old log-probs, and the KL is 0
    assert first["ref/logprob_diff_vs_old_max"] < 1e-6
    assert abs(first["actor/kl"]) < 1e-6
    assert last["ref/logprob_diff_vs_old_max"] > 1e-4 and last["actor/kl"] > 1e-7
    assert first["ref/param_mb"] > 0 and first["ref/pass_s"] > 0
    raw = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert raw["time/ref_logprobs_s"] > 0
    print({k: v for k, v in raw.items() if k.startswith(("ref/", "time/"))}, "kl", [r["actor/kl"] for r in rows])


def test_no_reference_is_built_without_kl():
    from dapo_megatron.config import Config
    from dapo_megatron.train.reference import build_reference

    cfg = Config()  # DAPO defaults: kl_coef = 0
    cfg.model.path = "/nonexistent"  # would fail to load if anything tried
    assert build_reference(cfg, pad_id=0) is None
