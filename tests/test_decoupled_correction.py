"""Decoupled PPO on a batch sampled by several weight versions (async rollouts), by hand-computed numbers.

The contract (algo/rollout_correction.py): the clip anchor pi_old is the trainer's recompute at the version the step
starts from (`sample.metadata["old_logprobs"]`, actor.recompute_old_logprobs=true); the behaviour policy, the
engine's per-token log-probs under the version that sampled each token (`sample.rollout_logprobs`), only weights the
loss through algorithm.rollout_correction: token loss = policy_loss(r = pi_theta / pi_old) * w, w = pi_old / pi_behav.
The tensors are packed as the actor packs them (train/packing.py TOKEN_FIELDS) and fed to policy_loss as
Actor.train_step's loss_fn does.

The hand-made batch: the step starts from version 3 (k = 2: tokens of versions 1..3).
  sequence 0, A = +1, token versions (1, 1, 2), r = (1.1, 1.2, 1.5), w = (1.5, 4.0, 0.8)
      PPO (Clip-Higher 0.28): losses (-1.1, -1.2, -1.28), d/d log pi = (-1.1, -1.2, 0)   [r = 1.5 clipped high]
  sequence 1, A = -1, token versions (2, 3),    r = (0.7, 1.2),      w = (0.25, 1.0)
      PPO (clip low 0.2):     losses (0.8, 1.2),         d/d log pi = (0, 1.2)           [r = 0.7 clipped low]
  A version-3 token was sampled by the policy the trainer recomputed: its behaviour log-prob equals pi_old, w = 1.
Had the ratio been anchored on the behaviour policy instead, sequence 0's first token would have r = 1.65 (clipped,
gradient 0): the numbers below tell the two apart.
"""
import math

import pytest
import torch

from dapo_megatron.algo.loss import PolicyLossConfig, policy_loss
from dapo_megatron.algo.rollout_correction import RolloutCorrectionConfig
from dapo_megatron.train.packing import pack_microbatch
from dapo_megatron.types import Sample

L = math.log
OLD = [[-1.0, -2.0, -0.5], [-0.3, -1.2]]  # the trainer's recompute at version 3
R = [[1.1, 1.2, 1.5], [0.7, 1.2]]  # pi_theta / pi_old
W = [[1.5, 4.0, 0.8], [0.25, 1.0]]  # pi_old / pi_behaviour
VERSIONS = [[1, 1, 2], [2, 3]]  # the version that sampled each token (documentation of the batch)
ADV = [1.0, -1.0]


def mixed_batch():
    samples = []
    for old, w, v, a in zip(OLD, W, VERSIONS, ADV):
        assert all(wt == 1.0 for wt, vt in zip(w, v) if vt == 3)  # the step's own version: behaviour == old
        behaviour = [o - L(wt) for o, wt in zip(old, w)]
        samples.append(Sample(prompt_ids=[5, 6], response_ids=[7] * len(old), rollout_logprobs=behaviour,
                              metadata={"old_logprobs": old, "advantage": a}))
    mb = pack_microbatch(samples, pad_id=0, multiple=1)
    logp = torch.zeros(2, 3)
    for i, (old, r) in enumerate(zip(OLD, R)):
        logp[i, :len(old)] = torch.tensor([o + L(x) for o, x in zip(old, r)])
    logp[1, 2] = -1000.0  # padding: garbage that must change nothing
    return logp.requires_grad_(), mb


def run(cfg: PolicyLossConfig):
    logp, mb = mixed_batch()
    loss, m = policy_loss(logp, mb["old_logprobs"], mb["advantages"], mb["loss_mask"], cfg,
                          rollout_logprobs=mb["rollout_logprobs"])
    loss.backward()
    return loss.item(), logp.grad, m


def correction(level, mode, threshold, threshold_low=None, **kw):
    return PolicyLossConfig(loss_agg_mode="token-sum", **kw,
                            rollout_correction=RolloutCorrectionConfig(level, mode, threshold, threshold_low))


def test_the_actor_packs_old_as_the_trainers_recompute_and_rollout_as_the_behaviour_policy():
    _, mb = mixed_batch()
    torch.testing.assert_close(mb["old_logprobs"], torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]))
    behaviour = torch.tensor([[-1.0 - L(1.5), -2.0 - L(4.0), -0.5 - L(0.8)], [-0.3 - L(0.25), -1.2, 0.0]])
    torch.testing.assert_close(mb["rollout_logprobs"], behaviour)
    torch.testing.assert_close(mb["advantages"], torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]))


def test_token_tis_mixed_versions_by_hand():
    # w truncated at 2: (1.5, 2, 0.8 | 0.25, 1)
    loss, grad, m = run(correction("token", "truncate", 2.0))
    assert loss == pytest.approx(-1.1 * 1.5 - 1.2 * 2.0 - 1.28 * 0.8 + 0.8 * 0.25 + 1.2 * 1.0, abs=1e-6)  # -3.674
    torch.testing.assert_close(grad, torch.tensor([[-1.65, -2.4, 0.0], [0.0, 1.2, 0.0]]), atol=1e-6, rtol=0)
    assert m["rollout_corr_weight"].item() == pytest.approx((1.5 + 2 + 0.8 + 0.25 + 1) / 5)
    assert m["rollout_corr_truncated_token_frac"].item() == pytest.approx(1 / 5)
    assert m["pg_clipfrac_high"].item() == pytest.approx(1 / 5) and m["pg_clipfrac_low"].item() == pytest.approx(1 / 5)


def test_token_mis_mixed_versions_by_hand():
    # w outside [0.5, 2] masked: (1.5, 0, 0.8 | 0, 1); the token-mean divisor stays 5 (masked = zero advantage)
    loss, grad, m = run(correction("token", "mask", 2.0, 0.5))
    assert loss == pytest.approx(-1.1 * 1.5 - 1.28 * 0.8 + 1.2, abs=1e-6)  # -1.474
    torch.testing.assert_close(grad, torch.tensor([[-1.65, 0.0, 0.0], [0.0, 1.2, 0.0]]), atol=1e-6, rtol=0)
    assert m["rollout_corr_masked_token_frac"].item() == pytest.approx(2 / 5)
    cfg = PolicyLossConfig(rollout_correction=RolloutCorrectionConfig("token", "mask", 2.0, 0.5))
    mean, _, _ = run(cfg)
    assert mean == pytest.approx(loss / 5, abs=1e-6)


def test_sequence_tis_and_mis_mixed_versions_by_hand():
    w0, w1 = 4.8 ** (1 / 3), 0.5  # geometric means: (1.5 * 4 * 0.8)^(1/3) = 1.6869, (0.25 * 1)^(1/2)
    loss, grad, m = run(correction("sequence", "truncate", 2.0))
    assert loss == pytest.approx(-(1.1 + 1.2 + 1.28) * w0 + (0.8 + 1.2) * w1, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[-1.1 * w0, -1.2 * w0, 0.0], [0.0, 1.2 * w1, 0.0]]),
                               atol=1e-5, rtol=0)
    assert m["rollout_corr_truncated_seq_frac"].item() == 0.0
    # MIS [0.6, 2]: sequence 1 (w 0.5) drops out whole, sequence 0 keeps w0
    loss, grad, m = run(correction("sequence", "mask", 2.0, 0.6))
    assert loss == pytest.approx(-(1.1 + 1.2 + 1.28) * w0, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[-1.1 * w0, -1.2 * w0, 0.0], [0.0, 0.0, 0.0]]),
                               atol=1e-5, rtol=0)
    assert m["rollout_corr_masked_seq_frac"].item() == 0.5
    assert m["rollout_corr_masked_token_frac"].item() == pytest.approx(2 / 5)


def test_cispo_mixed_versions_by_hand():
    # CISPO with the paper's clip_ratio_low=1.0: loss_t = -sg[min(r, 1.28)] * w_t * A * log pi_t; r = 0.7 keeps 0.7
    loss, grad, _ = run(correction("token", "truncate", 2.0, loss_mode="cispo", clip_ratio_c=None,
                                   clip_ratio_low=1.0))
    weight = [[1.1 * 1.5, 1.2 * 2.0, 1.28 * 0.8], [0.7 * 0.25, 1.2 * 1.0]]
    want_grad = [[-ADV[i] * x for x in row] for i, row in enumerate(weight)]
    logp, _ = mixed_batch()
    want_loss = sum(g * float(logp[i, t]) for i, row in enumerate(want_grad) for t, g in enumerate(row))
    assert loss == pytest.approx(want_loss, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([want_grad[0], want_grad[1] + [0.0]]), atol=1e-6, rtol=0)


def test_without_correction_the_behaviour_policy_changes_nothing():
    # correction off: the loss is plain PPO on r = pi_theta / pi_old, whatever versions sampled the tokens
    loss, grad, _ = run(PolicyLossConfig(loss_agg_mode="token-sum"))
    assert loss == pytest.approx(-1.1 - 1.2 - 1.28 + 0.8 + 1.2, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1.1, -1.2, 0.0], [0.0, 1.2, 0.0]]), atol=1e-6, rtol=0)


def test_clip_ratio_low_one_is_verls_cispo_without_a_lower_bound():
    # verl's compute_policy_loss_cispo: w = sg[clamp(r, 1 - low, 1 + high)], loss = -w * A * log pi (token-mean).
    # low = 1.0 (MiniMax-M1): the bound 0 never binds, so r = 0.1 keeps weight 0.1 (low = 0.2 would give 0.8).
    logp = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    old = logp.detach() - torch.tensor([[L(0.1), L(1.1), L(2.0)]])
    adv = torch.tensor([[-1.0, 2.0, 1.0]])
    cfg = PolicyLossConfig(loss_mode="cispo", clip_ratio_c=None, clip_ratio_low=1.0)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 3), cfg)
    loss.backward()
    weight = torch.tensor([[0.1, 1.1, 1.28]])
    assert loss.item() == pytest.approx(float(-(weight * adv * logp.detach()).sum() / 3), abs=1e-6)
    torch.testing.assert_close(logp.grad, -weight * adv / 3, atol=1e-6, rtol=0)
    assert m["pg_clipfrac_low"].item() == 0.0 and m["pg_clipfrac_high"].item() == pytest.approx(1 / 3)
    vanilla = PolicyLossConfig(clip_ratio_low=1.0)  # PPO: no lower clip either (r > 0 always)
    assert policy_loss(logp.detach(), old, adv, torch.ones(1, 3), vanilla)[1]["pg_clipfrac_low"].item() == 0.0
    with pytest.raises(ValueError, match=r"clip_ratio_low must be in \[0, 1\]"):
        PolicyLossConfig(clip_ratio_low=1.5)
