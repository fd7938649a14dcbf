"""End to end with a reference policy: kl_coef=0.1 through the CLI (embedded engine, megatron actor over gloo)."""
import json

import pytest

from tests.test_trainer import _args, _metrics, _train, toy  # noqa: F401  (toy is a fixture)


@pytest.mark.dist
@pytest.mark.parametrize("bf16", [False, True])
def test_kl_to_the_reference_is_zero_at_step_one_and_grows(toy, tmp_path, bf16):  # noqa: F811
    """bf16: the reference takes the actor's precision (an fp32 reference measured bf16 rounding as KL at step 1)."""
    run = tmp_path / "run"
    # one optimizer step per rollout step (16 responses = global batch), so step 1 trains the initial policy
    _train(_args(toy, run, steps=3, extra=["algorithm.kl_coef=0.1", "actor.global_batch_size=16",
                                           "trainer.save_interval=0", f"actor.bf16={str(bf16).lower()}",
                                           "actor.recompute_old_logprobs=true"]))
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


def test_use_kl_in_reward_shapes_sequence_rewards_and_recomputes_advantages():
    import math

    from dapo_megatron.config import AlgorithmConfig
    from dapo_megatron.rollout.sample import Sample
    from dapo_megatron.train.reference import apply_kl_in_reward

    algo = AlgorithmConfig(kl_coef=0.5, kl_estimator="k1", use_kl_in_reward=True)
    # group 0: equal rewards 1, 1; sample 1's policy drifted from the reference by +0.2 and +0.4 (k1 = log ratio),
    # its second token masked. group 1: rewards 1, -1, no drift.
    batch = [Sample(prompt_ids=[1], response_ids=[2, 3], reward=1.0, group_id=0,
                    metadata={"old_logprobs": [-1.0, -2.0], "ref_logprobs": [-1.0, -2.0]}),
             Sample(prompt_ids=[1], response_ids=[2, 3], reward=1.0, group_id=0, loss_mask=[1, 0],
                    metadata={"old_logprobs": [-0.8, -1.6], "ref_logprobs": [-1.0, -2.0]}),
             Sample(prompt_ids=[1], response_ids=[4], reward=1.0, group_id=1,
                    metadata={"old_logprobs": [-0.5], "ref_logprobs": [-0.5]}),
             Sample(prompt_ids=[1], response_ids=[5], reward=-1.0, group_id=1,
                    metadata={"old_logprobs": [-0.5], "ref_logprobs": [-0.5]})]
    m = apply_kl_in_reward(batch, algo)
    # penalty of sample 1: 0.5 * 0.2 (the masked token does not count); shaped group 0 rewards (1, 0.9):
    # advantages (+-0.05) / (std 0.0707107 + eps) = +-0.7071
    assert [s.metadata["kl_penalty"] for s in batch] == pytest.approx([0.0, 0.1, 0.0, 0.0])
    want = 0.05 / (math.sqrt(2 * 0.05 ** 2) + 1e-6)
    assert [s.metadata["advantage"] for s in batch] == pytest.approx([want, -want, 1 / (math.sqrt(2) + 1e-6),
                                                                       -1 / (math.sqrt(2) + 1e-6)], rel=1e-5)
    assert m["ref/kl_reward_penalty_mean"] == pytest.approx(0.025)
    assert not algo.kl_in_loss  # the loss has no KL term then
